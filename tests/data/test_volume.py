"""Tests of medvlm3d.data.volume: NIfTI and npy readers, orientation, intensity, bad input, slices.

Fixtures are tiny volumes written into tmp_path (writers in tests/data/volume_helpers.py); DICOM
series are in test_volume_dicom.py, studies and the cache in test_volume_study.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medvlm3d.data.volume as V
from medvlm3d.config import DataConfig
from medvlm3d.data.volume import load_study, load_volume, slice_views

from volume_helpers import graded_hu, nifti, raises_naming, series

# ---------------------------------------------------------------------------------- NIfTI


def test_nifti_non_ras_affine_oriented_to_ras(tmp_path: Path) -> None:
    # axis0 -> inferior (2 mm), axis1 -> left, axis2 -> anterior: RAS gives X=axis1, Y=axis2, Z=axis0
    affine = np.array([[0, -1, 0, 5], [0, 0, 1.5, -3], [-2, 0, 0, 40], [0, 0, 0, 1]], dtype=float)
    data = np.full((6, 8, 10), -1000, np.int16)
    data[1, 6, 2] = 1000  # superior (a0 small), left (a1 large), posterior (a2 small)
    p = nifti(tmp_path / "perm.nii.gz", data, affine)
    vol = load_volume(p, size=(6, 10, 8))
    assert vol.shape == (1, 6, 10, 8) and vol.dtype == torch.float32
    d, h, w = np.unravel_index(int(vol.argmax()), vol.shape[1:])
    assert (d, h, w) == (4, 2, 1)  # D high = superior, H low = posterior, W low = left
    assert load_study(p, DataConfig(size=(6, 10, 8), slice_size=(4, 4))).native_depth == [6]


def test_output_shape_dtype_range_and_ct_window(tmp_path: Path) -> None:
    data = np.zeros((12, 10, 8), np.float32)
    data[..., :2], data[..., 2:4], data[..., 4:6], data[..., 6:] = -2000, -1000, 1000, 3000
    p = nifti(tmp_path / "ct.nii.gz", data)
    vol = load_volume(p, size=(8, 10, 12))
    assert vol.shape == (1, 8, 10, 12) and vol.dtype == torch.float32
    assert torch.equal(vol[0, :, 0, 0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))  # -2000,-1000 -> 0
    data[...] = 0.0
    data[0] = -1000  # keeps the auto rule on CT (min < -100)
    assert float(load_volume(nifti(tmp_path / "w.nii.gz", data), size=(8, 10, 12))[0, 4, 5, 6]) == pytest.approx(0.5)
    small = load_volume(p, size=(4, 5, 3))
    assert small.shape == (1, 4, 5, 3) and 0.0 <= float(small.min()) and float(small.max()) <= 1.0


def test_mri_percentile_and_modality_override(tmp_path: Path) -> None:
    data = np.arange(16 * 10 * 10, dtype=np.float32).reshape(16, 10, 10) / 4.0  # 0 .. 399.75, min >= -100 -> MRI
    p = nifti(tmp_path / "mr.nii.gz", data)
    vol = load_volume(p, size=(10, 10, 16))
    assert float(vol.min()) == 0.0 and float(vol.max()) == 1.0
    assert float(vol.median()) == pytest.approx(0.5, abs=0.02)
    lo, hi = np.percentile(data, [0.5, 99.5])
    assert float(vol[0, 5, 5, 8]) == pytest.approx((data[8, 5, 5] - lo) / (hi - lo), abs=1e-4)
    ct = load_volume(p, size=(10, 10, 16), modality="ct")  # forced CT window: 0..400 HU -> 0.5..0.7
    assert 0.5 <= float(ct.min()) and float(ct.max()) <= 0.7


def test_rescale_applied_to_raw_values_only(tmp_path: Path) -> None:
    hu = np.full((8, 8, 8), -1000.0)
    hu[2:6, 2:6, 2:6] = 0.0
    hu[4, 4, 4] = 1500.0  # bone
    raw = (hu + 1024).astype(np.int16)  # stored values 24 .. 2524: raw, not HU
    cfg = dict(size=(8, 8, 8))
    out = load_volume(nifti(tmp_path / "raw.nii.gz", raw), rescale=(1.0, -1024.0), **cfg)
    assert float(out[0, 3, 3, 3]) == pytest.approx(0.5) and float(out[0, 0, 0, 0]) == 0.0
    padded = raw.copy()
    padded[0] = -2000  # out-of-field padding: still raw
    out = load_volume(nifti(tmp_path / "pad.nii.gz", padded), rescale=(1.0, -1024.0), **cfg)
    assert float(out[0, 3, 3, 3]) == pytest.approx(0.5)
    # already HU: the CSV rescale must not be applied a second time
    out = load_volume(nifti(tmp_path / "hu.nii.gz", hu.astype(np.int16)), rescale=(1.0, -1024.0), **cfg)
    assert float(out[0, 3, 3, 3]) == pytest.approx(0.5) and float(out[0, 0, 0, 0]) == 0.0
    # header scl_inter: nibabel applies it; the CSV rescale is then ignored
    out = load_volume(nifti(tmp_path / "scl.nii.gz", raw, scl=(1.0, -1024.0)), rescale=(1.0, -1024.0), **cfg)
    assert float(out[0, 3, 3, 3]) == pytest.approx(0.5)
    assert V.looks_raw_ct(torch.from_numpy(raw.astype(np.float32)))
    assert not V.looks_raw_ct(torch.from_numpy(hu.astype(np.float32)))


# ---------------------------------------------------------------------------------- npy


def test_npy_m3d_passthrough(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = rng.uniform(0, 1, (1, 8, 16, 16)).astype(np.float32)
    np.save(tmp_path / "Axial.npy", arr)
    vol = load_volume(tmp_path / "Axial.npy", size=(8, 16, 16), modality="ct")  # npy is never re-windowed
    assert torch.equal(vol, torch.from_numpy(arr))
    np.save(tmp_path / "dhw.npy", arr[0])
    assert torch.equal(load_volume(tmp_path / "dhw.npy", size=(8, 16, 16)), vol)
    assert load_volume(tmp_path / "Axial.npy", size=(4, 8, 8)).shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "name,arr,match",
    [
        ("range.npy", np.full((1, 4, 8, 8), 2.0, np.float32), "[0, 1]"),
        ("rank2.npy", np.zeros((8, 8), np.float32), "expected [1, D, H, W]"),
        ("rank5.npy", np.zeros((1, 1, 4, 8, 8), np.float32), "expected [1, D, H, W]"),
        ("chan.npy", np.zeros((3, 4, 8, 8), np.float32), "channels"),
        ("flat.npy", np.zeros((1, 1, 8, 8), np.float32), "2D"),
        ("bool.npy", np.zeros((4, 8, 8), bool), "dtype"),
        ("cplx.npy", np.zeros((4, 8, 8), np.complex64), "dtype"),
        ("obj.npy", np.array([None, {"a": 1}], dtype=object), "object"),
    ],
)
def test_npy_bad_inputs(tmp_path: Path, name: str, arr: np.ndarray, match: str) -> None:
    np.save(tmp_path / name, arr, allow_pickle=True)
    raises_naming(tmp_path / name, load_volume, tmp_path / name, match=match)


# ---------------------------------------------------------------------------------- bad input


def test_bad_volumes_name_the_file(tmp_path: Path) -> None:
    raises_naming(tmp_path / "nope.nii.gz", load_volume, tmp_path / "nope.nii.gz", match="not found")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all" * 20)
    raises_naming(garbage, load_volume, garbage, match="cannot read")
    good = nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(0, 500, (32, 32, 32)).astype(np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    raises_naming(truncated, load_volume, truncated, match="cannot read")
    raises_naming(tmp_path / "flat.nii.gz", load_volume, nifti(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.int16)),
                  match="2D")
    p = nifti(tmp_path / "slab.nii.gz", np.zeros((16, 16, 1), np.int16))
    raises_naming(p, load_volume, p, match="2D")
    p = nifti(tmp_path / "time.nii.gz", np.zeros((8, 8, 4, 3), np.int16))
    raises_naming(p, load_volume, p, match="3 time points")
    one = np.arange(256, dtype=np.int16).reshape(8, 8, 4, 1) - 1000
    assert load_volume(nifti(tmp_path / "t1.nii.gz", one), size=(4, 8, 8)).shape == (1, 4, 8, 8)  # one time point
    for bad in (np.nan, np.inf):
        data = np.zeros((8, 8, 8), np.float32)
        data[1, 2, 3] = bad
        p = nifti(tmp_path / f"bad_{bad}.nii.gz", data)
        raises_naming(p, load_volume, p, match="NaN or Inf")
    other = tmp_path / "vol.mha"
    other.write_bytes(b"x")
    raises_naming(other, load_volume, other, match="unknown volume format")
    with pytest.raises(ValueError, match="modality"):
        load_volume(good, modality="pet")
    with pytest.raises(ValueError, match="size"):
        load_volume(good, size=(0, 4, 4))
    with pytest.raises(ValueError, match="oversize"):
        load_volume(good, oversize="crop")


def test_constant_volume_gives_zeros_with_warning(tmp_path: Path) -> None:
    p = nifti(tmp_path / "const.nii.gz", np.full((8, 8, 8), 40, np.int16))
    with pytest.warns(UserWarning, match="const.nii.gz"):
        vol = load_volume(p, size=(4, 4, 4), crop_foreground=True)
    assert vol.shape == (1, 4, 4, 4) and float(vol.abs().max()) == 0.0


def test_oversize_refuse_and_downsample(tmp_path: Path) -> None:
    assert V.plan_strides((10, 10, 10), 1000, "refuse", "x") == (1, 1, 1)
    strides = V.plan_strides((200, 100, 50), 10_000, "downsample", "x")
    assert np.prod([-(-s // t) for s, t in zip((200, 100, 50), strides)]) <= 10_000
    data = np.random.default_rng(0).integers(-1000, 1000, (20, 12, 10)).astype(np.int16)
    p = nifti(tmp_path / "big.nii.gz", data)
    raises_naming(p, load_volume, p, max_voxels=1000, oversize="refuse", match="max_voxels")
    sx, sy, sz = V.plan_strides(data.shape, 1000, "downsample", "x")
    sub = data[::sx, ::sy, ::sz]
    assert sub.size <= 1000 < data.size
    vol = load_volume(p, size=sub.shape[::-1], max_voxels=1000)  # the strided voxels themselves, no resize
    want = (np.clip(sub.astype(np.float32), -1000, 1000) + 1000) / 2000
    assert torch.allclose(vol[0], torch.from_numpy(want.transpose(2, 1, 0)), atol=1e-6)
    folder = series(tmp_path / "bigser", graded_hu(k=6))
    assert load_volume(folder, size=(3, 4, 5), max_voxels=60).shape == (1, 3, 4, 5)
    raises_naming(folder, load_volume, folder, max_voxels=60, oversize="refuse", match="max_voxels")
    np.save(tmp_path / "big.npy", np.random.default_rng(0).uniform(0, 1, (1, 8, 16, 16)).astype(np.float32))
    assert load_volume(tmp_path / "big.npy", size=(8, 16, 16), max_voxels=512).shape == (1, 8, 16, 16)


def test_crop_foreground_keeps_depth(tmp_path: Path) -> None:
    data = np.full((16, 16, 6), -1000, np.int16)
    data[6:10, 5:11, :] = 0  # a small body in air
    p = nifti(tmp_path / "body.nii.gz", data)
    plain = load_volume(p, size=(6, 16, 16))
    crop = load_volume(p, size=(6, 16, 16), crop_foreground=True)
    assert float((crop > 0.25).float().mean()) > 2 * float((plain > 0.25).float().mean())
    cfg = DataConfig(size=(6, 16, 16), slice_size=(8, 8), crop_foreground=True, num_slices=-1)
    assert load_study(p, cfg).slices.shape[1] == 6  # depth is never cropped


# ---------------------------------------------------------------------------------- slices


def test_slice_views_shapes_and_content() -> None:
    vol = torch.rand(1, 6, 8, 10)
    s, plane, index, pos = slice_views(vol, (8, 10), ("axial",), 0)
    assert s.shape == (6, 1, 8, 10) and torch.allclose(s[:, 0], vol[0])
    assert plane.tolist() == [0] * 6 and index.tolist() == list(range(6))
    assert torch.allclose(pos, (torch.arange(6) + 0.5) / 6)
    s, plane, index, pos = slice_views(vol, (4, 4), ("axial", "coronal", "sagittal"), 0)
    assert s.shape == (6 + 8 + 10, 1, 4, 4) and plane.tolist() == [0] * 6 + [1] * 8 + [2] * 10
    assert index.dtype == torch.long and pos.dtype == torch.float32 and bool(((pos > 0) & (pos < 1)).all())
    s, plane, _, pos = slice_views(vol, (5, 7), ("axial", "coronal", "sagittal"), 3)
    assert s.shape == (9, 1, 5, 7) and plane.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert pos[:3].tolist() == pytest.approx([1 / 6, 3 / 6, 5 / 6])
    cor = slice_views(vol, (6, 10), ("coronal",), 0)[0]
    assert torch.allclose(cor[3, 0], vol[0, :, 3, :])  # coronal slice = [D, W] image
    sag = slice_views(vol, (6, 8), ("sagittal",), 0)[0]
    assert torch.allclose(sag[2, 0], vol[0, :, :, 2])  # sagittal slice = [D, H] image


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(volume=torch.rand(6, 8, 10)), "volume"),
        (dict(volume=torch.rand(2, 6, 8, 10)), "volume"),
        (dict(slice_size=(0, 4)), "slice_size"),
        (dict(planes=("axial", "oblique")), "planes"),
        (dict(planes=()), "planes"),
        (dict(num_slices=-2), "num_slices"),
    ],
)
def test_slice_views_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(volume=torch.rand(1, 6, 8, 10), slice_size=(4, 4), planes=("axial",), num_slices=0) | kwargs
    with pytest.raises(ValueError, match=match):
        slice_views(**args)
