"""`medvlm3d demo` end to end at toy sizes: every stage runs from the previous export, the
held-out split is evaluated, and the four figures land in report.json and the printed table."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medvlm3d.cli import main
from medvlm3d.config import load_config
from medvlm3d.train.demo import STAGE_SETTINGS, STAGES, TARGETS


def test_stage_settings_name_known_stages_and_load() -> None:
    assert set(STAGE_SETTINGS) <= set(STAGES)
    for stage, settings in STAGE_SETTINGS.items():
        cfg = load_config("demo", list(settings), layers=[stage])
        assert cfg.train.stage == stage and cfg.train.max_steps > 0


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_the_four_figures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--n-train", "6", "--n-test", "3", "--set",
               "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1", "eval.max_new_tokens=12"])
    assert rc == 0
    for stage in STAGES:
        assert (out / stage / "final" / "checkpoint.json").is_file(), stage
    report = json.loads((out / "report.json").read_text())
    assert set(report["figures"]) == set(TARGETS)
    figs = report["figures"]
    assert 0.0 <= figs["closed_vqa_accuracy"] <= 1.0 and 0.0 <= figs["slice_mass"] <= 1.0
    assert -1.0 <= figs["blind_drop"] <= 1.0 and 0.0 <= figs["presence_f1"] <= 1.0
    printed = capsys.readouterr().out
    assert all(key in printed for key in TARGETS) and "checkpoint:" in printed
    digests = {split: {hashlib.sha256(f.read_bytes()).hexdigest() for f in (out / "data" / split / "volumes").iterdir()}
               for split in ("train", "test")}
    assert len(digests["train"]) == 6 and len(digests["test"]) == 3 and not (digests["train"] & digests["test"])
