"""Faults of a run folder (train/runfolder.py, train/checkpointing.py, the CLI's exit codes):
one run per folder, a metrics log that survives torn lines and kills, and a full disk during a
checkpoint. Training runs use the tiny config on the shared phantom studies."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medvlm3d.cli import guarded, main
from medvlm3d.io import NoSpaceLeft, is_no_space
from medvlm3d.train import checkpointing
from medvlm3d.train.checkpointing import complete_checkpoints, latest_complete, read_progress, write_checkpoint
from medvlm3d.train.recipe import run_training
from medvlm3d.train.runfolder import RunFolderBusy, lock_run_folder, read_metrics, reset_metrics

from recipe_helpers import metrics, tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/train/conftest.py

HOLDER = textwrap.dedent("""
    import sys, time
    from medvlm3d.train.runfolder import lock_run_folder
    lock = lock_run_folder(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(folder: Path) -> subprocess.Popen:
    """A second process that takes the folder's lock and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------------------------------------
# one run per folder


def test_a_second_process_is_refused_naming_the_folder_and_pid(tmp_path: Path) -> None:
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy) as e:
            lock_run_folder(tmp_path / "run")
        assert f"PID {proc.pid}" in str(e.value) and str(tmp_path / "run") in str(e.value)
        assert isinstance(e.value, ValueError)  # a ConfigError: exit 2 on the CLI
        with lock_run_folder(tmp_path / "other"):  # another folder is free
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc = _holder(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / ".lock").is_file()  # the file stays; the kernel dropped the lock
    with lock_run_folder(tmp_path / "run") as lock:
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
    lock.release()  # twice is harmless
    with lock_run_folder(tmp_path / "run"):  # released at the end of the block
        pass


def test_train_into_a_busy_folder_exits_2_at_once(phantom, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        t0 = time.monotonic()
        code = main(["train", "--config", "tiny", "--stage", "stage1_align", f"model.llm.tokenizer={phantom['tok']}",
                     f"data.train={phantom['four']}", f"train.output_dir={run}", "train.max_steps=1"])
        assert code == 2 and time.monotonic() - t0 < 60
        err = capsys.readouterr().err
        assert f"PID {proc.pid}" in err and str(run) in err and "Traceback" not in err
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone: the same command now trains, and leaves the lock free
    run_training(tiny(phantom, run, "stage1_align", "four", "train.max_steps=1"))
    with lock_run_folder(run):
        pass


# ------------------------------------------------------------------------------------------------
# metrics.jsonl


def _rows(path: Path, steps: range, torn: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + torn)


@pytest.mark.parametrize("torn", ['{"step": 7, "lo', '{"step": 7, "loss": 0.1', "\x00\x00\x00", '[1, 2]\n'])
def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path: Path, torn: str, caplog) -> None:
    path = tmp_path / "metrics.jsonl"
    _rows(path, range(1, 7), torn)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6]
    assert f"{path} line 7" in caplog.text
    assert reset_metrics(path, 4) == 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_reset_is_atomic_and_a_fresh_start_empties_the_log(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.jsonl"
    _rows(path, range(1, 9))
    before = path.read_bytes()

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # a kill between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        reset_metrics(path, 3)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert reset_metrics(path, 0) == 0 and path.read_text() == ""
    assert reset_metrics(tmp_path / "absent.jsonl", 5) == 0


def test_resume_over_a_torn_metrics_log_loses_no_row(phantom, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["train.max_steps=4", "train.save_every=2", "train.keep_last=5"]
    run_training(tiny(phantom, run, "stage1_align", "four", *common))
    full = metrics(run)
    # as if killed during step 3's row, after the step-2 checkpoint: rows 1-2, then a torn row 3
    for p in complete_checkpoints(run)[1:]:
        checkpointing._discard(p)
    (run / "final").rename(tmp_path / "old-final")
    path = run / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in full[:2]) + json.dumps(full[2])[:25])
    run_training(tiny(phantom, run, "stage1_align", "four", *common, "train.resume=auto"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]  # the resumed steps are the same steps


# ------------------------------------------------------------------------------------------------
# a full disk during a checkpoint


def _write_ok(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "w.bin").write_bytes(b"x" * 100)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448"),
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
])
def test_disk_full_keeps_the_last_checkpoint_and_names_the_folder(tmp_path: Path, monkeypatch, failure) -> None:
    write_checkpoint(tmp_path, 1, {"step": 1}, _write_ok, keep_last=2)
    good = latest_complete(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1024, 1024))

    def fill(tmp: Path) -> None:
        _write_ok(tmp)  # half a checkpoint on disk, then the disk is full
        raise failure

    with pytest.raises(NoSpaceLeft, match=f"no space left on {tmp_path}") as e:
        write_checkpoint(tmp_path, 2, {"step": 2}, fill, keep_last=2)
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert latest_complete(tmp_path) == good and read_progress(good)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # no .tmp-step-2


def test_other_write_errors_are_not_called_a_full_disk(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # disk not full here

    with pytest.raises(RuntimeError, match="enforce fail"):
        write_checkpoint(tmp_path, 1, {"step": 1}, broken, keep_last=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert not is_no_space(ValueError("x")) and not is_no_space(OSError(errno.EACCES, "denied"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert is_no_space(outer)  # found through the cause


@pytest.mark.parametrize("exc, shown", [
    (NoSpaceLeft("/runs/x"), "error: no space left on /runs/x"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/y/metrics.jsonl"), "error: no space left on /runs/y/metrics.jsonl"),
])
def test_cli_disk_full_is_one_line_exit_2(exc: BaseException, shown: str, capsys) -> None:
    def run(_args):
        raise exc

    assert guarded(run, None) == 2
    err = capsys.readouterr().err
    assert err.strip() == shown


def test_train_disk_full_during_a_checkpoint_exits_2(phantom, tmp_path: Path, monkeypatch, capsys) -> None:
    from medvlm3d.train import recipe

    real = recipe.exporter

    def full_exporter(accelerator, model):
        export = real(accelerator, model)

        def export_full(path: Path) -> None:
            export(path)
            if "step-000002" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))
        return export_full

    monkeypatch.setattr(recipe, "exporter", full_exporter)
    run = tmp_path / "run"
    code = main(["train", "--config", "tiny", "--stage", "stage1_align", f"model.llm.tokenizer={phantom['tok']}",
                 f"data.train={phantom['four']}", f"train.output_dir={run}", "train.max_steps=3", "train.save_every=1"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {run} (")
    assert [p.name for p in complete_checkpoints(run)] == ["step-000001"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    with lock_run_folder(run):  # the failed run let the folder go
        pass
