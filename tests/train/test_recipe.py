"""Tests for the training recipe's data pieces (train/data.py, train/recipe.py) on one process:
samplers, text datasets and collation, packed batches, length grouping, per-component lrs.

The tiny config (configs/tiny.yaml) uses the session's phantom studies and tokenizer
(tests/conftest.py; the `phantom` subsets in tests/train/conftest.py). Training runs are in
test_recipe_training.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from medvlm3d.data.errors import DataError
from medvlm3d.data.readers import read_records
from medvlm3d.train import loop as loop_mod
from medvlm3d.train.data import EpochSampler, TextCollator, TextDataset
from medvlm3d.train.recipe import param_groups

from recipe_helpers import tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/train/conftest.py


# ------------------------------------------------------------------------------------------------
# data pieces


def test_epoch_sampler_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochSampler(20, seed=3), EpochSampler(20, seed=3)
    first = list(a)
    assert sorted(first) == list(range(20)) and first == list(b)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(20))
    assert list(EpochSampler(20, seed=4)) != first
    assert list(EpochSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least one sample"):
        EpochSampler(0, seed=0)


def test_length_grouped_sampler_batches_samples_of_one_length() -> None:
    lengths = [int(x) for x in torch.randint(10, 100, (400,), generator=torch.Generator().manual_seed(0))]
    spread = lambda order: sum(max(lengths[i] for i in order[b:b + 8]) - min(lengths[i] for i in order[b:b + 8])
                               for b in range(0, 400, 8)) / 50  # noqa: E731
    plain, grouped = EpochSampler(400, seed=1), EpochSampler(400, seed=1, lengths=lengths, group=8, window=10)
    order = list(grouped)
    assert sorted(order) == list(range(400)) and order == list(EpochSampler(400, 1, lengths=lengths, group=8, window=10))
    assert spread(order) < 0.25 * spread(list(plain))  # measured: about 7 against 70
    window = set(list(plain)[:80])  # the first window of 10 batches holds the plain order's first 80
    assert set(order[:80]) == window
    firsts = [lengths[order[b]] for b in range(0, 80, 8)]
    assert firsts != sorted(firsts, reverse=True)  # the window's batches are shuffled, not longest first
    grouped.set_epoch(1)
    assert list(grouped) != order
    with pytest.raises(ValueError, match="lengths"):
        EpochSampler(4, seed=0, lengths=[1, 2])
    with pytest.raises(ValueError, match="group and window"):
        EpochSampler(4, seed=0, lengths=[1, 2, 3, 4], group=0)


def test_text_dataset_supervises_every_token_and_pads_with_ignore(phantom) -> None:
    from medvlm3d.model.llm import load_tokenizer

    cfg = tiny(phantom, Path("unused"), "stage0_text")
    tok = load_tokenizer(cfg.model.llm)
    ds = TextDataset(read_records(phantom["four"]), tok, max_len=64)
    item = ds[0]
    assert torch.equal(item["labels"], item["input_ids"]) and len(item["input_ids"]) <= 64
    # Token for token the image prompt without its image tokens, then the target and eos, as in
    # stages 1-2: not the jointly tokenized chat text, whose "assistant: B" merges the space.
    from medvlm3d.data.prompts import encode_example, encode_prompt, format_record, image_token_id

    rec = read_records(phantom["four"])[0]
    question, target = format_record(rec)
    with_image = encode_example(tok, question, target, num_image_tokens=3, max_len=512)["input_ids"]
    ids = TextDataset(read_records(phantom["four"]), tok, max_len=512)[0]["input_ids"].tolist()
    text_prompt, image_prompt = encode_prompt(tok, question, 3, n_images=0), encode_prompt(tok, question, 3)
    assert ids[: len(text_prompt)] == text_prompt and image_token_id(tok) not in ids
    assert ids[len(text_prompt):] == with_image[len(image_prompt):]  # target + eos, same tokens
    assert ids[-1] == tok.eos_token_id
    batch = TextCollator(tok.pad_token_id)([ds[0], ds[1]])
    short = int(batch["attention_mask"].sum(1).argmin())
    pad = batch["attention_mask"][short] == 0
    assert batch["input_ids"].shape == batch["labels"].shape
    assert bool((batch["labels"][short][pad] == -100).all())
    with pytest.raises(ValueError, match="max_len"):
        TextDataset([], tok, max_len=1)
    with pytest.raises(ValueError, match="pad_token_id"):
        TextCollator(-1)


def test_text_context_puts_the_study_report_before_each_question(phantom) -> None:
    from medvlm3d.model.llm import load_tokenizer

    cfg = tiny(phantom, Path("unused"), "stage0_text")
    tok = load_tokenizer(cfg.model.llm)
    records = read_records(phantom["four"])
    plain = TextDataset(records, tok, max_len=512)
    ctx = TextDataset(records, tok, max_len=512, context="report")
    reports = {r["image"]: r["answer"] for r in records if r["task"] == "report"}
    for i, rec in enumerate(records):
        text = tok.decode(ctx[i]["input_ids"].tolist(), skip_special_tokens=True)
        if rec["task"] == "report":
            assert torch.equal(ctx[i]["input_ids"], plain[i]["input_ids"])  # a report gets no context
            continue
        own = reports[rec["image"]]
        others = [r for img, r in reports.items() if img != rec["image"] and r != own]
        assert own in text and text.index(own) < text.index(rec["question"])
        assert not any(o in text for o in others)
        assert len(ctx[i]["input_ids"]) > len(plain[i]["input_ids"])
    orphan = [r for r in records if r["task"] == "vqa"][:1]
    with pytest.raises(DataError, match="no report record for the same image"):
        TextDataset(orphan, tok, max_len=512, context="report")
    with pytest.raises(ValueError, match="context must be"):
        TextDataset(records, tok, max_len=512, context="notes")
    with pytest.raises(ValueError, match="text_context"):
        tiny(phantom, Path("unused"), "stage0_text", "all", "data.text_context=notes")


def test_packed_text_batch_gives_the_padded_logits_and_loss(phantom) -> None:
    from medvlm3d.model.llm import load_tokenizer
    from medvlm3d.model.medvlm import build_model
    from medvlm3d.train.loop import lm_loss_function, supervised_tokens
    from medvlm3d.train.stages.text import TextLM

    cfg = tiny(phantom, Path("unused"), "stage0_text")
    tok = load_tokenizer(cfg.model.llm)
    ds = TextDataset(read_records(phantom["all"]), tok, max_len=512)  # long reports, short questions
    samples = [ds[i] for i in range(8)]
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 2  # reports and questions: something to pack
    padded = TextCollator(tok.pad_token_id)(samples)
    packed = TextCollator(tok.pad_token_id, pack=True)(samples)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    rows, width = packed["input_ids"].shape
    assert rows < len(samples) and width <= max(lengths)
    assert supervised_tokens(packed) == supervised_tokens(padded) == sum(n - 1 for n in lengths)
    # every sample once, in one row, positions 0..n-1, its first label ignored
    found = 0
    for r in range(rows):
        starts = (packed["position_ids"][r] == 0).nonzero().flatten().tolist() + [width]
        for a, b in zip(starts, starts[1:]):
            seg = packed["input_ids"][r, a:b].tolist()
            match = [i for i, s in enumerate(samples) if s["input_ids"].tolist() == seg]
            if not match:  # the padding tail
                assert set(seg) == {tok.pad_token_id} and (packed["labels"][r, a:b] == -100).all()
                continue
            found += 1
            assert packed["labels"][r, a] == -100 and torch.equal(packed["labels"][r, a + 1:b], samples[match[0]]["labels"][1:])
    assert found == len(samples)

    model = TextLM(build_model(cfg)).eval()
    lm_loss = lm_loss_function(model.vlm.llm)
    with torch.no_grad():
        lp, lk = model(**{k: v for k, v in padded.items() if k != "labels"}), model(**{k: v for k, v in packed.items() if k != "labels"})
    n = torch.tensor(supervised_tokens(padded))
    loss_p = lm_loss(lp, padded["labels"], vocab_size=lp.shape[-1], num_items_in_batch=n)
    loss_k = lm_loss(lk, packed["labels"], vocab_size=lk.shape[-1], num_items_in_batch=n)
    assert loss_k.item() == pytest.approx(loss_p.item(), rel=1e-5)
    # sample 0's logits: the same where it sits in its packed row (no attention to its neighbours)
    r, a = next((r, a) for r in range(rows) for a in (packed["position_ids"][r] == 0).nonzero().flatten().tolist()
                if packed["input_ids"][r, a:a + lengths[0]].tolist() == samples[0]["input_ids"].tolist())
    assert torch.allclose(lk[r, a:a + lengths[0]], lp[0, :lengths[0]], atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        TextCollator(tok.pad_token_id, pack=True)([])


@pytest.mark.parametrize("stage", ["stage0_text", "stage2_finetune"])
def test_group_by_length_cuts_the_padding_of_a_loader(phantom, stage) -> None:
    from medvlm3d.model.llm import load_tokenizer
    from medvlm3d.train.data import build_train_data, make_loader

    padding = {}
    for grouped in (False, True):
        cfg = tiny(phantom, Path("unused"), stage, "all", "train.batch_size=4", "data.text_packing=false",
                   f"train.group_by_length={grouped}")
        dataset, collate = build_train_data(cfg, load_tokenizer(cfg.model.llm), 4)
        loader, sampler = make_loader(dataset, collate, cfg)
        assert (sampler.lengths is not None) == grouped
        batches = list(loader)
        assert sum(len(b["input_ids"]) for b in batches) == len(dataset) // 4 * 4
        padding[grouped] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert padding[True] < 0.5 * padding[False], padding


def test_param_groups_use_per_component_lrs(phantom) -> None:
    from medvlm3d.model.medvlm import build_model

    cfg = tiny(phantom, Path("unused"), "stage2_finetune", "all", "train.lr_per_component={projector: 0.5}")
    vlm = build_model(cfg)
    groups = param_groups(vlm, vlm, cfg)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs["projector"] == 0.5 and lrs["tgis"] == cfg.train.lr
    assert "encoder3d" not in lrs  # frozen in stage 2
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in vlm.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="not model components"):
        param_groups(vlm, vlm, tiny(phantom, Path("unused"), "stage2_finetune", "all",
                                    "train.lr_per_component={head: 0.1}"))
    if importlib.util.find_spec("medvlm3d.train.clip") is not None:
        # stage 0 (clip): the contrastive model's own text tower and heads train as component "head"
        cfg = tiny(phantom, Path("unused"), "stage0_clip", "all", "train.lr_per_component={head: 0.1}")
        vlm = build_model(cfg)
        module = loop_mod.stage_module(vlm, cfg)
        groups = param_groups(module, vlm, cfg)
        assert {g["lr"] for g in groups if g["name"].startswith("head")} == {0.1}
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in module.parameters() if p.requires_grad}

