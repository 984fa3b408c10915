"""Malformed NIfTI volumes (issue 6), in process: broken header fields, truncation, NaN/Inf,
wrong dimensionality, missing files; then the behaviour of the NIfTI reader: constant volumes
(zeros + a warning, for every format), a harmless gzip mtime flip, the chunked/strided reader
against nibabel, bounded memory when downsampling, and instant stride plans for absurd claims.
"""

from __future__ import annotations

import math
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch

import medvlm3d.data.nifti as nifti_mod
from medvlm3d import DataError
from medvlm3d.data.volume import load_volume, plan_strides

from malformed_cases import BASE, RNG, Expect, check_volume_case, cut, edited, series, touch, write_nifti
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)

VOLUME: dict[str, Callable[[Path], Expect]] = {}


def _nii(name: str, edits: list[tuple[str, int, tuple[Any, ...]]], match: str, **kw: Any) -> Callable[[Path], Expect]:
    return lambda d: Expect(edited(d / f"{name}.nii", edits, **kw), [f"{name}.nii"], match)


def _data_nii(name: str, data: np.ndarray, match: str, **kw: Any) -> Callable[[Path], Expect]:
    return lambda d: Expect(write_nifti(d / name, data, **kw), [name], match)


def _with(value: float, dtype: Any = np.float32) -> np.ndarray:
    a = BASE.astype(dtype)
    a[3, 4, 5] = value
    return a


_NEG = "zero or negative size"
VOLUME.update({
    # NIfTI-1 header fields: dim[0] @40, dim[1..3] @42, datatype @70, bitpix @72, vox_offset @108,
    # scl_slope @112, sform_code @254, srow_x/y/z @280, magic @344
    "nii-dim-x-zero": _nii("d0", [("<h", 42, (0,))], _NEG),
    "nii-dim-y-negative": _nii("dn", [("<h", 44, (-4,))], _NEG),
    "nii-ndim-zero": _nii("n0", [("<h", 40, (0,))], _NEG),
    "nii-ndim-nine": _nii("n9", [("<h", 40, (9,))], "cannot read"),
    "nii-datatype-unknown": _nii("dt", [("<h", 70, (999,))], "cannot read"),
    "nii-datatype-complex64": _nii("cx", [("<hh", 70, (32, 64))], "voxel type"),
    "nii-datatype-rgb24": _nii("rgb", [("<hh", 70, (128, 24))], "voxel type"),
    "nii-sform-zero": _nii("sz", [("<h", 254, (1,)), ("<12f", 280, (0.0,) * 12)], "geometry"),
    "nii-sform-nan": _nii("sn", [("<h", 254, (1,)), ("<12f", 280, (float("nan"),) * 12)], "geometry"),
    "nii-magic-broken": _nii("mg", [("4s", 344, (b"xx\0\0",))], "cannot read"),
    "nii-vox-offset-past-end": _nii("vo", [("<f", 108, (1e9,))], "truncated"),
    "nii-scl-slope-overflows-to-inf": _nii("so", [("<f", 112, (1e38,))], "NaN or Inf"),
    "nii-plain-truncated": lambda d: Expect(cut(write_nifti(d / "t.nii"), 600), ["t.nii"], "truncated"),
    "nii-empty-file": lambda d: Expect(cut(write_nifti(d / "e.nii.gz"), 0), ["e.nii.gz"], "cannot read"),
    "nii-2d-image": _data_nii("flat.nii.gz", BASE[:, :, 0], "2D"),
    "nii-one-slice": _data_nii("slab.nii.gz", BASE[:, :, :1], "2D"),
    "nii-4d-3-timepoints": _data_nii("t.nii.gz", np.stack([BASE] * 3, -1), "3 time points"),
    "nii-nan-voxel": _data_nii("nan.nii", _with(np.nan), "NaN or Inf"),
    "nii-inf-voxel": _data_nii("inf.nii", _with(np.inf), "NaN or Inf"),
    "nii-minus-inf-voxel": _data_nii("minf.nii.gz", _with(-np.inf), "NaN or Inf"),
    "nii2-nan-voxel": _data_nii("nan2.nii.gz", _with(np.nan, np.float64), "NaN or Inf", two=True),
    "volume-file-missing": lambda d: Expect(d / "nowhere.nii.gz", ["nowhere.nii.gz"], "not found"),
    "volume-unknown-extension": lambda d: Expect(touch(d / "scan.mha", b"x"), ["scan.mha"], "unknown volume format"),
})  # fmt: skip


