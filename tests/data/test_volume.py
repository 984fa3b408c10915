"""Tests of medvlm3d.data.volume / dicom: readers, orientation, intensity, errors, slices, cache.

Fixtures are tiny volumes written into tmp_path with nibabel, pydicom 3 and numpy.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import medvlm3d.data.volume as V
from medvlm3d.config import DataConfig
from medvlm3d.data.errors import DataError
from medvlm3d.data.volume import Study, build_transforms, load_study, load_volume, load_volume_from_config, slice_views

CT_SOP, MR_SOP, ENH_CT_SOP = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2.1"


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None,
          scl: tuple[float, float] | None = None) -> Path:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if scl is not None:
        img.header.set_slope_inter(*scl)
    nib.save(img, str(path))
    return path


def dicom_file(path: Path, pixels: np.ndarray, *, series: str, sop: str = CT_SOP, modality: str = "CT",
               pixel_data: bool = True, **tags: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, uid, modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixel_data:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def series(folder: Path, hu: np.ndarray, *, slope: float = 2.0, intercept: float = -1024.0, modality: str = "CT",
           seed: int = 0, uid: str | None = None) -> Path:
    """hu [K, rows, cols]: slice k at z = 2.5 k mm (axial); shuffled file names and InstanceNumbers."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, numbers = rng.permutation(len(hu)), rng.permutation(len(hu)) + 1
    uid = uid or generate_uid()
    for k, sl in enumerate(hu):
        stored = np.round((sl - intercept) / slope)
        dicom_file(folder / f"IM{names[k]:04d}", stored, series=uid, modality=modality,
                   sop=MR_SOP if modality == "MR" else CT_SOP, InstanceNumber=int(numbers[k]),
                   ImagePositionPatient=[-10.0, -20.0, 2.5 * k], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                   PixelSpacing=[0.8, 0.8], RescaleSlope=slope, RescaleIntercept=intercept)
    return folder


def graded_hu(k: int = 6, rows: int = 8, cols: int = 10) -> np.ndarray:
    """Slice k holds HU -500 + 200 k; one bright (1000 HU) voxel at row 0, column cols-1."""
    hu = np.repeat((-500.0 + 200.0 * np.arange(k))[:, None, None], rows, 1).repeat(cols, 2)
    hu[:, 0, cols - 1] = 1000.0
    return hu


def expected_graded(k: int) -> float:
    return (-500.0 + 200.0 * k + 1000.0) / 2000.0


def raises_naming(path: Path, fn, *args, match: str = "", **kw) -> DataError:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    assert path.name in str(e.value), str(e.value)
    assert match.lower() in str(e.value).lower(), str(e.value)
    return e.value


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


# ---------------------------------------------------------------------------------- DICOM


def test_dicom_series_sorted_by_position_with_rescale(tmp_path: Path) -> None:
    folder = series(tmp_path / "ser", graded_hu(), seed=3)
    (folder / "notes.txt").write_text("not dicom")  # ignored
    vol = load_volume(folder, size=(6, 8, 10))
    assert vol.shape == (1, 6, 8, 10)
    got = [float(vol[0, k, 4, 4]) for k in range(6)]
    assert got == pytest.approx([expected_graded(k) for k in range(6)], abs=1e-6)  # order by position, HU rescaled
    # row 0 is most anterior (LPS +y = posterior) -> H last; last column most left -> W 0
    assert torch.all(vol[0, :, 7, 0] == 1.0) and float(vol[0, 0, 0, 9]) < 1.0


def test_dicom_sagittal_series_geometry(tmp_path: Path) -> None:
    # rows run posterior (LPS +y), columns run inferior; slices step toward the left (LPS +x)
    folder, uid = tmp_path / "sag", generate_uid()
    folder.mkdir()
    for k in range(5):
        hu = np.full((8, 10), -500.0 + 200.0 * k)
        if k == 1:
            hu[0, 0] = 1000.0  # superior-most row, anterior-most column
        dicom_file(folder / f"s{(k * 3) % 5}", hu + 1024, series=uid, InstanceNumber=5 - k, RescaleIntercept=-1024,
                   RescaleSlope=1, ImagePositionPatient=[3.0 * k, 0.0, 0.0], ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                   PixelSpacing=[1.0, 1.0])
    vol = load_volume(folder, size=(8, 10, 5))
    assert [float(vol[0, 4, 4, w]) for w in range(5)] == pytest.approx([expected_graded(4 - w) for w in range(5)])
    assert np.unravel_index(int(vol.argmax()), vol.shape[1:]) == (7, 9, 3)  # D top, H anterior, W = right-to-left


