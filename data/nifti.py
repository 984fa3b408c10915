"""NIfTI reading that trusts no header: nibabel parses it, the voxels are streamed and checked here.

    read_nifti(path, plan) -> NiftiVolume
        array  float32 [X, Y, Z]: a view of a C-contiguous [Z, Y, X] array (the file's own voxel
               order, so volume.py's [X, Y, Z] -> [Z, Y, X] permute is contiguous), after the
               header's scl_slope / scl_inter (nibabel's sanitised values)
        affine float64 [4, 4]: voxel index -> RAS mm (nibabel's best affine: sform, else qform),
               its columns scaled by any oversize stride
        shape  (X, Y, Z) as stored, before any stride
        header_scaled  True when scl_slope / scl_inter are not (1, 0) (already applied)

Why not nibabel's `img.dataobj[...]`: it trusts the header. A header claiming a huge size makes it
allocate the whole claimed array before it finds the file short, and slicing with large strides
builds one file segment per voxel (a hang); a .nii.gz is read only up to its last voxel, so a
lost gzip trailer or a flipped bit in the data (CRC-32 mismatch) goes unnoticed. Here:
  1. the header must describe one 3D volume (trailing sizes of 1 allowed) with positive sizes and
     real grey voxels (integer or float; not complex, RGB or other structured types);
  2. size gate, before anything is allocated: a .nii file must hold vox_offset + the claimed
     voxel bytes, else DataError ("truncated"), whatever the oversize policy;
  3. `plan(shape_xyz) -> strides` (volume.plan_strides) refuses or strides an oversized volume,
     and `budget(dims, itemsize, strides)` (data/guard.py) refuses a load whose peak memory is
     over data.max_load_bytes: from the header alone, so for a .nii.gz the gzip ISIZE trailer
     (forgeable) is never consulted and nothing is decompressed before the check;
  4. the voxels are streamed in chunks of rows (<= 64 MiB) straight into the (strided) float32
     output (a short stream is "truncated" as soon as it ends), and a .nii.gz is then read to its
     end so that gzip checks its CRC-32 and length, refusing more than MAX_GZ_EXTRA bytes past
     what the header describes (a bomb behind a small header).
Every failure is a DataError naming the file. Memory: the float32 output plus one chunk.
"""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import nibabel as nib
import numpy as np

from .errors import DataError
from .guard import Budget

logger = logging.getLogger(__name__)

Plan = Callable[[tuple[int, int, int]], tuple[int, ...]]
CHUNK_BYTES = 64 * 2**20  # voxel bytes read at a time
MAX_GZ_OFFSET = 64 * 2**20  # vox_offset bound of a .nii.gz (header + extensions)
MAX_GZ_EXTRA = 64 * 2**20  # decompressed bytes tolerated after the voxels of a .nii.gz
_GZIP_ERRORS = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


@dataclass
class NiftiVolume:
    array: np.ndarray  # float32 [X, Y, Z]
    affine: np.ndarray  # [4, 4] RAS
    shape: tuple[int, int, int]  # (X, Y, Z) as stored
    header_scaled: bool