@pytest.mark.parametrize("cid", list(VOLUME))
def test_malformed_volume(tmp_path: Path, cid: str) -> None:
    check_volume_case(VOLUME[cid], tmp_path)


@pytest.mark.parametrize("kind", ["nii-int16-40", "nii.gz-float-zeros", "npy-half", "dicom-series"])
def test_constant_volume_gives_zeros_and_a_warning(tmp_path: Path, kind: str) -> None:
    if kind == "nii-int16-40":
        p = write_nifti(tmp_path / "c.nii", np.full((8, 8, 6), 40, np.int16))
    elif kind == "nii.gz-float-zeros":
        p = write_nifti(tmp_path / "c.nii.gz", np.zeros((8, 8, 6), np.float32))
    elif kind == "npy-half":
        np.save(tmp_path / "c.npy", np.full((1, 6, 8, 8), 0.5, np.float32))
        p = tmp_path / "c.npy"
    else:
        p = series(tmp_path / "cser", [0, 1, 2, 3], value=lambda k: 7)
    with pytest.warns(UserWarning, match=re.escape(p.name) + r".*constant volume"):
        vol = load_volume(p, size=(4, 4, 4))
    assert vol.shape == (1, 4, 4, 4) and vol.dtype == torch.float32 and float(vol.abs().max()) == 0.0


def test_gzip_mtime_flip_is_harmless(tmp_path: Path) -> None:
    p = write_nifti(tmp_path / "a.nii.gz")
    raw = bytearray(p.read_bytes())
    raw[4] ^= 0x10  # MTIME in the gzip header: neither data nor covered by the CRC
    (tmp_path / "b.nii.gz").write_bytes(bytes(raw))
    assert torch.equal(load_volume(p, size=(4, 4, 4)), load_volume(tmp_path / "b.nii.gz", size=(4, 4, 4)))


@pytest.mark.parametrize("chunk", [nifti_mod.CHUNK_BYTES, 100])  # 100 bytes: many chunks, rows split
@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_chunked_strided_nifti_reader_matches_nibabel(tmp_path: Path, monkeypatch, name: str, chunk: int) -> None:
    monkeypatch.setattr(nifti_mod, "CHUNK_BYTES", chunk)
    data = RNG.integers(-1000, 1000, (13, 11, 9)).astype(np.int16)
    p = edited(tmp_path / name, [("<2f", 112, (2.0, -5.0))], data=data, gz=name.endswith(".gz"))  # scl_slope/inter
    ref = nib.load(str(p)).get_fdata(dtype=np.float32)
    assert float(np.abs(ref - (data * 2.0 - 5.0)).max()) == 0.0
    for strides in [(1, 1, 1), (2, 3, 1), (3, 1, 2), (5, 5, 5)]:
        nv = nifti_mod.read_nifti(p, lambda shape, s=strides: s)
        np.testing.assert_array_equal(nv.array, ref[:: strides[0], :: strides[1], :: strides[2]])
        assert nv.header_scaled and nv.shape == data.shape and nv.array.dtype == np.float32
        np.testing.assert_allclose(nv.affine[:3, :3], np.diag([0.8, 0.8, 2.0]) * np.asarray(strides))


def test_oversize_downsample_in_bounded_memory_and_refuse(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(nifti_mod, "CHUNK_BYTES", 16 * 1024)
    data = RNG.integers(-1000, 1000, (128, 128, 64)).astype(np.int16)  # 1 Mi voxels = 4 MiB as float32
    p = write_nifti(tmp_path / "big.nii.gz", data)
    tracemalloc.start()
    try:
        vol = load_volume(p, size=(8, 16, 16), max_voxels=16**3)  # strides (8, 8, 4) -> 16^3 voxels read
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert vol.shape == (1, 8, 16, 16) and peak < 2**20, peak  # never the full array (4 MiB), nor its bytes
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"big\.nii\.gz.*max_voxels=4096 \(oversize='refuse'\)"):
        load_volume(p, max_voxels=16**3, oversize="refuse")
    assert time.perf_counter() - t0 < 0.5


def test_plan_strides_is_instant_for_absurd_claims() -> None:
    t0 = time.perf_counter()
    for shape in [(10**12,) * 3, (32767,) * 3, (2**40, 3, 3), (10**6, 10**6, 2), (300, 200, 100)]:
        strides = plan_strides(shape, 2**20, "downsample", "x")
        kept = [-(-s // t) for s, t in zip(shape, strides)]
        assert math.prod(kept) <= 2**20 and all(t >= 1 for t in strides)
    assert time.perf_counter() - t0 < 0.5
