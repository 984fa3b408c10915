"""The run folder's own safety: one run per folder, and a metrics log that survives kills.

    lock_run_folder(run_dir) -> RunLock
        an exclusive `fcntl.flock` on `<run_dir>/.lock`, taken without waiting; the file holds the
        holder's PID. A second run on the same folder gets `RunFolderBusy` (a ConfigError, exit 2)
        naming the folder and that PID. The kernel drops the lock when its process ends, however it
        ends, so a lock left by a killed run never blocks the next one. `RunLock.release()` (or the
        `with` block's end) gives it back.
    read_metrics(path) -> list[dict]
        the rows of a metrics.jsonl; a line that is not a JSON object (torn by a kill mid-write)
        is skipped with a warning naming the file and the line number.
    reset_metrics(path, step)
        rewrites metrics.jsonl atomically (medvlm3d.io) to the rows of steps <= `step`: on resume,
        the rows the killed run logged after its checkpoint go, none before it is lost, and a kill
        during the rewrite leaves the old file whole. step 0 (a fresh start) gives an empty log.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from medvlm3d.data.errors import ConfigError
from medvlm3d.io import atomic_write_text

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder, held while this object is open (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderBusy(
                f"run folder {str(self.run_dir)!r} is in use by another run (PID {holder}, lock {self.path}); "
                "wait for it to end or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_run_folder(run_dir: str | os.PathLike[str]) -> RunLock:
    """Take the run folder's lock now, or raise RunFolderBusy naming the holder's PID."""
    return RunLock(run_dir)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none when it is missing); torn or non-object lines are skipped
    with a warning naming `path` and the line."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            log.warning("%s line %d is not a complete metrics row (a kill mid-write?); skipped: %.80r", p, n, line)
            continue
        rows.append(row)
    return rows


def reset_metrics(path: str | os.PathLike[str], step: int) -> int:
    """Atomically rewrite `path` to its rows of steps <= `step`; returns how many rows were kept."""
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step] if step > 0 else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "lock_run_folder", "read_metrics", "reset_metrics"]
