"""The command line as a layer: every verb's --help, and the one exit-code policy
(0 ok, 2 bad input or config with one `error:` line and no traceback, 1 a bug with a traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medvlm3d.cli import VERBS, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_help_exits_0(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert f"usage: medvlm3d {verb}" in capsys.readouterr().out


def test_console_script_help_in_a_subprocess() -> None:
    exe = Path(sys.executable).with_name("medvlm3d")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medvlm3d"]
    r = subprocess.run([*cmd, "select", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--neighbours" in r.stdout, r.stderr
    r = subprocess.run([*cmd, "no-such-verb"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def assert_bad_input(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_unknown_config_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--config", "tiny", f"train.output_dir={tmp_path}", "train.no_such_key=1"])
    assert_bad_input(code, capsys.readouterr().err, "no_such_key")
    code = main(["estimate", "--config", "tiny", "model.no_such_key=1"])
    assert_bad_input(code, capsys.readouterr().err, "no_such_key")


def test_unknown_config_key_in_a_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint.json").write_text('{"format_version": 1, "llm_layout": "base"}')
    (ckpt / "config.yaml").write_text("model:\n  no_such_key: 1\n")
    from safetensors.torch import save_file

    save_file({}, str(ckpt / "model.safetensors"))  # a readable (empty) weights file: the config is what is wrong
    code = main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "m.jsonl"), "--task", "report"])
    assert_bad_input(code, capsys.readouterr().err, "no_such_key")


@pytest.mark.parametrize("verb", ["infer", "select"])
def test_missing_volume_exits_2(verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nowhere.nii.gz")
    args = {"infer": ["infer", "--checkpoint", str(tmp_path), "--volume", missing, "--prompt", "q?"],
            "select": ["select", "--volume", missing, "--out", str(tmp_path / "sel")]}[verb]
    assert_bad_input(main(args), capsys.readouterr().err, "nowhere.nii.gz: volume file or folder not found")


@pytest.mark.parametrize("verb", ["eval", "infer", "export"])
def test_missing_checkpoint_exits_2(verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no_ckpt")
    args = {"eval": ["eval", "--checkpoint", missing, "--data", str(tmp_path / "m.jsonl"), "--task", "report"],
            "infer": ["infer", "--checkpoint", missing, "--volume", str(tmp_path), "--prompt", "q?"],
            "export": ["export", "--checkpoint", missing, "--out", str(tmp_path / "out")]}[verb]
    assert_bad_input(main(args), capsys.readouterr().err, "no_ckpt: checkpoint folder not found")


def test_argparse_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["select", "--k", "three"])
    assert e.value.code == 2


def test_unexpected_exception_is_a_bug_exit_1_with_traceback(tmp_path: Path, monkeypatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import medvlm3d.eval.infer as infer_lib

    def broken(*args, **kwargs):
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(infer_lib, "select", broken)
    assert main(["select", "--volume", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an unexpected failure" in err


def test_training_diverged_exits_3_and_interrupt_130(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    import medvlm3d.train.recipe as recipe
    from medvlm3d.train.loop import TrainingDiverged

    def diverge(cfg):
        raise TrainingDiverged("loss is nan for 3 steps")

    monkeypatch.setattr(recipe, "run_training", diverge)
    assert main(["train", "--config", "tiny"]) == 3
    assert "error: training diverged: loss is nan" in capsys.readouterr().err

    def interrupt(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "run_training", interrupt)
    assert main(["train", "--config", "tiny"]) == 130


def test_eval_verb_tasks_match_the_library() -> None:
    from medvlm3d.cli.eval import TASKS
    from medvlm3d.eval.runner import TASKS as LIBRARY_TASKS

    assert TASKS == LIBRARY_TASKS


def test_infer_verb_tasks_match_the_library() -> None:
    from medvlm3d.cli.infer import TASKS
    from medvlm3d.eval.infer import TASKS as LIBRARY_TASKS

    assert TASKS == LIBRARY_TASKS
