"""M3D `.npy` volumes: the header is read and checked before any voxel.

    read_npy(path, plan, budget=None) -> (MetaTensor [1, X, Y, Z] float32 in [0, 1], shape (X, Y, Z))

The file must hold one numeric array, [1, D, H, W] (M3D) or [D, H, W], already in [0, 1]. Its
header is parsed with `numpy.lib.format` (read_magic + read_array_header, no pickle ever); the
file size must hold the claimed array, and `plan` (oversize strides) and `budget` (memory, see
data/guard.py) are applied to the claimed shape before the array is mapped (`mmap_mode="r"`,
`allow_pickle=False`) and the kept voxels copied to float32. Every failure is a DataError naming
the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.data import MetaTensor

from .errors import DataError
from .guard import Budget


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from the .npy header; DataError when it is not one."""
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable .npy file ({e}); expected a numeric array (object arrays are "
                        "refused, never unpickled)") from e
    if dtype.hasobject:
        raise DataError(f"{path}: unreadable .npy file (object dtype {dtype}); object arrays are refused, never "
                        "unpickled")
    return tuple(int(s) for s in shape), dtype, offset


def read_npy(path: Path, plan: Callable[[Any], tuple[int, ...]], budget: Budget | None = None,
             ) -> tuple[MetaTensor, tuple[int, ...]]:
    """One M3D .npy -> (MetaTensor [1, X, Y, Z], (X, Y, Z) as stored); see the module docstring."""
    shape, dtype, offset = _header(path)
    if dtype.kind not in "fiu" or dtype.fields is not None:
        raise DataError(f"{path}: .npy dtype {dtype}; expected float or integer voxels")
    if len(shape) == 4 and shape[0] > 1:
        raise DataError(f"{path}: .npy shape {shape} has {shape[0]} channels; expected [1, D, H, W]")
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: .npy shape {shape}; expected [1, D, H, W] (M3D) or [D, H, W]")
    need, have = math.prod(shape) * dtype.itemsize, path.stat().st_size - offset
    if have < need:
        raise DataError(f"{path}: unreadable .npy file: the header describes {shape} of {dtype} ({need} bytes), "
                        f"the file holds {have}; truncated or forged header")
    vol_shape = shape[1:] if len(shape) == 4 else shape
    if len(vol_shape) < 3 or min(vol_shape) < 2:
        raise DataError(f"{path}: a 2D image of shape {vol_shape}; expected a 3D volume")
    sd, sh, sw = plan(vol_shape)
    if budget is not None:
        budget(vol_shape, dtype.itemsize, (sd, sh, sw))
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable .npy file ({e}); expected a numeric array") from e
    vol = arr[0] if arr.ndim == 4 else arr
    data = np.asarray(vol[::sd, ::sh, ::sw], dtype=np.float32)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: {bad} NaN or Inf voxels; expected finite values in [0, 1]")
    lo, hi = float(data.min()), float(data.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataError(f"{path}: M3D .npy values must already lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    data = np.clip(data, 0.0, 1.0).transpose(2, 1, 0)  # [D, H, W] -> RAS-like [X, Y, Z] (a view)
    image = MetaTensor(torch.from_numpy(data)[None], meta={"space": "RAS"})
    return image, vol_shape[::-1]


__all__ = ["read_npy"]
