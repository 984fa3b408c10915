"""Slice selectors on the data side (data/select/): shapes, teachers, per-plane picks, seeding,
the collated teacher / slice_keep, pre-selection before the slice encoder, generate == forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from medvlm3d.config import ConfigError, VoteMIConfig, load_config
from medvlm3d.data.collate import Collator
from medvlm3d.data.dataset import StudyDataset
from medvlm3d.data.select import build_selector
from medvlm3d.data.select.step import SelectionPlan
from medvlm3d.model.medvlm import build_model

BUILT_IN = ("votek", "uniform", "random", "labels", "vote_mi_brainmd")


def phantom_slices(planes: int = 3, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    slices = torch.rand(planes * n, 1, 16, 16, generator=g) * 0.2
    slices[3:5, :, 4:10, 4:10] += 0.7  # a "lesion" in two axial slices
    return slices, torch.arange(planes).repeat_interleave(n)


@pytest.mark.parametrize("name", BUILT_IN)
def test_selector_shapes_teacher_and_padding(name: str) -> None:
    slices, plane = phantom_slices(planes=1, n=10)
    mask = torch.tensor([True] * 8 + [False] * 2)  # two padded slices
    target = torch.zeros(10)
    target[[3, 4]] = 1.0
    sel = build_selector(name, VoteMIConfig(k=3, num_picks=4), 4)
    out = sel(slices, plane, mask, index=3, slice_target=target)
    assert out.teacher.shape == (10,) and out.teacher.dtype == torch.float32
    assert float(out.teacher.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(out.teacher[~mask] == 0) and torch.all(out.teacher[mask] > 0)
    assert out.keep.shape == (4,) and out.keep.dtype == torch.long
    assert bool(mask[out.keep].all())  # never a padded slice
    assert out.keep.tolist() == sorted(out.keep.tolist())
    again = sel(slices, plane, mask, index=3, slice_target=target)
    assert torch.equal(out.keep, again.keep) and torch.equal(out.teacher, again.teacher)
    if name == "labels":
        assert {3, 4} <= set(out.keep.tolist()) and float(out.teacher[[3, 4]].sum()) > 0.9
    off = build_selector(name, VoteMIConfig(k=3, teacher="off"), 4)(slices, plane, mask, 3, target)
    assert off.teacher is None and torch.equal(off.keep, out.keep)


@pytest.mark.parametrize("name", BUILT_IN)
def test_three_planes_get_picks_each(name: str) -> None:
    slices, plane = phantom_slices(planes=3, n=12)
    keep = build_selector(name, VoteMIConfig(k=3), 6)(slices, plane).keep
    # the old model path kept sorted(picks)[:num_picks]: only axial picks with several planes
    assert [int((plane[keep] == p).sum()) for p in range(3)] == [2, 2, 2]
    keep7 = build_selector(name, VoteMIConfig(k=3), 7)(slices, plane).keep
    assert [int((plane[keep7] == p).sum()) for p in range(3)] == [3, 2, 2]


def test_votek_keeps_vote_mi_numbers() -> None:
    from medvlm3d.data.select.votek import intensity_features, vote_k

    slices, plane = phantom_slices(planes=1, n=12)
    feats = intensity_features(slices, 16)
    ref = vote_k(feats, 3, 4).picks
    assert build_selector("votek", VoteMIConfig(k=3), 4)(slices, plane).keep.tolist() == sorted(ref)


def test_random_is_seeded_per_sample_and_never_uses_the_global_rng() -> None:
    slices, plane = phantom_slices(planes=1, n=20)
    sel = build_selector("random", VoteMIConfig(seed=7), 4)
    torch.manual_seed(0)
    a = sel(slices, plane, index=1).keep
    state = torch.get_rng_state()
    torch.manual_seed(123)
    b = sel(slices, plane, index=1).keep
    assert torch.equal(a, b)
    assert not torch.equal(torch.get_rng_state(), state)  # sanity: the seed did change the global RNG
    s2 = torch.get_rng_state()
    sel(slices, plane, index=1)
    assert torch.equal(torch.get_rng_state(), s2)  # and the selector did not draw from it
    picks = {tuple(sel(slices, plane, index=i).keep.tolist()) for i in range(8)}
    assert len(picks) > 1  # different samples, different picks


def test_unknown_selector_and_encoder_features_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown selector 'nope'.*votek"):
        build_selector("nope", VoteMIConfig(), 4)
    with pytest.raises(ConfigError, match="data side"):
        load_config("tiny", ["model.vote_mi.features=encoder"])
    with pytest.raises(ConfigError, match="preselect_k"):
        load_config("tiny", ["model.preselect_k=-1"])


# ------------------------------------------------------------------------------ batch and model


def _dataset(model: Any, records: list[dict], teacher: bool = True) -> StudyDataset:
    plan = SelectionPlan.from_config(model.cfg.model, teacher=teacher)
    return StudyDataset(records, model.cfg.data, model.tokenizer, model.num_visual_tokens, selection=plan)


def test_collated_teacher_and_slice_keep(tiny_cfg, phantom_records: list[dict]) -> None:
    model = build_model(tiny_cfg("model.variant=2d_only", "data.planes=[axial,coronal,sagittal]"))
    ds = _dataset(model, phantom_records[:2])
    samples = [ds[0], ds[1]]
    samples[1] = {**samples[1]}
    from medvlm3d.data.select.step import restrict

    samples[1] = restrict(samples[1], torch.arange(20)[None], SelectionPlan.from_config(model.cfg.model, True), 1)
    batch = Collator(model.tokenizer.pad_token_id)(samples)
    n_picks = model.cfg.model.vote_mi.num_picks
    s = batch["slice_mask"].shape[1]
    assert batch["teacher"].shape == (2, s) and batch["slice_keep"].shape == (2, n_picks)
    torch.testing.assert_close(batch["teacher"].sum(1), torch.ones(2))
    assert torch.all(batch["teacher"][~batch["slice_mask"]] == 0)  # padded slices of sample 1 get 0
    assert int(batch["slice_mask"][1].sum()) == 20
    planes = batch["slice_plane"].gather(1, batch["slice_keep"])
    assert set(planes[0].tolist()) == {0, 1, 2}  # picks from every plane
    out = model(**batch)
    assert out.logits.shape[0] == 2 and out.teacher is batch["teacher"]
    no_teacher = Collator(model.tokenizer.pad_token_id)([_dataset(model, phantom_records[:1], teacher=False)[0]])
    assert "teacher" not in no_teacher and "slice_keep" in no_teacher


def test_preselection_feeds_k_slices_to_the_slice_encoder(tiny_cfg, phantom_records: list[dict]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("model.preselect_k=4", "model.preselector=uniform")).eval()
    ds = _dataset(model, phantom_records[:2])
    sample = ds[0]
    assert sample["slices"].shape[1] == 4 and sample["volume"].shape[2:] == (16, 32, 32)
    assert sample["slice_index"][0].tolist() == [2, 6, 10, 14]  # the kept slices keep their own index
    seen: list[tuple[int, ...]] = []
    hook = model.slice_encoder.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            out = model(**Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]]))
    finally:
        hook.remove()
    assert seen and seen[0][:2] == (2, 4)
    assert out.scores.shape == (2, 4) and out.teacher.shape == (2, 4)


def test_generate_equals_forward(tiny_cfg, phantom_records: list[dict]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("model.preselect_k=5")).eval()
    rec = phantom_records[0]
    ds = _dataset(model, [rec], teacher=True)
    sample = ds[0]
    gen = model.generate(volume=sample["volume"][0], prompt=sample["question"], max_new_tokens=1)
    from medvlm3d.model.generation import generation_batch

    batch = generation_batch(model, [sample], [sample["question"]])
    with torch.no_grad():
        out = model(batch)
    torch.testing.assert_close(gen.scores, out.scores[0])
    torch.testing.assert_close(gen.teacher, out.teacher[0])
    assert gen.slice_index.tolist() == sample["slice_index"][0].tolist()
    with pytest.raises(ValueError, match="unknown keys"):
        model(**{**Collator(model.tokenizer.pad_token_id)([sample]), "bogus": 1})


def test_selection_is_cached_beside_the_volume(tiny_cfg, phantom_records: list[dict], tmp_path, monkeypatch) -> None:
    model = build_model(tiny_cfg("model.preselect_k=5", f"data.cache_dir={tmp_path}"))
    ds = _dataset(model, phantom_records[:1])
    first = ds[0]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files if ".select-" in f]) == 1 and len(files) == 2  # volume + selection
    calls: list[int] = []
    real = ds.selection.preselect
    monkeypatch.setattr(ds.selection, "preselect", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = ds[0]
    assert calls == []  # read back, not recomputed
    for key in ("slices", "slice_index", "teacher"):
        assert torch.equal(first[key], again[key])
