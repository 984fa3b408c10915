"""Tests for training runs (train/recipe.py, train/loop.py) on one process.

The tiny config (configs/tiny.yaml) trains on the session's phantom studies and tokenizer
(tests/conftest.py). Runs happen in this process (Accelerate's singletons are reset after each
test), except the one that is SIGKILLed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medvlm3d.train import loop as loop_mod
from medvlm3d.train.checkpointing import MARKER, latest_complete, read_progress
from medvlm3d.train.recipe import run_training

from recipe_helpers import history, metrics, tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/train/conftest.py


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
    with pytest.raises(loop_mod.TrainingStopped, match=r"after step 2 of 5.*train.resume=auto") as stopped:
        run_training(tiny(phantom, run, "stage1_align", "four", "train.max_steps=5"))
    out = stopped.value.checkpoint
    assert isinstance(stopped.value, KeyboardInterrupt)  # the CLI exits 130; a stage chain stops
    assert out == run / "checkpoints" / "step-000002" / "model" and (out / "model.safetensors").is_file()
    assert not (run / "final").exists() and read_progress(latest_complete(run))["step"] == 2
    assert [r["step"] for r in metrics(run)] == [1, 2]
    monkeypatch.setattr(loop_mod.Loop, "step", real)
    final = run_training(tiny(phantom, run, "stage1_align", "four", "train.max_steps=5", "train.resume=auto"))
    assert final == run / "final" and len(history(run)) == 5
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_train_verb_exits_130_on_a_signal_and_says_how_to_continue(phantom, tmp_path, monkeypatch, capsys,
                                                                    signum) -> None:
    from medvlm3d.cli import main

    real = loop_mod.Loop.step

    def step(self, batches, stop):
        if self.progress.step == 0:
            os.kill(os.getpid(), signum)
        return real(self, batches, stop)

    monkeypatch.setattr(loop_mod.Loop, "step", step)
    run = tmp_path / "run"
    code = main(["train", "--config", "tiny", "--stage", "stage1_align", f"model.llm.tokenizer={phantom['tok']}",
                 f"data.train={phantom['four']}", f"train.output_dir={run}", "train.max_steps=4"])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted: stopped on a signal after step 1 of 4" in err and "train.resume=auto" in err
    assert read_progress(latest_complete(run))["step"] == 1 and not (run / "final").exists()


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