def _check_header(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise DataError(f"{where}: the header gives image sizes {shape} (a zero or negative size); "
                        "expected a 3D volume with positive sizes")
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise DataError(f"{where}: a 2D image of shape {shape}; expected a 3D volume")
    extra = math.prod(shape[3:])
    if extra > 1:
        raise DataError(f"{where}: a {len(shape)}D image {shape} with {extra} time points or channels; "
                        "expected one 3D volume")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(f"{where}: NIfTI voxel type {dtype}; expected real grey values (integer or float)")


def _size_gate(path: Path, need: int, what: str, where: str) -> None:
    """An uncompressed .nii must hold vox_offset + the claimed voxel bytes (its size, no read)."""
    have = path.stat().st_size
    if have < need:
        raise DataError(f"{where}: cannot read the volume: truncated or corrupt: the header describes {need} bytes "
                        f"({what}), the file holds {have}; expected a complete NIfTI file")


def _read_exact(fh: BinaryIO, view: memoryview, where: str, done: int, total: int) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise DataError(f"{where}: cannot read the volume: truncated: the voxel data ends after {done + got} of "
                            f"{total} bytes")
        got += n


def _read_voxels(fh: BinaryIO, dims: tuple[int, int, int], dtype: np.dtype, strides: tuple[int, ...],
                 where: str) -> np.ndarray:
    """Voxels in file order (x fastest, then y, then z) -> float32 [Z', Y', X'], strided."""
    nx, ny, nz = dims
    sx, sy, sz = strides
    row_bytes = nx * dtype.itemsize
    n_rows = ny * nz
    out = np.empty((len(range(0, nz, sz)), len(range(0, ny, sy)), len(range(0, nx, sx))), dtype=np.float32)
    per = max(1, min(n_rows, CHUNK_BYTES // row_bytes))
    buf = bytearray(per * row_bytes)
    whole = strides == (1, 1, 1)
    flat_out = out.reshape(n_rows, nx) if whole else None
    for r in range(0, n_rows, per):
        m = min(per, n_rows - r)
        view = memoryview(buf)[: m * row_bytes]
        _read_exact(fh, view, where, r * row_bytes, n_rows * row_bytes)
        rows = np.frombuffer(view, dtype=dtype).reshape(m, nx)
        if flat_out is not None:
            flat_out[r : r + m] = rows
            continue
        z, y = np.divmod(np.arange(r, r + m), ny)
        keep = (z % sz == 0) & (y % sy == 0)
        if keep.any():
            out[z[keep] // sz, y[keep] // sy] = rows[keep][:, ::sx]
    return out


def read_nifti(path: Path, plan: Plan, budget: Budget | None = None) -> NiftiVolume:
    """A .nii / .nii.gz file -> NiftiVolume (see the module docstring); DataError when malformed."""
    where = str(path)
    img: Any = nib.load(str(path))  # the header only
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{where}: a {type(img).__name__}, not a single-file NIfTI image")
    proxy = img.dataobj
    shape = tuple(int(s) for s in proxy.shape)
    dtype = np.dtype(proxy.dtype)
    _check_header(shape, dtype, where)
    dims = (shape[0], shape[1], shape[2])
    gz = path.name.lower().endswith(".gz")
    offset, nbytes = int(proxy.offset), math.prod(shape) * dtype.itemsize
    if not gz:  # the file size is known without reading: a lying header is "truncated" at once
        _size_gate(path, offset + nbytes, f"vox_offset {offset} + {shape} voxels of {dtype}", where)
    elif offset > MAX_GZ_OFFSET:
        raise DataError(f"{where}: vox_offset {offset} bytes; expected the voxels within {MAX_GZ_OFFSET} bytes of the "
                        "start of a .nii.gz")
    strides = tuple(int(s) for s in plan(dims))
    if budget is not None:  # before anything is allocated or decompressed (never the gzip trailer's word)
        budget(dims, dtype.itemsize, strides)
    slope, inter = float(proxy.slope), float(proxy.inter)
    try:
        with (gzip.open(path, "rb") if gz else path.open("rb")) as fh:
            fh.seek(offset)
            out = _read_voxels(fh, dims, dtype, strides, where)
            if gz:  # read to the end: gzip checks the CRC-32 and the length in the trailer
                extra, sink = 0, bytearray(2**16)
                while n := fh.readinto(sink):
                    extra += n
                    if extra > MAX_GZ_EXTRA:  # a bomb behind a small header: stop as soon as it shows
                        raise DataError(f"{where}: the gzip stream holds over {MAX_GZ_EXTRA} bytes more than the "
                                        f"header describes ({offset + nbytes}); expected one NIfTI volume")
                if extra:
                    logger.debug("%s: %d bytes after the voxel data ignored", where, extra)
    except _GZIP_ERRORS as e:
        if not gz:
            raise
        raise DataError(f"{where}: cannot read the volume: corrupt or truncated gzip data ({type(e).__name__}: {e}); "
                        "expected a complete .nii.gz") from e
    if (slope, inter) != (1.0, 0.0):
        with np.errstate(over="ignore"):  # an overflow gives Inf, refused by the caller's finiteness check
            out *= np.float32(slope)
            out += np.float32(inter)
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, :3] *= np.asarray(strides, dtype=np.float64)
    return NiftiVolume(out.transpose(2, 1, 0), affine, dims, (slope, inter) != (1.0, 0.0))


__all__ = ["CHUNK_BYTES", "NiftiVolume", "read_nifti"]
