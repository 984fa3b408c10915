"""Per-sample randomness (data/dataset.py: PerSampleDraws, sample_generator): after set_draws,
a training sample's choice order and augmentation depend on (seed, epoch, index) alone: not on
the global RNG, not on the order samples are loaded in; and they change with the epoch."""

from __future__ import annotations

import pytest
import torch

from medvlm3d.data.dataset import DataConfig, PerSampleDraws, StudyDataset, sample_generator
from medvlm3d.model.llm import LLMConfig, load_tokenizer
from medvlm3d.train.data import TextDataset


def _study_ds(records, tok_dir, augment: bool) -> StudyDataset:
    tok = load_tokenizer(LLMConfig(tokenizer=str(tok_dir)))
    cfg = DataConfig(size=(16, 32, 32), slice_size=(32, 32), modality="ct", shuffle_choices=True, augment=augment)
    return StudyDataset(records, cfg, tok, 4, train=True)


def _view(sample: dict) -> tuple:
    return sample["record"].get("answer_choice"), tuple(sample["record"].get("choices") or ()), \
        float(sample["volume"].sum()), float(sample["slices"].sum())


@pytest.mark.parametrize("augment", [False, True])
def test_a_sample_depends_on_seed_epoch_and_index_only(phantom_records, tiny_tokenizer_dir, augment) -> None:
    picks = [i for i, r in enumerate(phantom_records) if len(r.get("choices") or []) >= 3][:4]
    ds = _study_ds(phantom_records, tiny_tokenizer_dir, augment)
    ds.set_draws(seed=7, epoch=2)
    torch.manual_seed(0)
    first = {i: _view(ds[i]) for i in picks}
    torch.manual_seed(12345)  # another global RNG state, another load order
    again = {i: _view(ds[i]) for i in reversed(picks)}
    assert again == first
    ds.set_draws(seed=7, epoch=3)
    other_epoch = {i: _view(ds[i]) for i in picks}
    assert other_epoch != first  # a new draw each epoch (4 samples x 24 orders: a clash is negligible)


def test_text_dataset_shuffles_per_sample_too(phantom_records, tiny_tokenizer_dir) -> None:
    tok = load_tokenizer(LLMConfig(tokenizer=str(tiny_tokenizer_dir)))
    ds = TextDataset(phantom_records, tok, max_len=256, shuffle=True)
    picks = [i for i, r in enumerate(phantom_records) if len(r.get("choices") or []) >= 3][:4]
    ds.set_draws(seed=1, epoch=0)
    torch.manual_seed(0)
    a = [ds[i]["input_ids"].tolist() for i in picks]
    torch.manual_seed(99)
    assert [ds[i]["input_ids"].tolist() for i in picks] == a
    ds.set_draws(seed=2, epoch=0)
    assert [ds[i]["input_ids"].tolist() for i in picks] != a


def test_sample_generators_differ_by_each_key() -> None:
    draw = [torch.randint(0, 2**31 - 1, (4,), generator=sample_generator(*k)).tolist()
            for k in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))]
    assert len({tuple(d) for d in draw}) == 4
    assert torch.equal(torch.rand(3, generator=sample_generator(3, 4, 5)), torch.rand(3, generator=sample_generator(3, 4, 5)))


class _Draws(PerSampleDraws, torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        g = self._generator(i)
        return -1 if g is None else int(torch.randint(0, 2**31 - 1, (), generator=g))


def test_persistent_workers_see_each_epochs_draws() -> None:
    """make_loader's workers start once; set_sample_draws of each epoch reaches them (shared memory)."""
    from medvlm3d.train.data import draw_datasets, set_sample_draws

    ds = _Draws()
    for d in draw_datasets(ds):
        d.share_draws()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    for epoch in range(3):
        set_sample_draws(loader, 5, epoch)
        got = list(loader)
        assert got == [ds[i] for i in range(4)] and -1 not in got
        assert got != [_Draws.__getitem__(_with(5, epoch + 1), i) for i in range(4)]
    assert loader._iterator is not None and loader._iterator._workers[0].pid  # one worker all along


def _with(seed: int, epoch: int) -> _Draws:
    d = _Draws()
    d.set_draws(seed, epoch)
    return d
