"""Tests for the training recipe (train/recipe.py, train/loop.py, train/data.py) on one process.

The tiny config (configs/tiny.yaml) trains on the session's phantom studies and tokenizer
(tests/conftest.py). Runs happen in this process (Accelerate's singletons are reset after each
test), except the one that is SIGKILLed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medvlm3d.config import load_config
from medvlm3d.data.errors import DataError
from medvlm3d.data.readers import read_records, write_manifest
from medvlm3d.train import loop as loop_mod
from medvlm3d.train.checkpointing import MARKER, latest_complete, read_progress
from medvlm3d.train.data import EpochSampler, TextCollator, TextDataset
from medvlm3d.train.recipe import param_groups, run_training

@pytest.fixture(scope="session")
def phantom(tmp_path_factory, phantom_manifest, phantom_records, tiny_tokenizer_dir) -> dict[str, Path]:
    """The shared phantom studies (tests/conftest.py) with a 10-record and a 4-record subset."""
    root = phantom_manifest.parent  # beside the studies: their paths stay inside the manifest's folder
    return {"all": phantom_manifest, "ten": write_manifest(phantom_records[:10], root / "ten.jsonl"),
            "four": write_manifest(phantom_records[:4], root / "four.jsonl"), "tok": tiny_tokenizer_dir}


def tiny(phantom: dict[str, Path], out: Path, stage: str, data: str = "all", *overrides: str):
    return load_config("tiny", [f"model.llm.tokenizer={phantom['tok']}", f"data.train={phantom[data]}",
                                f"train.output_dir={out}", "train.log_every=1", *overrides], layers=[stage])


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def history(run: Path) -> list[float | None]:
    return read_progress(latest_complete(run))["loss_history"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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


# ------------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
def test_training_lowers_the_loss_on_a_fixed_batch_set(phantom, tmp_path) -> None:
    # 4 records, batch 2: the same 2 batches again and again. (A LoRA r=8 adapter on this tiny
    # random LLM learns too slowly to show in 30 steps, so the LLM trains in full here.)
    cfg = tiny(phantom, tmp_path / "run", "stage2_finetune", "four", "train.max_steps=30", "train.lr=0.003",
               "train.warmup_steps=2", "train.slice_loss_weight=0.5", "train.distill_schedule=constant",
               "model.trainable.llm=full")
    final = run_training(cfg)
    losses = history(tmp_path / "run")
    assert len(losses) == 30 and all(v is not None for v in losses)
    rows = metrics(tmp_path / "run")
    assert [r["loss"] for r in rows] == losses and [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "lm", "distill", "kl", "lambda", "slice", "slice_nll", "lr", "samples_per_s", "grad_norm", "data_wait_frac"} <= set(rows[0])
    assert all(0.0 <= r["data_wait_frac"] < 1.0 for r in rows)
    for key in ("loss", "lm"):
        start, end = (sum(r[key] for r in part) / 3 for part in (rows[:3], rows[-3:]))
        assert end < 0.85 * start, (key, start, end)  # measured: loss 7.6 -> 5.2, lm 5.9 -> 4.2
    r = rows[-1]
    assert r["loss"] == pytest.approx(r["lm"] + r["distill"] + r["slice"], rel=1e-6)  # logged = backpropagated
    assert r["distill"] == pytest.approx(r["lambda"] * r["kl"], rel=1e-5)
    assert r["slice"] == pytest.approx(0.5 * r["slice_nll"], rel=1e-5)
    assert (final / "llm" / "model.safetensors").is_file() and (final / "model.safetensors").is_file()
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_grad_accumulation_equals_the_bigger_batch(phantom, tmp_path) -> None:
    # The LM term is normalised by the supervised tokens of the whole step, so 2 micro-batches of 1
    # give the step of one batch of 2 (a mean of per-micro-batch means would not).
    common = ["train.max_steps=3", "model.trainable.llm=full", "train.slice_loss_weight=0.5"]
    run_training(tiny(phantom, tmp_path / "b2", "stage2_finetune", "four", *common, "train.batch_size=2"))
    run_training(tiny(phantom, tmp_path / "ga2", "stage2_finetune", "four", *common, "train.batch_size=1",
                      "train.grad_accum=2"))
    assert history(tmp_path / "ga2") == pytest.approx(history(tmp_path / "b2"), rel=1e-5)
    assert read_progress(latest_complete(tmp_path / "ga2"))["samples"] == 6


def test_feature_cache_gives_the_same_steps(phantom, tmp_path, monkeypatch) -> None:
    # 4 records, batch 2, 6 steps: every study comes back, so the frozen encoders run on new
    # inputs only; the steps equal those of a run without the cache
    from medvlm3d.model.feature_cache import FeatureCache

    seen: list[tuple[str, int, int]] = []
    run = FeatureCache.run

    def spy(self, name, module, *inputs, **kw):
        out = run(self, name, module, *inputs, **kw)
        seen.append((name, self.hits, self.misses))
        return out

    monkeypatch.setattr(FeatureCache, "run", spy)
    common = ["train.max_steps=6", "train.batch_size=2", "model.trainable.llm=full", "train.slice_loss_weight=0.5"]
    run_training(tiny(phantom, tmp_path / "plain", "stage2_finetune", "four", *common))
    assert seen == []
    run_training(tiny(phantom, tmp_path / "cached", "stage2_finetune", "four", *common, "train.feature_cache_mb=64"))
    # both encoders: computed once per study, reused after (the teacher is computed on the data side)
    assert {name for name, _, _ in seen} == {"encoder3d", "slice_encoder"}
    hits, misses = seen[-1][1:]
    assert misses <= 2 * 4 and hits >= 2 * 2 * 4
    assert history(tmp_path / "cached") == pytest.approx(history(tmp_path / "plain"), rel=1e-5)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_steps(phantom, tmp_path) -> None:
    common = ["train.max_steps=2", "model.trainable.llm=full"]
    run_training(tiny(phantom, tmp_path / "plain", "stage2_finetune", "four", *common))
    run_training(tiny(phantom, tmp_path / "ckpt", "stage2_finetune", "four", *common,
                      "model.llm.gradient_checkpointing=true"))
    assert history(tmp_path / "ckpt") == pytest.approx(history(tmp_path / "plain"), rel=1e-6)


def test_fresh_start_refuses_a_run_folder_with_checkpoints(phantom, tmp_path) -> None:
    cfg = tiny(phantom, tmp_path / "run", "stage1_align", "four", "train.max_steps=1")
    run_training(cfg)
    with pytest.raises(ValueError, match="train.resume=auto"):
        run_training(cfg)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_training(tiny(phantom, tmp_path / "run", "stage1_align", "four", f"train.resume={tmp_path}"))


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(phantom, tmp_path, monkeypatch) -> None:
    # 10 records, batch 2: 5 steps per epoch; checkpoints every 3 steps (mid-epoch); 12 steps cross
    # two epoch boundaries, and leave the killed run 9 steps of margin after its first checkpoint.
    common = ["train.max_steps=12", "train.save_every=3", "train.keep_last=5"]
    run_training(tiny(phantom, tmp_path / "full", "stage2_finetune", "ten", *common))
    expected = history(tmp_path / "full")

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "medvlm3d.train", "--config", "tiny", "--stage", "stage2_finetune",
            f"model.llm.tokenizer={phantom['tok']}", f"data.train={phantom['ten']}", f"train.output_dir={run}",
            "train.log_every=1", *common]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = run / "checkpoints" / "step-000003" / MARKER
    deadline = time.monotonic() + 240
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (run / "final").exists()
    resumed_from = read_progress(latest_complete(run))["step"]
    assert 3 <= resumed_from < 12

    from medvlm3d.data.dataset import StudyDataset

    loaded = []
    original = StudyDataset.__getitem__
    monkeypatch.setattr(StudyDataset, "__getitem__", lambda self, i: loaded.append(i) or original(self, i))
    run_training(tiny(phantom, run, "stage2_finetune", "ten", *common, "train.resume=auto"))
    assert history(run) == expected  # exact, float for float
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tmp_path / "full")]
    # the consumed batches were skipped, not loaded (+1 batch: the loader reads one ahead)
    assert len(loaded) <= (12 - resumed_from + 1) * 2


def test_nonfinite_steps_are_skipped_then_abort(phantom, tmp_path, monkeypatch) -> None:
    from medvlm3d.cli import main

    real = loop_mod.micro_batch_loss

    def poisoned(model, batch, cfg, step, *rest):
        loss, terms = real(model, batch, cfg, step, *rest)
        return (loss * float("nan"), terms) if step in bad_steps else (loss, terms)

    monkeypatch.setattr(loop_mod, "micro_batch_loss", poisoned)
    bad_steps = {1}  # 0-based: the second step
    run_training(tiny(phantom, tmp_path / "once", "stage1_align", "four", "train.max_steps=3",
                      "train.nan_abort_after=2"))
    losses = history(tmp_path / "once")
    assert losses[1] is None and losses[0] is not None and losses[2] is not None
    assert [r["skipped"] for r in metrics(tmp_path / "once")] == [False, True, False]

    bad_steps = {1, 2, 3}
    run = tmp_path / "diverged"
    code = main(["train", "--config", "tiny", "--stage", "stage1_align", f"model.llm.tokenizer={phantom['tok']}",
                 f"data.train={phantom['four']}", f"train.output_dir={run}", "train.max_steps=6",
                 "train.nan_abort_after=2", "train.save_every=1", "train.keep_last=5"])
    assert code == 3
    assert read_progress(latest_complete(run))["step"] == 3 and not (run / "final").exists()
    from safetensors.torch import load_file

    good = load_file(run / "checkpoints" / "step-000001" / "trainer_state" / "model.safetensors")
    last = load_file(run / "checkpoints" / "step-000003" / "trainer_state" / "model.safetensors")
    assert all(torch.equal(good[k], last[k]) for k in good)  # skipped steps changed nothing


def test_sigterm_saves_at_the_step_boundary_and_resume_finishes(phantom, tmp_path, monkeypatch) -> None:
    real = loop_mod.Loop.step

    def step(self, batches, stop):
        if self.progress.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches, stop)

    monkeypatch.setattr(loop_mod.Loop, "step", step)
    run = tmp_path / "run"
    out = run_training(tiny(phantom, run, "stage1_align", "four", "train.max_steps=5"))
    assert out == run / "checkpoints" / "step-000002" / "model" and (out / "model.safetensors").is_file()
    assert not (run / "final").exists() and read_progress(latest_complete(run))["step"] == 2
    monkeypatch.setattr(loop_mod.Loop, "step", real)
    final = run_training(tiny(phantom, run, "stage1_align", "four", "train.max_steps=5", "train.resume=auto"))
    assert final == run / "final" and len(history(run)) == 5


@pytest.mark.slow
def test_all_stages_chain_through_their_exports(phantom, tmp_path) -> None:
    from safetensors.torch import load_file

    from medvlm3d.model.checkpoint import load_pretrained

    stages = ["stage0_text"]
    if importlib.util.find_spec("medvlm3d.train.clip") is not None:
        stages.append("stage0_clip")
    stages += ["stage1_align", "stage2_finetune"]
    previous = ""
    finals = {}
    for stage in stages:
        cfg = tiny(phantom, tmp_path / stage, stage, "all", "train.max_steps=3", "train.batch_size=2",
                   f"train.init_from={previous}")
        previous = str(run_training(cfg))
        finals[stage] = Path(previous)
    s0 = load_file(finals["stage0_text"] / "llm" / "model.safetensors")
    s1 = load_file(finals["stage1_align"] / "llm" / "model.safetensors")
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # stage 1 keeps the LLM frozen
    p1 = load_file(finals["stage1_align"] / "model.safetensors")
    before = load_file(finals[stages[stages.index("stage1_align") - 1]] / "model.safetensors")
    assert not torch.equal(p1["projector3d.mlp.0.weight"], before["projector3d.mlp.0.weight"])
    assert torch.equal(p1["encoder3d.net.patch_embedding.patch_embeddings.weight"],
                       before["encoder3d.net.patch_embedding.patch_embeddings.weight"])  # frozen
    model = load_pretrained(finals["stage2_finetune"])
    assert (finals["stage2_finetune"] / "adapter").is_dir()
    assert model.cfg.train.stage == "stage2_finetune"


def test_train_verb_help_and_bad_config(tmp_path, capsys) -> None:
    from medvlm3d.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--stage" in capsys.readouterr().out
    assert main(["train", "--config", "tiny", "train.no_such_key=1"]) == 2
    assert main(["train", "--config", "tiny", f"train.output_dir={tmp_path}", "data.train="]) == 2
