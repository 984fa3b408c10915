"""Shared pieces of the malformed-input tests (tests/data/test_malformed_*.py, issue 6).

Every case writes its input into a tmp folder and must end in `medvlm3d.DataError` whose message
names the file (or the record: file + line / index) and says what went wrong, within TIME_LIMIT
seconds, without a hang or an interpreter crash. Here: the per-case deadline (an autouse fixture
that each test module imports: a SIGALRM timer, no pytest-timeout needed), `Expect` (what a case
must raise) and `check_error`, and the writers of broken inputs: NIfTI files with raw header
edits ([X, Y, Z] int16 BASE), DICOM slices and series, hand-written .npy headers, a pickle
`Marker`, and a JSONL manifest with one good record (GOOD) then a given line 2.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medvlm3d import DataError
from medvlm3d.data.volume import load_volume

TIME_LIMIT = 5.0  # seconds per case
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
REPO = Path(__file__).resolve().parents[2]


class CaseTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no loader's `except Exception` can swallow it."""


@pytest.fixture(autouse=True)
def deadline():
    def fire(*_: Any) -> None:
        raise CaseTimeout(f"over {TIME_LIMIT} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < TIME_LIMIT


@dataclass
class Expect:
    """What a case must raise: a DataError naming every string of `names` and matching `match`."""

    target: Path
    names: list[str]
    match: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "auto"  # dataset cases: read_records kind
    record_level: bool = False  # dataset cases: a bad record (listed by skip_bad_records), not a bad file


def check_error(fn: Callable[[], Any], e: Expect) -> str:
    t0 = time.perf_counter()
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert all(n in msg for n in e.names), f"{e.names} not in: {msg}"
    assert re.search(e.match, msg, re.I), f"{e.match!r} not in: {msg}"
    assert time.perf_counter() - t0 < TIME_LIMIT
    return msg


def check_volume_case(build: Callable[[Path], Expect], tmp_path: Path) -> None:
    """One in-process volume case (test_malformed_{nifti,npy,dicom}.py): build it in tmp_path, load it."""
    e = build(tmp_path)
    check_error(lambda: load_volume(e.target, size=(4, 4, 4), **e.kwargs), e)
    assert not (tmp_path / "PWNED").exists()  # the pickle payloads never ran


# ------------------------------------------------------------------------------------- writers

RNG = np.random.default_rng(0)
BASE = RNG.normal(0, 400, (12, 10, 8)).astype(np.int16)  # [X, Y, Z]


def write_nifti(path: Path, data: np.ndarray = BASE, two: bool = False) -> Path:
    img = (nib.Nifti2Image if two else nib.Nifti1Image)(data, np.diag([0.8, 0.8, 2.0, 1.0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def edited(path: Path, edits: list[tuple[str, int, tuple[Any, ...]]], data: np.ndarray = BASE, two: bool = False,
           gz: bool = False) -> Path:
    """A NIfTI file with raw header fields overwritten: (struct format, byte offset, values)."""
    raw = bytearray(write_nifti(path.with_name("src.nii"), data, two).read_bytes())
    for fmt, off, vals in edits:
        struct.pack_into(fmt, raw, off, *vals)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return path


def dicom_file(path: Path, pixels: np.ndarray | None, *, series: str, **tags: Any) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_SOP, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_SOP, meta.MediaStorageSOPInstanceUID, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    shape = (6, 8) if pixels is None else pixels.shape[-2:]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels is not None:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def series(folder: Path, zs: list[float], *, uid: str | None = None, value: Callable[[int], float] = lambda k: 100 * k,
           shape: tuple[int, int] = (6, 8), iop: list[float] | None = None, spacing: tuple[float, float] = (1.0, 1.0),
           **tags: Any) -> Path:
    """One slice file per z position (axial); slice k holds stored value `value(k)` (intercept -1024)."""
    uid = uid or generate_uid()
    for k, z in enumerate(zs):
        dicom_file(folder / f"IM{k:04d}", np.full(shape, value(k)), series=uid, InstanceNumber=k + 1,
                   ImagePositionPatient=[0.0, 0.0, float(z)], ImageOrientationPatient=iop or [1, 0, 0, 0, 1, 0],
                   PixelSpacing=list(spacing), RescaleIntercept=-1024, RescaleSlope=1, **tags)
    return folder


def npy_raw(path: Path, header: Any, payload: bytes = b"") -> Path:
    """An .npy file with a hand-written header (anything, even not a dict) and payload."""
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload)
    return path


class Marker:
    """Unpickling this creates the folder `path` (os.mkdir): proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def cut(p: Path, n: int) -> Path:
    p.write_bytes(p.read_bytes()[:n])
    return p


def touch(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


GOOD_NPY = RNG.uniform(0, 1, (1, 6, 8, 8)).astype(np.float32)  # [1, D, H, W]
GOOD = {"id": "ok", "image": "v.npy", "task": "vqa", "question": "Is there a lesion?", "answer": "yes"}


def manifest(d: Path, second: str | bytes, *, first: dict[str, Any] | None = None) -> Path:
    """manifest.jsonl: a good record, then `second` as line 2; v.npy exists."""
    np.save(d / "v.npy", GOOD_NPY)
    lines = [json.dumps(first or GOOD).encode(), second if isinstance(second, bytes) else second.encode()]
    (d / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d / "manifest.jsonl"


def rec(**kw: Any) -> str:
    return json.dumps({**GOOD, "id": "r2", **kw})
