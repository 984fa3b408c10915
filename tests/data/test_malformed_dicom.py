"""Malformed DICOM series (issue 6), in process: missing or duplicate slices, mixed series or
orientations, missing or short pixel data, truncated files, bad geometry, 2D and multiframe
files; and junk files beside a series, which are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from medvlm3d.data.volume import load_volume

from malformed_cases import Expect, check_volume_case, dicom_file, series
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)

VOLUME: dict[str, Callable[[Path], Expect]] = {}


def _iop_mixed(d: Path) -> Path:
    folder = series(d / "s", [0, 2.5])
    return dicom_file(folder / "IMX", np.zeros((6, 8)), series=_uid(folder), ImagePositionPatient=[0, 0, 5.0],
                      ImageOrientationPatient=[0, 1, 0, 0, 0, -1], PixelSpacing=[1, 1]).parent


def _uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def _dicom_with(d: Path, name: str, **kw: Any) -> Path:
    """A clean 4-slice series plus one extra file `name` built by dicom_file(**kw)."""
    folder = series(d / "s", [0, 2.5, 5, 7.5])
    pixels = kw.pop("pixels", np.zeros((6, 8)))
    dicom_file(folder / name, pixels, series=kw.pop("series", _uid(folder)), **kw)
    return folder


def _damage(folder: Path, name: str, keep: int) -> Path:
    p = folder / name
    p.write_bytes(p.read_bytes()[:keep])
    return folder


_AX = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "PixelSpacing": [1, 1]}
VOLUME.update({
    "dicom-one-slice-missing": lambda d: Expect(series(d / "gap", [0, 2.5, 5, 10, 12.5]), ["gap"],
                                                r"slices missing.*about 1 slice"),
    "dicom-three-slices-missing": lambda d: Expect(series(d / "gap3", [0, 2, 4, 12, 14, 16]), ["gap3"],
                                                   r"slices missing.*about 3 slice"),
    "dicom-two-gaps": lambda d: Expect(series(d / "gaps", [0, 1, 3, 4, 6, 7, 8]), ["gaps"], "1 more gap"),
    "dicom-duplicate-position": lambda d: Expect(series(d / "dup", [0, 2.5, 2.5, 5]), ["dup"], "same position"),
    "dicom-mixed-series": lambda d: Expect(_dicom_with(d, "OTHER", series="9.9.9", ImagePositionPatient=[0, 0, 10.0],
                                                       **_AX), ["OTHER", "9.9.9"], "2 different series"),
    "dicom-slice-without-pixel-data": lambda d: Expect(_dicom_with(d, "NOPIX", pixels=None, InstanceNumber=9,
                                                                   ImagePositionPatient=[0, 0, 10.0], **_AX),
                                                       ["NOPIX"], "no pixel data"),
    "dicom-no-pixel-data-at-all": lambda d: Expect(
        _nopix_series(d / "np"), ["IM0000"], "no pixel data"),
    "dicom-only-junk-files": lambda d: Expect(_junk(d / "junk"), ["junk"], "no DICOM files"),
    "dicom-empty-folder": lambda d: Expect(_mkdir(d / "empty"), ["empty"], "no DICOM files"),
    "dicom-truncated-header": lambda d: Expect(_damage(series(d / "th", [0, 2.5, 5]), "IM0001", 200),
                                               ["IM0001"], "SeriesInstanceUID"),
    "dicom-truncated-pixels": lambda d: Expect(_damage(series(d / "tp", [0, 2.5, 5]), "IM0001", -20),
                                               ["IM0001"], "pixel data"),
    "dicom-different-slice-sizes": lambda d: Expect(_dicom_with(d, "BIG", pixels=np.zeros((7, 8)),
                                                                ImagePositionPatient=[0, 0, 10.0], **_AX),
                                                    ["s"], "different sizes"),
    "dicom-mixed-orientations": lambda d: Expect(_iop_mixed(d), ["s"], "different ImageOrientationPatient"),
    "dicom-zero-orientation": lambda d: Expect(series(d / "z", [0, 1, 2], iop=[0, 0, 0, 0, 0, 0]), ["z"],
                                               "orthogonal unit"),
    "dicom-zero-pixel-spacing": lambda d: Expect(series(d / "ps", [0, 1, 2], spacing=(0, 0)), ["ps"], "geometry"),
    "dicom-zero-rows": lambda d: Expect(series(d / "zr", [0, 1, 2], shape=(2, 2), Rows=0, Columns=0), ["IM0000"],
                                        r"Rows x Columns = 0 x 0"),
    "dicom-single-2d-slice": lambda d: Expect(dicom_file(d / "one.dcm", np.zeros((6, 8)), series="1.6",
                                                         ImagePositionPatient=[0, 0, 0], **_AX), ["one.dcm"], "2D"),
    "dicom-multiframe-no-pixels": lambda d: Expect(dicom_file(d / "mf.dcm", None, series="1.7", NumberOfFrames=3),
                                                   ["mf.dcm"], "no pixel data"),
    "dicom-multiframe-short-pixels": lambda d: Expect(
        dicom_file(d / "mfs.dcm", np.zeros((6, 8)), series="1.8", NumberOfFrames=3), ["mfs.dcm"], "pixel data holds"),
})  # fmt: skip


def _nopix_series(folder: Path) -> Path:
    uid = generate_uid()
    for k in range(3):
        dicom_file(folder / f"IM{k:04d}", None, series=uid, ImagePositionPatient=[0, 0, float(k)], **_AX)
    return folder


def _junk(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(np.random.default_rng(1).bytes(300))
    (folder / "Thumbs.db").write_bytes(b"\0" * 130 + b"junk")
    return folder


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize("cid", list(VOLUME))
def test_malformed_volume(tmp_path: Path, cid: str) -> None:
    check_volume_case(VOLUME[cid], tmp_path)


def test_junk_files_beside_a_series_are_skipped(tmp_path: Path) -> None:
    clean = series(tmp_path / "clean", [0, 2.5, 5, 7.5], uid="1.2.3.9")
    messy = series(tmp_path / "messy", [0, 2.5, 5, 7.5], uid="1.2.3.9")
    (messy / "notes.txt").write_text("not an image")
    (messy / ".DS_Store").write_bytes(np.random.default_rng(1).bytes(300))
    (messy / "DICOMDIR").write_bytes(b"\0" * 200)
    assert torch.equal(load_volume(clean, size=(4, 6, 8)), load_volume(messy, size=(4, 6, 8)))
