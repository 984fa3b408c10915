"""Training checkpoints that survive a kill at any moment.

Layout under the run folder:

    checkpoints/step-000100/
        trainer_state/     accelerator.save_state: model, optimizer, scheduler, RNG, dataloader position
        model/             save_pretrained export, for inference (see model/checkpoint.py)
        progress.json      step, samples seen, loss history so far
        COMPLETE           written last, after everything above is on disk

A checkpoint is written into a hidden temporary folder and renamed to `step-NNNNNN` only when
whole, and `COMPLETE` is the final file inside it, so `latest_complete` never returns a
half-written checkpoint, whatever moment a kill lands on. Only the last `keep_last` complete
checkpoints are kept; an old one is renamed out of the `step-*` namespace before it is deleted,
so a kill during pruning cannot leave a half-deleted folder that still carries its marker.

A write that fails (a full disk above all) removes its temporary folder, leaves the earlier
checkpoints as they were, and on a full disk raises `medvlm3d.io.NoSpaceLeft` ("no space left on
<run folder>", one line and exit 2 on the CLI) instead of torch's errno-less writer error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from medvlm3d.io import NoSpaceLeft, atomic_write_json, atomic_write_text, fsync_tree, is_no_space

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
MARKER = "COMPLETE"


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root/checkpoints`, oldest first."""
    base = Path(root) / "checkpoints"
    if not base.is_dir():
        return []
    found = []
    for p in base.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_complete(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_progress(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "progress.json").read_text(encoding="utf-8"))


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves no half-deleted folder
    that still looks complete: first rename it out of the `step-*` namespace (atomic), then delete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint(
    root: Path,
    step: int,
    progress: dict[str, Any],
    write_contents: Callable[[Path], None],
    keep_last: int,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a checkpoint for `step`. `write_contents(tmp_dir)` fills the folder (all ranks call
    it: DeepSpeed's save_state is collective); the main rank then marks it complete and renames.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write_contents(tmp)
        barrier()
        if is_main:
            atomic_write_json(tmp / "progress.json", progress, indent=None)
            fsync_tree(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e, root):
            log.error("checkpoint step-%06d not written (disk full); the earlier checkpoints are intact", step)
            raise NoSpaceLeft(root, e) from e
        raise
    if is_main:
        if final.exists():  # a stale folder of the same step (e.g. from an earlier, aborted run)
            _discard(final)
        os.replace(tmp, final)
        atomic_write_text(final / MARKER, "ok\n")
        prune(root, keep_last)
        log.info("checkpoint %s written", final)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and leftover temporaries."""
    done = complete_checkpoints(root)
    for p in done[: max(0, len(done) - max(1, keep_last))]:
        _discard(p)
    base = Path(root) / "checkpoints"
    for pattern in (".tmp-step-*", ".trash-step-*"):
        for p in base.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
    # An incomplete step folder (renamed, then killed before the marker) is never resumed from.
    for p in base.glob("step-*"):
        if p.is_dir() and not (p / MARKER).is_file():
            _discard(p)
