"""Kills at random moments during checkpoint writes never leave `latest_complete` pointing at a
half-written checkpoint, and the next write cleans up what a kill left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medvlm3d.train.checkpointing import complete_checkpoints, latest_complete, read_progress, write_checkpoint

# A writer that keeps saving checkpoints whose files are large enough (4 x 2 MiB, fsynced) that a
# kill often lands inside a write. Each file holds its step number, so a mixed folder is detectable.
WRITER = r"""
import sys
from pathlib import Path
from medvlm3d.train.checkpointing import write_checkpoint

root = Path(sys.argv[1]); start = int(sys.argv[2])
def contents(step):
    def write(tmp):
        for i in range(4):
            (tmp / f"part{i}.bin").write_bytes(step.to_bytes(4, "little") * (512 * 1024))
    return write
step = start
while True:
    step += 1
    write_checkpoint(root, step, {"step": step}, contents(step), keep_last=2)
    print(step, flush=True)
"""


def whole(ckpt: Path) -> bool:
    step = read_progress(ckpt)["step"]
    parts = sorted(ckpt.glob("part*.bin"))
    return len(parts) == 4 and all(p.read_bytes() == step.to_bytes(4, "little") * (512 * 1024) for p in parts)


@pytest.mark.slow
def test_repeated_kills_during_writes_never_expose_a_partial_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(0)
    last_step = 0
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(last_step)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint written by this writer
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        latest = latest_complete(tmp_path)
        assert latest is not None and whole(latest), f"kill {kills}: {latest} is not whole"
        assert all(whole(c) for c in complete_checkpoints(tmp_path))
        last_step = read_progress(latest)["step"]
    # The next successful write prunes leftovers of killed writes (temporaries, unmarked folders).
    write_checkpoint(tmp_path, last_step + 1, {"step": last_step + 1},
                     lambda tmp: (tmp / "part0.bin").write_bytes(b"x"), keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"step-{last_step:06d}", f"step-{last_step + 1:06d}"], names


def test_a_folder_without_its_marker_is_never_resumed(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 1, {"step": 1}, lambda tmp: (tmp / "a").write_text("1"), keep_last=3)
    half = tmp_path / "checkpoints" / "step-000002"
    half.mkdir()
    (half / "progress.json").write_text(json.dumps({"step": 2}))
    assert latest_complete(tmp_path).name == "step-000001"
