"""Exact resume with the shipped configs, not only tiny.yaml: a run that crashes (as after a kill:
no checkpoint at the moment of death) or is stopped by a signal, then resumes with
train.resume=auto, gives the same per-step losses, float for float, as an uninterrupted run.

The demo config draws per-sample randomness (data.shuffle_choices) and caches frozen encoder
features (train.feature_cache_mb): both must be functions of the sample alone (data/dataset.py:
sample_generator; model/feature_cache.py computes rows one at a time), since the loader reads a
batch ahead of each checkpoint (one DataLoader worker here, as in the demo's stage 2) and a
resumed run's cache starts empty. The paper configs run at tiny sizes (recipe_helpers.PAPER_TINY).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medvlm3d.config import load_config
from medvlm3d.train import loop as loop_mod
from medvlm3d.train.checkpointing import MARKER, latest_complete, read_progress
from medvlm3d.train.recipe import run_training

from recipe_helpers import PAPER_TINY, history, metrics

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/train/conftest.py

# The demo config at the phantoms' size; its model, data options and cache stay as shipped.
DEMO_SMALL = ["data.size=[16,32,32]", "data.slice_size=[32,32]", "train.batch_size=2", "train.warmup_steps=1",
              "train.log_every=1", "model.llm.num_layers=2", "data.num_workers=1",
              "data.max_text_len=256"]


class Crash(RuntimeError):
    """Stands in for a kill: the run dies between steps, without a checkpoint."""


def _interrupt(monkeypatch, at: int, how: str) -> None:
    real = loop_mod.Loop.step

    def step(self, batches, stop):
        if self.progress.step == at:
            if how == "crash":
                raise Crash(f"killed before step {at + 1}")
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches, stop)

    monkeypatch.setattr(loop_mod.Loop, "step", step)


def _interrupted_then_resumed(make, tmp_path: Path, monkeypatch, at: int, how: str, common: list[str]) -> Path:
    run = tmp_path / "resumed"
    _interrupt(monkeypatch, at, how)
    with pytest.raises(Crash if how == "crash" else loop_mod.TrainingStopped):
        run_training(make(run, *common))
    monkeypatch.undo()
    assert not (run / "final").exists()
    done = read_progress(latest_complete(run))["step"]
    assert done == (at + 1 if how == "stop" else at - at % 3) and done > 0  # a stop ends the step it is in
    run_training(make(run, *common, "train.resume=auto"))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage, how", [("stage2_finetune", "crash"), ("stage2_finetune", "stop"),
                                        ("stage0_text", "crash")])
def test_demo_config_resumes_exactly(phantom, tmp_path: Path, monkeypatch, stage: str, how: str) -> None:
    def make(out: Path, *extra: str):
        return load_config("demo", [f"model.llm.tokenizer={phantom['tok']}", f"data.train={phantom['ten']}",
                                    f"train.output_dir={out}", *DEMO_SMALL, *extra], layers=[stage])

    cfg = make(tmp_path / "x")
    assert cfg.data.shuffle_choices and cfg.train.feature_cache_mb > 0  # what this test is about
    # 10 records, batch 2: 5 steps an epoch; the interruption at step 4 and the checkpoint at step
    # 3 are mid-epoch, and the 8 steps cross an epoch boundary
    common = ["train.max_steps=8", "train.save_every=3", "train.keep_last=5"]
    run_training(make(tmp_path / "full", *common))
    run = _interrupted_then_resumed(make, tmp_path, monkeypatch, 4, how, common)
    assert history(run) == history(tmp_path / "full")  # exact, float for float
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tmp_path / "full")]
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))


@pytest.mark.slow
def test_demo_config_resumes_exactly_after_sigkill(phantom, tmp_path: Path) -> None:
    """A real kill (SIGKILL of `python -m medvlm3d.train --config demo`, one loader worker, the
    feature cache on), then train.resume=auto: the same losses as the uninterrupted run."""
    over = [f"model.llm.tokenizer={phantom['tok']}", f"data.train={phantom['ten']}", *DEMO_SMALL,
            "train.max_steps=8", "train.save_every=3", "train.keep_last=5"]
    run_training(load_config("demo", [*over, f"train.output_dir={tmp_path / 'full'}"], layers=["stage2_finetune"]))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "medvlm3d.train", "--config", "demo", "--stage", "stage2_finetune",
                             *over, f"train.output_dir={run}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    marker, deadline = run / "checkpoints" / "step-000003" / MARKER, time.monotonic() + 300
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (run / "final").exists() and 3 <= read_progress(latest_complete(run))["step"] < 8
    run_training(load_config("demo", [*over, f"train.output_dir={run}", "train.resume=auto"], layers=["stage2_finetune"]))
    assert history(run) == history(tmp_path / "full")  # exact, float for float
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tmp_path / "full")]


@pytest.mark.slow
@pytest.mark.parametrize("name, stage", [("med2e3", "stage2_finetune"), ("ms_vlm", "stage2_finetune")])
def test_paper_configs_resume_exactly(name: str, stage: str, phantom, tmp_path: Path, monkeypatch,
                                      tiny_bert: Path) -> None:
    def make(out: Path, *extra: str):
        return load_config(name, [*PAPER_TINY, f"model.llm.tokenizer={phantom['tok']}",
                                  f"model.tgis.text_encoder={tiny_bert}", f"data.train={phantom['ten']}",
                                  "data.num_workers=0", f"train.output_dir={out}", *extra], layers=[stage])

    common = ["train.max_steps=5", "train.save_every=3", "train.keep_last=5"]
    run_training(make(tmp_path / "full", *common))
    run = _interrupted_then_resumed(make, tmp_path, monkeypatch, 4, "crash", common)
    assert history(run) == history(tmp_path / "full")
