"""Tests of medvlm3d.data.volume / dicom on DICOM input: series sorted by position with rescale,
sagittal geometry, MR intensity, multiframe files, and errors that name the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medvlm3d.data.volume import load_volume

from volume_helpers import ENH_CT_SOP, dicom_file, expected_graded, graded_hu, raises_naming, series

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
