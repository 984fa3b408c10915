"""Guards run before any voxel is read: what kind of file a path is, and what a load will cost.

    check_regular(path, what="file", dir_ok=True)  -> None, or DataError naming the path
        Only regular files and directories (symlinks followed) may be opened: a FIFO would block
        the reader forever, a device (/dev/zero) never ends, a socket cannot be read.
    load_peak_bytes(dims, itemsize, kept) -> int
        The peak memory of loading a volume, from its header alone:
        dims x itemsize (the stored voxels, as if read whole) + COPIES x 4 x kept voxels (the
        float32 output and one preprocessing copy of it; `kept` counts voxels after any
        oversize stride).
    plan_strides(shape, max_voxels, oversize, where) -> strides (data.max_voxels / data.oversize)
    check_budget(dims, itemsize, strides, *, budget, where, what="voxels") -> None
        DataError naming the file, the claimed dims and the budget (data.max_load_bytes) when
        `load_peak_bytes` is over it; 0 or less turns the check off.
    check_inside(record, roots, where) -> None
        DataError naming the record and the path when an image resolves (symlinks followed)
        outside every root (the data root of its dataset; see data.allow_outside_root).

Every reader calls these from the header (npy: numpy.lib.format's header; NIfTI: nibabel's
header; DICOM: Rows x Columns x frames x BitsAllocated with the pixel data deferred) before it
allocates or decompresses anything, so a header that lies, a forged gzip size trailer or a
decompression bomb is refused in milliseconds.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DataError

logger = logging.getLogger(__name__)

COPIES = 2  # float32 copies alive at the peak: the reader's output and one preprocessing copy
Budget = Callable[[Sequence[int], int, Sequence[int]], None]  # (dims, itemsize, strides) -> None or DataError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def check_regular(path: str | os.PathLike[str], what: str = "file", dir_ok: bool = True) -> None:
    """DataError unless `path` (symlinks followed) is a regular file, or a directory when `dir_ok`.

    Never opens the path, so it cannot block; a missing path is left to the caller's own check."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise DataError(f"{p}: cannot stat the {what} ({e})") from e
    if stat.S_ISREG(mode) or (dir_ok and stat.S_ISDIR(mode)):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "a directory" if stat.S_ISDIR(mode) else "special")
    link = f" (a symlink to {os.path.realpath(p)})" if p.is_symlink() else ""
    expected = "a regular file or a folder" if dir_ok else "a regular file"
    raise DataError(f"{p}: is {kind}{link}, not a regular file; expected {what} as {expected}")


def load_peak_bytes(dims: Sequence[int], itemsize: int, kept: int) -> int:
    """Stored bytes of `dims` plus COPIES float32 copies of `kept` voxels (see the module docstring)."""
    return math.prod(int(d) for d in dims) * int(itemsize) + COPIES * 4 * int(kept)


def check_budget(dims: Sequence[int], itemsize: int, strides: Sequence[int], *, budget: int, where: str,
                 what: str = "voxels") -> None:
    """DataError when loading `dims` (of `itemsize` bytes, read with `strides`) needs over `budget` bytes."""
    if budget <= 0:
        return
    kept = math.prod(-(-int(d) // max(1, int(s))) for d, s in zip(dims, strides))
    need = load_peak_bytes(dims, itemsize, kept)
    if need > budget:
        raise DataError(
            f"{where}: the header describes {tuple(int(d) for d in dims)} {what} of {itemsize} byte(s); loading "
            f"needs about {need / 2**20:.1f} MiB ({need} bytes: stored voxels + {COPIES} float32 copies), over "
            f"data.max_load_bytes={budget} ({budget / 2**20:.1f} MiB); refused before reading (raise "
            "data.max_load_bytes for a genuinely large study)"
        )


def plan_strides(shape: Sequence[int], max_voxels: int, oversize: str, where: str) -> tuple[int, ...]:
    """Integer strides that bring `shape` under `max_voxels`, or DataError (oversize "refuse").

    Downsampling caps every axis at the largest length c with prod(min(s, c)) <= max_voxels (so
    the longest axes are thinned first) and strides each axis by ceil(s / c): a few dozen integer
    steps whatever the claimed size, nothing allocated."""
    shape = [int(s) for s in shape]
    n = math.prod(shape)
    if n <= max_voxels:
        return (1,) * len(shape)
    if oversize == "refuse":
        raise DataError(f"{where}: {tuple(shape)} = {n} voxels exceeds max_voxels={max_voxels} (oversize='refuse')")
    lo, hi = 1, max(shape)  # prod(min(s, lo)) = 1 <= max_voxels < prod(min(s, hi)) = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if math.prod(min(s, mid) for s in shape) <= max_voxels else (lo, mid)
    strides = tuple(-(-s // lo) for s in shape)
    logger.warning("%s: %s voxels over max_voxels=%d; stride-subsampled by %s", where, tuple(shape), max_voxels,
                   list(strides))
    return strides


def check_inside(rec: dict[str, Any], roots: Sequence[Path], where: str, key: str = "image") -> None:
    """DataError naming the record and the path unless every path under `rec[key]` lies inside one
    of `roots`, symlinks resolved (a link pointing outside is outside; `..` cannot climb out)."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    for p in rec[key] if isinstance(rec[key], list) else [rec[key]]:
        real = Path(os.path.realpath(p))
        if not any(real.is_relative_to(r) for r in real_roots):
            inside = " or ".join(str(r) for r in real_roots)
            rid = f" (id {rec['id']!r})" if "id" in rec else ""
            raise DataError(f"{where}{rid}: {key} {str(p)!r} resolves to {real}, outside the data root "
                            f"{inside}; move it inside, or set data.allow_outside_root=true")


__all__ = ["COPIES", "Budget", "check_budget", "check_inside", "check_regular", "load_peak_bytes", "plan_strides"]
