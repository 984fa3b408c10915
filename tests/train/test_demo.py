"""`medvlm3d demo` end to end at toy sizes: every stage runs from the previous export, the
held-out split is evaluated, and the four figures land in report.json and the printed table."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medvlm3d.cli import main
from medvlm3d.config import load_config
from medvlm3d.train.demo import LABELLED_SETTINGS, STAGE_SETTINGS, STAGES, TARGETS


def test_stage_settings_name_known_stages_and_load() -> None:
    assert set(STAGE_SETTINGS) <= set(STAGES) and set(LABELLED_SETTINGS) <= set(STAGES)
    for stage in STAGES:
        settings = [*STAGE_SETTINGS.get(stage, ()), *LABELLED_SETTINGS.get(stage, ())]
        cfg = load_config("demo", settings, layers=[stage])
        assert cfg.train.stage == stage and cfg.train.max_steps > 0
    # TG-IS's own rate in stages 1-2 (above the stage's lr in stage 2), and its sharper temperature
    s1 = load_config("demo", list(LABELLED_SETTINGS["stage1_align"]), layers=["stage1_align"])
    s2 = load_config("demo", list(LABELLED_SETTINGS["stage2_finetune"]), layers=["stage2_finetune"])
    assert s1.train.lr_per_component["tgis"] > s1.train.lr and s2.train.lr_per_component["tgis"] > s2.train.lr
    assert load_config("demo").model.tgis.tau == 1.0 and load_config("demo_unsupervised").model.tgis.tau == 5.0


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


def test_a_stopped_demo_stops_and_a_second_run_continues(tmp_path: Path, monkeypatch, capsys) -> None:
    # The stages are faked (the real signal path is tested in test_recipe_training.py): stage1
    # is stopped by a signal the first time; the demo must not go on to stage 2 from it.
    from medvlm3d.train import demo, recipe
    from medvlm3d.train.loop import TrainingStopped

    calls: list[tuple[str, str, str]] = []
    stopped: list[str] = []

    def fake_run_training(cfg):
        stage, run = cfg.train.stage, Path(cfg.train.output_dir)
        calls.append((stage, cfg.train.resume, cfg.train.init_from))
        if stage == "stage1_align" and not stopped:
            stopped.append(stage)
            raise TrainingStopped(f"stopped on a signal after step 3 of 300; checkpoint {run}/checkpoints/step-000003",
                                  run / "checkpoints" / "step-000003" / "model")
        (run / "final").mkdir(parents=True)
        (run / "final" / "checkpoint.json").write_text("{}")
        return run / "final"

    monkeypatch.setattr(recipe, "run_training", fake_run_training)
    monkeypatch.setattr(demo, "evaluate_demo", lambda final, test, out, meteor=False: {
        "figures": {k: 1.0 for k in TARGETS}})
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-train", "4", "--n-test", "2"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"medvlm3d demo --out {out}" in err and "step 3 of 300" in err
    assert [c[0] for c in calls] == ["stage0_text", "stage0_clip", "stage1_align"]
    tok = (out / "tokenizer" / "tokenizer.json").read_bytes()
    volumes = {p.name: p.stat().st_mtime_ns for p in (out / "data" / "train" / "volumes").iterdir()}

    calls.clear()
    assert main(args) == 0
    # the finished stages are not run again; the stopped one resumes; stage 2 starts from its export
    assert [c[0] for c in calls] == ["stage1_align", "stage2_finetune"]
    assert all(c[1] == "auto" for c in calls)
    assert calls[0][2] == str(out / "stage0_clip" / "final") and calls[1][2] == str(out / "stage1_align" / "final")
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tok  # data and tokenizer reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data" / "train" / "volumes").iterdir()} == volumes
    assert (out / "report.json").is_file()


def test_labelled_settings_reach_the_supervised_demo_only(tmp_path: Path, monkeypatch) -> None:
    import medvlm3d.train.recipe as recipe
    from medvlm3d.train.demo import run_stages

    seen: dict[tuple[bool, str], object] = {}

    def fake_training(cfg):
        seen[(flag, cfg.train.stage)] = cfg
        return tmp_path / cfg.train.stage / "final"

    monkeypatch.setattr(recipe, "run_training", fake_training)
    manifest, tok = tmp_path / "manifest.jsonl", tmp_path / "tok"
    for flag in (True, False):
        run_stages(tmp_path / str(flag), manifest, tok, labelled=flag)
    s2, s2_plain = seen[(True, "stage2_finetune")], seen[(False, "stage2_finetune")]
    assert s2.train.lr == 5.0e-4 and s2.train.lr_per_component == {"tgis": 1.0e-3}
    assert s2_plain.train.lr == 1.0e-3 and s2_plain.train.lr_per_component == {}
    assert seen[(True, "stage1_align")].train.lr_per_component == {"tgis": 1.0e-2}
    assert seen[(False, "stage1_align")].train.lr_per_component == {}
    assert s2.train.max_steps == s2_plain.train.max_steps == 1100  # STAGE_SETTINGS reach both
