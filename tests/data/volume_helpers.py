"""Writers and checks shared by the volume tests (tests/data/test_volume*.py).

Tiny volumes written with nibabel, pydicom 3 and numpy: `nifti(path, data [X, Y, Z])`,
`dicom_file` (one slice or a multiframe file), `series(folder, hu [K, rows, cols])` (axial,
z = 2.5 k mm, shuffled names), `graded_hu` / `expected_graded` (slice k at -500 + 200 k HU),
`raises_naming` (a DataError naming the file).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medvlm3d.data.errors import DataError

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