def test_dicom_mr_modality_tag_gives_percentiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = series(tmp_path / "mr", rng.uniform(100, 300, (5, 8, 8)).round(), slope=1.0, intercept=0.0, modality="MR")
    vol = load_volume(folder, size=(5, 8, 8))
    assert float(vol.min()) == 0.0 and float(vol.max()) == 1.0  # CT window would give 0.55 .. 0.65


def test_multiframe_dicom(tmp_path: Path) -> None:
    hu = graded_hu(k=5)
    order = [3, 0, 4, 1, 2]  # frames stored out of position order
    stored = np.round((hu[order] + 1024) / 2.0)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.8]
    shared.PixelValueTransformationSequence = [Dataset()]
    pvt = shared.PixelValueTransformationSequence[0]
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 2.0, -1024.0, "HU"
    per = []
    for k in order:
        fr = Dataset()
        fr.PlanePositionSequence = [Dataset()]
        fr.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        per.append(fr)
    p = dicom_file(tmp_path / "enhanced.dcm", stored, series=generate_uid(), sop=ENH_CT_SOP, NumberOfFrames=5,
                   SharedFunctionalGroupsSequence=[shared], PerFrameFunctionalGroupsSequence=per)
    vol = load_volume(p, size=(5, 8, 10))
    assert [float(vol[0, k, 4, 4]) for k in range(5)] == pytest.approx([expected_graded(k) for k in range(5)])
    assert torch.all(vol[0, :, 7, 0] == 1.0)


def test_dicom_errors_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_naming(empty, load_volume, empty, match="no DICOM files")
    (empty / "readme.txt").write_text("hello")
    raises_naming(empty, load_volume, empty, match="no DICOM files")
    mixed = series(tmp_path / "mixed", graded_hu(k=3))
    dicom_file(mixed / "other", np.zeros((8, 10)), series="9.9.9", InstanceNumber=1,
               ImagePositionPatient=[0, 0, 50.0], ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1])
    raises_naming(mixed, load_volume, mixed, match="different series")
    nopix = series(tmp_path / "nopix", graded_hu(k=3), uid="1.5.5")
    bad = dicom_file(nopix / "zz_nopix", np.zeros((8, 10)), series="1.5.5", pixel_data=False, InstanceNumber=9,
                     ImagePositionPatient=[-10.0, -20.0, 30.0], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    raises_naming(bad, load_volume, nopix, match="no pixel data")
    single = dicom_file(tmp_path / "one.dcm", np.zeros((8, 10)), series="1.6", ImagePositionPatient=[0, 0, 0],
                        ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    raises_naming(single, load_volume, single, match="2D")
    frames = dicom_file(tmp_path / "frames.dcm", np.zeros((3, 8, 10)), series="1.7", pixel_data=False, NumberOfFrames=3)
    raises_naming(frames, load_volume, frames, match="no pixel data")
    study = tmp_path / "study"
    series(study / "s1", graded_hu(k=3))
    raises_naming(study, load_volume, study, match="sub-folders")


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


# ---------------------------------------------------------------------------------- studies


def test_load_study_native_depth_varies_and_aligns(tmp_path: Path) -> None:
    a = nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (8, 8, 6)).astype(np.int16))
    b = nifti(tmp_path / "b.nii.gz", np.random.default_rng(1).integers(-1000, 1000, (8, 8, 10)).astype(np.int16))
    cfg = DataConfig(size=(4, 8, 8), slice_size=(8, 8), num_slices=-1, planes=("axial", "coronal"))
    sa, sb = load_study(a, cfg), load_study(b, cfg)
    assert sa.slices.shape == (1, 6 + 8, 1, 8, 8) and sb.slices.shape == (1, 10 + 8, 1, 8, 8)
    assert sa.native_depth == [6] and sb.native_depth == [10] and sa.volume.shape == (1, 1, 4, 8, 8)
    assert sb.slice_index[0, :10].tolist() == list(range(10)) and sb.slice_plane[0, 10:].tolist() == [1] * 8
    capped = load_study(b, DataConfig(size=(4, 8, 8), slice_size=(8, 8), num_slices=-1, max_slices=7))
    assert capped.slices.shape[1] == 7 and capped.native_depth == [10]
    both = load_study([a, b], cfg)  # one S per study: the first image's
    assert both.volume.shape == (2, 1, 4, 8, 8) and both.slices.shape == (2, 6 + 8, 1, 8, 8)
    assert both.native_depth == [6, 10] and both.slice_pos.shape == both.slice_plane.shape == (2, 14)
    fixed = load_study([a, b], DataConfig(size=(4, 8, 8), slice_size=(6, 6), num_slices=5))
    assert fixed.slices.shape == (2, 5, 1, 6, 6) and fixed.slice_index.dtype == torch.long
    with pytest.raises(DataError, match="missing.nii"):
        load_study([a, tmp_path / "missing.nii"], cfg)
    with pytest.raises(ValueError, match="DataConfig"):
        load_study(a, {"size": (4, 8, 8)})  # type: ignore[arg-type]


def test_augmentation_train_only_no_flip(tmp_path: Path) -> None:
    data = np.full((16, 16, 8), -1000, np.int16)
    data[2:5, 6:10, :] = 800  # a block on the patient's left (low x index = left in an identity/RAS affine)
    p = nifti(tmp_path / "left.nii.gz", data)
    cfg = DataConfig(size=(8, 16, 16), slice_size=(16, 16), num_slices=-1, augment=True)
    ev = load_study(p, cfg)
    assert torch.equal(ev.volume, load_study(p, cfg, train=False).volume)
    torch.manual_seed(0)
    tr1 = load_study(p, cfg, train=True)
    torch.manual_seed(0)
    assert torch.equal(tr1.volume, load_study(p, cfg, train=True).volume)  # seeded from torch
    for seed in range(6):
        torch.manual_seed(seed)
        tr = load_study(p, cfg, train=True)
        assert tr.volume.shape == ev.volume.shape and tr.slices.shape == ev.slices.shape
        assert 0.0 <= float(tr.volume.min()) and float(tr.volume.max()) <= 1.0
        for x in (tr.volume[0, 0], tr.slices[0, :, 0]):  # W grows to the right: the block stays left
            assert float(x[..., :8].sum()) > 3 * float(x[..., 8:].sum())
    assert len(build_transforms(cfg, train=True).transforms) > len(build_transforms(cfg, train=False).transforms)


def test_load_volume_from_config_matches(tmp_path: Path) -> None:
    p = nifti(tmp_path / "m.nii.gz", np.random.default_rng(2).integers(-1000, 1000, (10, 9, 8)).astype(np.int16))
    cfg = DataConfig(size=(4, 6, 6), hu_window=(-500.0, 500.0), num_slices=-1)
    assert torch.equal(load_volume_from_config(p, cfg), load_volume(p, size=(4, 6, 6), hu_window=(-500, 500)))
    assert torch.equal(load_study(p, cfg).volume[0], load_volume_from_config(p, cfg))


# ---------------------------------------------------------------------------------- cache


def test_cache_hit_identical_faster_and_corrupt_recovered(tmp_path: Path, monkeypatch) -> None:
    p = nifti(tmp_path / "c.nii.gz", np.random.default_rng(3).integers(-1000, 1000, (96, 96, 48)).astype(np.int16))
    cache = tmp_path / "cache"
    cfg = DataConfig(size=(16, 32, 32), slice_size=(32, 32), num_slices=-1, cache_dir=str(cache))
    nocache = DataConfig(size=(16, 32, 32), slice_size=(32, 32), num_slices=-1)
    cold_t, hit_t = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        ref = load_study(p, nocache)
        cold_t.append(time.perf_counter() - t0)
    first = load_study(p, cfg)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    for _ in range(3):
        t0 = time.perf_counter()
        hit = load_study(p, cfg)
        hit_t.append(time.perf_counter() - t0)
    for f in ("volume", "slices", "slice_plane", "slice_index", "slice_pos"):
        assert torch.equal(getattr(hit, f), getattr(ref, f)) and torch.equal(getattr(first, f), getattr(ref, f))
    assert hit.native_depth == ref.native_depth == [48]
    assert min(hit_t) < min(cold_t)
    monkeypatch.setattr(V, "_read", lambda *a, **k: pytest.fail("cache hit must not read the volume"))
    assert torch.equal(load_study(p, cfg).volume, ref.volume)
    monkeypatch.undo()
    files[0].write_bytes(b"\x00garbage" * 10)  # corrupt: deleted, recomputed, rewritten
    again = load_study(p, cfg)
    assert torch.equal(again.slices, ref.slices)
    assert V._cache_read(files[0]) is not None
    load_study(p, DataConfig(size=(16, 32, 32), slice_size=(32, 32), num_slices=-1, cache_dir=str(cache),
                             hu_window=(-500.0, 500.0)))
    assert len(list(cache.glob("*.safetensors"))) == 2  # the key holds the preprocessing fields
    study = load_study(p, cfg, train=True)  # augment off in cfg: the cached study as is
    assert isinstance(study, Study) and torch.equal(study.volume, ref.volume)
