"""Malformed input, at scale (issue 6): a generated matrix of broken volumes and datasets.

Every case writes its input into a tmp folder and must end in `medvlm3d.DataError` whose message
names the file (or the record: file + line / index) and says what went wrong, within TIME_LIMIT
seconds, without a hang or an interpreter crash:
  - RISKY cases (truncated and bit-flipped .nii.gz, headers claiming absurd sizes) run in one
    worker subprocess under an address-space limit of (its size after imports + 1.5 GiB): a
    reader that allocated what a header claims would fail there. Per case: outcome, seconds,
    growth of the peak RSS; the worker must exit 0 with no traceback. A crash or hang is pinned
    on the case in progress and the worker restarts with the remaining cases.
  - in-process cases (NIfTI headers, NaN/Inf, .npy, DICOM folders, JSONL / CSV / M3D-Cap /
    CT-RATE) run under a SIGALRM deadline (an autouse fixture; no pytest-timeout needed).
Behaviour tests follow: constant volumes (zeros + a warning), junk files beside a DICOM series
(skipped), a harmless gzip mtime flip, pickles that must never run, the chunked/strided NIfTI
reader against numpy, bounded memory when downsampling, the validation pass and its CLI verb,
YAML python tags, and a scan of the package for unsafe loading calls.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import medvlm3d.data.nifti as nifti_mod
from medvlm3d import ConfigError, DataError, load_config
from medvlm3d.cli import main as cli_main
from medvlm3d.config import DataConfig
from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS, METADATA_COLUMNS, REPORT_COLUMNS
from medvlm3d.data.formats.m3d_vqa import VQA_COLUMNS
from medvlm3d.data.readers import read_records, read_records_report
from medvlm3d.data.validate import validate_dataset
from medvlm3d.data.volume import load_study, load_volume, plan_strides

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


# ----------------------------------------------------------------- RISKY cases (in a subprocess)

RISKY: dict[str, Callable[[Path], Expect]] = {}


def _gz_base(d: Path) -> bytes:
    return write_nifti(d / "src.nii.gz").read_bytes()


def _pos(spec: str, n: int) -> int:
    """"half" -> n // 2; "-8" -> n - 8; "40" -> 40."""
    return n // 2 if spec == "half" else int(spec) % n if spec.startswith("-") else int(spec)


def _gz_case(d: Path, name: str, mutate: Callable[[bytearray], bytes], match: str) -> Expect:
    raw = bytearray(_gz_base(d))
    p = d / name
    p.write_bytes(mutate(raw))
    return Expect(p, [name], match)


for _c in ("0", "5", "40", "half", "-8", "-3"):  # empty, in the gzip header, early body, middle, trailer
    def _trunc(d: Path, cut: str = _c) -> Expect:
        def cut_at(raw: bytearray) -> bytes:
            return bytes(raw[: _pos(cut, len(raw))])
        return _gz_case(d, f"trunc{cut}.nii.gz", cut_at, r"cannot read|truncated|empty")
    RISKY[f"gz-truncated-at-{_c}"] = _trunc

# bit flips: gzip magic, method, flags; deflate stream (NIfTI header, then voxels, then its end);
# CRC-32 and ISIZE of the trailer. (A flip in the mtime bytes is harmless: a behaviour test.)
for _o in ("0", "2", "3", "12", "60", "half", "-12", "-6", "-2"):
    def _flip(d: Path, off: str = _o) -> Expect:
        def flip(raw: bytearray) -> bytes:
            raw[_pos(off, len(raw))] ^= 0x10
            return bytes(raw)
        return _gz_case(d, f"flip{off}.nii.gz", flip, r"cannot read|corrupt|truncated|CRC|invalid")
    RISKY[f"gz-bitflip-at-{_o}"] = _flip

_HUGE1 = [("<3h", 42, (32767, 32767, 32767))]  # NIfTI-1 dims are int16: the largest claim
_SIZE = r"truncated|header describes"
RISKY.update({
    "nii1-32767cubed-downsample": lambda d: Expect(edited(d / "h.nii", _HUGE1), ["h.nii"], _SIZE),
    "nii1-32767cubed-refuse-mode": lambda d: Expect(edited(d / "h.nii", _HUGE1), ["h.nii"], _SIZE,
                                                    {"oversize": "refuse"}),
    "nii1gz-32767cubed": lambda d: Expect(edited(d / "h.nii.gz", _HUGE1, gz=True), ["h.nii.gz"], _SIZE),
    "nii1gz-1000cubed-under-max-voxels": lambda d: Expect(
        edited(d / "k.nii.gz", [("<3h", 42, (1000, 1000, 1000))], gz=True), ["k.nii.gz"], _SIZE),
    "nii1gz-1000cubed-refuse-mode-small-max": lambda d: Expect(
        edited(d / "k.nii.gz", [("<3h", 42, (1000, 1000, 1000))], gz=True), ["k.nii.gz"], _SIZE + "|max_voxels",
        {"oversize": "refuse", "max_voxels": 10**6}),
    "nii2-1e6cubed": lambda d: Expect(edited(d / "n2.nii", [("<3q", 24, (10**6,) * 3)], two=True), ["n2.nii"], _SIZE),
    "nii2gz-1e6cubed": lambda d: Expect(edited(d / "n2.nii.gz", [("<3q", 24, (10**6,) * 3)], two=True, gz=True),
                                        ["n2.nii.gz"], _SIZE),
    "nii2-1e12cubed": lambda d: Expect(edited(d / "n2.nii", [("<3q", 24, (10**12,) * 3)], two=True), ["n2.nii"], _SIZE),
    "npy-claims-1e13-voxels": lambda d: Expect(
        npy_raw(d / "big.npy", {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000, 1000)}, bytes(64)),
        ["big.npy"], r"unreadable \.npy"),
    "dicom-65535x65535-rows-tiny-pixels": lambda d: Expect(
        series(d / "wide", [0, 1, 2], shape=(2, 2), Rows=65535, Columns=65535), ["IM0000"], "pixel data holds"),
    "dicom-multiframe-60000x4096x4096-tiny-pixels": lambda d: Expect(
        dicom_file(d / "mf.dcm", np.zeros((2, 2)), series=generate_uid(), NumberOfFrames=60000, Rows=4096,
                   Columns=4096), ["mf.dcm"], "pixel data holds"),
})  # fmt: skip

WORKER = r"""
import json, resource, signal, sys, time, warnings
class CaseTimeout(BaseException): pass
def fire(*_): raise CaseTimeout("time limit")
from medvlm3d.data.volume import load_volume
cases, limit, headroom = json.load(open(sys.argv[1])), float(sys.argv[2]), int(sys.argv[3])
try:
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print("LIMIT", vm + headroom, flush=True)
except (OSError, ValueError, StopIteration):
    print("LIMIT none", flush=True)
signal.signal(signal.SIGALRM, fire)
warnings.simplefilter("ignore")
for case in cases:
    print("START", case["id"], flush=True)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        load_volume(case["path"], size=(4, 4, 4), **case["kwargs"])
        out = {"type": "ok", "message": ""}
    except BaseException as e:
        out = {"type": type(e).__name__, "message": str(e)}
    signal.setitimer(signal.ITIMER_REAL, 0)
    out.update(id=case["id"], seconds=time.perf_counter() - t0,
               rss_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    print("RESULT", json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def risky(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build every RISKY case, run them in worker subprocesses; -> {"expect", "results", "runs"}."""
    root = tmp_path_factory.mktemp("risky")
    expect = {}
    for i, (cid, build) in enumerate(RISKY.items()):
        d = root / f"c{i:02d}"
        d.mkdir()
        expect[cid] = build(d)
    todo = [{"id": c, "path": str(e.target), "kwargs": e.kwargs} for c, e in expect.items()]
    results: dict[str, dict[str, Any]] = {}
    runs: list[tuple[int | None, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while todo:
        cases_file = root / f"cases{len(runs)}.json"
        cases_file.write_text(json.dumps(todo))
        cmd = [sys.executable, "-c", WORKER, str(cases_file), str(TIME_LIMIT), str(3 * 2**29)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=45 + 2 * len(todo), env=env)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            def text(b: Any) -> str:
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            rc, out, err = None, text(e.stdout), text(e.stderr) + "\n[killed: worker timeout]"
        runs.append((rc, err))
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r["id"]] = r
                started = None
        if started is not None:  # the worker died (or hung) during this case
            results[started] = {"type": "crash" if rc is not None else "hang", "message": err[-2000:],
                                "seconds": float("nan"), "rss_mb": 0.0}
        todo = [c for c in todo if c["id"] not in results]
        if started is None and todo:  # died before its first case (e.g. the import failed)
            for c in todo:
                results[c["id"]] = {"type": "worker-failed", "message": err[-2000:], "seconds": 0.0, "rss_mb": 0.0}
            todo = []
    return {"expect": expect, "results": results, "runs": runs}


@pytest.mark.slow  # the worker's start (imports) takes ~6 s, once for all the RISKY cases
@pytest.mark.parametrize("cid", list(RISKY))
def test_risky_input_in_subprocess(risky: dict[str, Any], cid: str) -> None:
    r, e = risky["results"][cid], risky["expect"][cid]
    assert r["type"] == "DataError", f"{cid}: {r['type']}: {r['message']}"
    assert all(n in r["message"] for n in e.names), r["message"]
    assert re.search(e.match, r["message"], re.I), r["message"]
    assert "MemoryError" not in r["message"]  # refused from the header, not by running out of memory
    assert r["seconds"] < TIME_LIMIT and r["rss_mb"] < 256, r


@pytest.mark.slow
def test_risky_worker_never_crashed(risky: dict[str, Any]) -> None:
    assert len(risky["runs"]) == 1, [err[-500:] for _, err in risky["runs"]]
    rc, err = risky["runs"][0]
    assert rc == 0, err[-2000:]
    for bad in ("Traceback", "Fatal Python error", "Segmentation fault", "core dumped"):
        assert bad not in err, err[-2000:]


# ------------------------------------------------------------------------ in-process volume cases

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
    "nii-plain-truncated": lambda d: Expect(_cut(write_nifti(d / "t.nii"), 600), ["t.nii"], "truncated"),
    "nii-empty-file": lambda d: Expect(_cut(write_nifti(d / "e.nii.gz"), 0), ["e.nii.gz"], "cannot read"),
    "nii-2d-image": _data_nii("flat.nii.gz", BASE[:, :, 0], "2D"),
    "nii-one-slice": _data_nii("slab.nii.gz", BASE[:, :, :1], "2D"),
    "nii-4d-3-timepoints": _data_nii("t.nii.gz", np.stack([BASE] * 3, -1), "3 time points"),
    "nii-nan-voxel": _data_nii("nan.nii", _with(np.nan), "NaN or Inf"),
    "nii-inf-voxel": _data_nii("inf.nii", _with(np.inf), "NaN or Inf"),
    "nii-minus-inf-voxel": _data_nii("minf.nii.gz", _with(-np.inf), "NaN or Inf"),
    "nii2-nan-voxel": _data_nii("nan2.nii.gz", _with(np.nan, np.float64), "NaN or Inf", two=True),
    "volume-file-missing": lambda d: Expect(d / "nowhere.nii.gz", ["nowhere.nii.gz"], "not found"),
    "volume-unknown-extension": lambda d: Expect(_touch(d / "scan.mha", b"x"), ["scan.mha"], "unknown volume format"),
})  # fmt: skip


def _cut(p: Path, n: int) -> Path:
    p.write_bytes(p.read_bytes()[:n])
    return p


def _touch(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _npy(name: str, arr: Any, match: str) -> Callable[[Path], Expect]:
    def build(d: Path) -> Expect:
        np.save(d / name, arr, allow_pickle=True)
        return Expect(d / name, [name], match)
    return build


_GOOD_NPY = RNG.uniform(0, 1, (1, 6, 8, 8)).astype(np.float32)
VOLUME.update({
    "npy-rank2": _npy("r2.npy", _GOOD_NPY[0, 0], r"expected \[1, D, H, W\]"),
    "npy-rank5": _npy("r5.npy", _GOOD_NPY[None], r"expected \[1, D, H, W\]"),
    "npy-3-channels": _npy("ch.npy", np.repeat(_GOOD_NPY, 3, 0), "channels"),
    "npy-complex": _npy("cx.npy", _GOOD_NPY.astype(np.complex64), "dtype"),
    "npy-strings": _npy("s.npy", np.full((4, 4, 4), "a"), "dtype"),
    "npy-bool": _npy("b.npy", _GOOD_NPY > 0.5, "dtype"),
    "npy-structured": _npy("st.npy", np.zeros((4, 4, 4), [("a", "f4"), ("b", "i4")]), "dtype"),
    "npy-uint8-0-255": _npy("u8.npy", (_GOOD_NPY * 255).astype(np.uint8), r"\[0, 1\]"),
    "npy-nan": _npy("nan.npy", np.where(_GOOD_NPY > 0.9, np.nan, _GOOD_NPY), "NaN or Inf"),
    "npy-inf": _npy("inf.npy", np.where(_GOOD_NPY > 0.9, np.inf, _GOOD_NPY), "NaN or Inf"),
    "npy-object-array-pickle": lambda d: _npy("obj.npy", np.array([Marker(d / "PWNED")], object), "unpickled")(d),
    "npy-raw-pickle-named-npy": lambda d: Expect(_touch(d / "p.npy", pickle.dumps(Marker(d / "PWNED"))), ["p.npy"],
                                                 "unreadable"),
    "npy-npz-archive-named-npy": lambda d: Expect(_npz(d / "z.npy"), ["z.npy"], "npz"),
    "npy-truncated-data": lambda d: Expect(_cut(_npy("t.npy", _GOOD_NPY, "")(d).target, 300), ["t.npy"], "unreadable"),
    "npy-truncated-header": lambda d: Expect(_cut(_npy("h.npy", _GOOD_NPY, "")(d).target, 40), ["h.npy"],
                                             "unreadable"),
    "npy-header-not-a-dict": lambda d: Expect(npy_raw(d / "x.npy", "__import__('os').mkdir('PWNED')"), ["x.npy"],
                                              "unreadable"),
})  # fmt: skip


def _npz(p: Path) -> Path:
    with p.open("wb") as fh:
        np.savez(fh, a=_GOOD_NPY)
    return p


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
    e = VOLUME[cid](tmp_path)
    check_error(lambda: load_volume(e.target, size=(4, 4, 4), **e.kwargs), e)
    assert not (tmp_path / "PWNED").exists()  # the pickle payloads never ran


# ---------------------------------------------------------------------- in-process dataset cases

DATASET: dict[str, Callable[[Path], Expect]] = {}
GOOD = {"id": "ok", "image": "v.npy", "task": "vqa", "question": "Is there a lesion?", "answer": "yes"}


def manifest(d: Path, second: str | bytes, *, first: dict[str, Any] | None = None) -> Path:
    """manifest.jsonl: a good record, then `second` as line 2; v.npy exists."""
    np.save(d / "v.npy", _GOOD_NPY)
    lines = [json.dumps(first or GOOD).encode(), second if isinstance(second, bytes) else second.encode()]
    (d / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d / "manifest.jsonl"


def _rec(**kw: Any) -> str:
    return json.dumps({**GOOD, "id": "r2", **kw})


def _man(second: str | bytes, match: str, record_level: bool = True) -> Callable[[Path], Expect]:
    return lambda d: Expect(manifest(d, second), ["manifest.jsonl line 2"], match, record_level=record_level)


DATASET.update({
    "jsonl-broken-line": _man('{"id": "r2", "image": ', "not a valid JSON"),
    "jsonl-deep-nesting": _man("[" * 100_000 + "]" * 100_000, "RecursionError"),
    "jsonl-5000-digit-integer": _man('{"id": ' + "9" * 5000 + "}", "not a valid JSON"),
    "jsonl-nan-constant": _man(_rec().replace('"yes"', "NaN"), "NaN"),
    "jsonl-not-utf8": _man(_rec(answer="caf").encode().replace(b"caf", b"caf\xe9"), "UTF-8"),
    "jsonl-nul-bytes": _man(b"\0\0\0\0", "not a valid JSON"),
    "jsonl-array-not-object": _man("[1, 2, 3]", "JSON object"),
    "jsonl-empty-answer": _man(_rec(answer=" "), "'answer' must be a non-empty"),
    "jsonl-unknown-task": _man(_rec(task="segmentation"), "unknown task 'segmentation'"),
    "jsonl-missing-field": _man(json.dumps({"id": "r2", "image": "v.npy", "task": "vqa"}), "missing required"),
    "jsonl-missing-image-file": _man(_rec(image="gone.nii.gz"), "image file not found.*gone.nii.gz"),
    "jsonl-duplicate-id": _man(_rec(id="ok"), "duplicate id 'ok'"),
    "jsonl-negative-slice-labels": _man(_rec(slice_labels=[-1]), "slice_labels"),
    "jsonl-utf16-file": lambda d: Expect(_touch(d / "u16.jsonl", json.dumps(GOOD).encode("utf-16")),
                                         ["u16.jsonl line 1"], "UTF-8", record_level=True),
    "jsonl-empty-file": lambda d: Expect(_touch(d / "empty.jsonl", b"\n\n"), ["empty.jsonl"], "no usable records"),
})  # fmt: skip


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    out = [",".join(header)] + [",".join(f'"{c}"' for c in r) for r in rows]
    return ("\n".join(out) + "\n").encode()


_VQA_ROW = ["M3D_Cap_npy/ct/a.npy", "caption", "3", "Which organ?", "Liver", "Lung", "Heart", "Brain", "Liver", "A"]


def vqa_csv(d: Path, header: list[str] = list(VQA_COLUMNS), rows: list[list[str]] | None = None,
            raw: bytes | None = None) -> Path:
    (d / "M3D_Cap_npy" / "ct").mkdir(parents=True)
    np.save(d / "M3D_Cap_npy" / "ct" / "a.npy", _GOOD_NPY)
    p = d / "M3D-VQA" / "vqa.csv"
    p.parent.mkdir()
    p.write_bytes(raw if raw is not None else _csv_bytes(header, [_VQA_ROW] + (rows or [])))
    return p


def _vqa(rows: list[list[str]], match: str, names: tuple[str, ...] = ("vqa.csv line 3",)) -> Callable[[Path], Expect]:
    return lambda d: Expect(vqa_csv(d, rows=rows), list(names), match, record_level=True)


def _row(**change: str) -> list[str]:
    row = list(_VQA_ROW)
    for k, v in change.items():
        row[VQA_COLUMNS.index(k.replace("_", " "))] = v
    return row


DATASET.update({
    "vqa-csv-missing-columns": lambda d: Expect(vqa_csv(d, header=list(VQA_COLUMNS[:4]) + ["Answer"]), ["vqa.csv"],
                                                "missing column", kind="m3d_vqa"),
    "vqa-csv-not-utf8": lambda d: Expect(vqa_csv(d, raw=_csv_bytes(list(VQA_COLUMNS), [_VQA_ROW]).replace(
        b"Liver", b"Li\xe9ver")), ["vqa.csv"], "UTF-8"),
    "vqa-csv-short-row": _vqa([_VQA_ROW[:6]], "6 fields"),
    "vqa-csv-empty-answer": _vqa([_row(Answer="")], "empty 'Question' or 'Answer'"),
    "vqa-csv-bad-question-type": _vqa([_row(Question_Type="banana")], "Question Type"),
    "vqa-csv-missing-image": _vqa([_row(Image_Path="M3D_Cap_npy/ct/none.npy")], "image file not found"),
    "vqa-csv-field-over-limit": lambda d: Expect(vqa_csv(d, rows=[_row(Text="x" * 200_000)]), ["vqa.csv"],
                                                 "malformed CSV"),
})  # fmt: skip


def cap_root(d: Path, text: bytes | None = b"study_findings: a nodule.", index: str | None = None,
             image: str = "M3D_Cap_npy/ct/a.npy") -> Path:
    (d / "M3D_Cap_npy" / "ct").mkdir(parents=True)
    np.save(d / "M3D_Cap_npy" / "ct" / "a.npy", _GOOD_NPY)
    if text is not None:
        (d / "M3D_Cap_npy" / "ct" / "text.txt").write_bytes(text)
    p = d / "M3D_Cap_npy" / "M3D_Cap.json"
    p.write_text(index if index is not None else json.dumps(
        {"train": [{"image": image, "text": "M3D_Cap_npy/ct/text.txt"}]}))
    return p


_CAP = ["M3D_Cap.json train[0]"]
DATASET.update({
    "cap-report-not-utf8": lambda d: Expect(cap_root(d, b"study_findings: caf\xe9"), _CAP + ["text.txt"], "UTF-8",
                                            record_level=True),
    "cap-report-missing": lambda d: Expect(cap_root(d, None), _CAP + ["text.txt"], "report file not found",
                                           record_level=True),
    "cap-report-empty": lambda d: Expect(cap_root(d, b"study_findings:   "), _CAP, "empty", record_level=True),
    "cap-image-missing": lambda d: Expect(cap_root(d, image="M3D_Cap_npy/ct/none.npy"), _CAP, "image file not found",
                                          record_level=True),
    "cap-index-broken-json": lambda d: Expect(cap_root(d, index='{"train": [{"image": '), ["M3D_Cap.json"],
                                              "not valid JSON", kind="m3d_cap"),
})  # fmt: skip

_VOL = "valid_1_a_1.nii.gz"


def ct_root(d: Path, reports: bytes | None = None, meta: list[str] | None = None,
            labels: list[str] | None = None) -> Path:
    ds = d / "dataset"
    (ds / "radiology_text_reports").mkdir(parents=True)
    vol = ds / "valid" / "valid_1" / "valid_1_a" / _VOL
    vol.parent.mkdir(parents=True)
    vol.write_bytes(b"")
    rep = reports if reports is not None else _csv_bytes(list(REPORT_COLUMNS), [[_VOL, "x", "y", "Findings.", "Imp."]])
    (ds / "radiology_text_reports" / "validation_reports.csv").write_bytes(rep)
    if meta is not None:
        (ds / "metadata").mkdir()
        (ds / "metadata" / "validation_metadata.csv").write_bytes(_csv_bytes(list(METADATA_COLUMNS), [meta]))
    if labels is not None:
        (ds / "multi_abnormality_labels").mkdir()
        (ds / "multi_abnormality_labels" / "valid_predicted_labels.csv").write_bytes(
            _csv_bytes(["VolumeName", *CT_RATE_LABELS], [labels]))
    return d


_REP = ["validation_reports.csv line 2"]
DATASET.update({
    "ctrate-reports-missing-columns": lambda d: Expect(
        ct_root(d, _csv_bytes(["VolumeName", "Findings_EN"], [[_VOL, "x"]])), ["validation_reports.csv"],
        "missing column"),
    "ctrate-reports-not-utf8": lambda d: Expect(ct_root(d, _csv_bytes(list(REPORT_COLUMNS), [
        [_VOL, "x", "y", "Findings.", "Imp."]]).replace(b"Findings.", b"Find\xefngs.")), ["validation_reports.csv"],
        "UTF-8"),
    "ctrate-findings-not-given": lambda d: Expect(ct_root(d, _csv_bytes(list(REPORT_COLUMNS), [
        [_VOL, "x", "y", "Not given.", "Imp."]])), _REP, "empty report", record_level=True),
    "ctrate-bad-volume-name": lambda d: Expect(ct_root(d, _csv_bytes(list(REPORT_COLUMNS), [
        ["scan.nii.gz", "x", "y", "F.", "I."]])), _REP, "VolumeName", record_level=True),
    "ctrate-metadata-slope-not-a-number": lambda d: Expect(ct_root(d, meta=[_VOL, "abc", "-1024", "[0.7, 0.7]", "1.5"]),
                                                           ["validation_metadata.csv line 2"], "RescaleSlope",
                                                           record_level=True),
    "ctrate-label-not-binary": lambda d: Expect(ct_root(d, labels=[_VOL] + ["2"] * len(CT_RATE_LABELS)),
                                                ["valid_predicted_labels.csv line 2"], "must be 0 or 1",
                                                record_level=True),
    "dataset-source-missing": lambda d: Expect(d / "nothing.jsonl", ["nothing.jsonl"], "does not exist"),
})  # fmt: skip


@pytest.mark.parametrize("cid", list(DATASET))
def test_malformed_dataset(tmp_path: Path, cid: str) -> None:
    e = DATASET[cid](tmp_path)
    check_error(lambda: read_records(e.target, e.kind), e)
    if e.record_level:  # a bad record, not a bad file: skip_bad_records lists it and reads on
        report = read_records_report(e.target, e.kind, skip_bad_records=True, allow_empty=True)
        assert any(all(n in msg for n in e.names) for _, msg in report.errors), report.errors


def test_matrix_is_large_enough() -> None:
    assert len(RISKY) + len(VOLUME) + len(DATASET) >= 50 and len(RISKY) >= 20


# ----------------------------------------------------------------------------------- behaviour


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


def test_junk_files_beside_a_series_are_skipped(tmp_path: Path) -> None:
    clean = series(tmp_path / "clean", [0, 2.5, 5, 7.5], uid="1.2.3.9")
    messy = series(tmp_path / "messy", [0, 2.5, 5, 7.5], uid="1.2.3.9")
    (messy / "notes.txt").write_text("not an image")
    (messy / ".DS_Store").write_bytes(np.random.default_rng(1).bytes(300))
    (messy / "DICOMDIR").write_bytes(b"\0" * 200)
    assert torch.equal(load_volume(clean, size=(4, 6, 8)), load_volume(messy, size=(4, 6, 8)))


def test_gzip_mtime_flip_is_harmless(tmp_path: Path) -> None:
    p = write_nifti(tmp_path / "a.nii.gz")
    raw = bytearray(p.read_bytes())
    raw[4] ^= 0x10  # MTIME in the gzip header: neither data nor covered by the CRC
    (tmp_path / "b.nii.gz").write_bytes(bytes(raw))
    assert torch.equal(load_volume(p, size=(4, 4, 4)), load_volume(tmp_path / "b.nii.gz", size=(4, 4, 4)))


def test_pickles_never_run(tmp_path: Path) -> None:
    control = tmp_path / "control.npy"
    np.save(control, np.array([Marker(tmp_path / "RAN")], object), allow_pickle=True)
    np.load(control, allow_pickle=True)  # what unpickling would do: the payload is live
    assert (tmp_path / "RAN").is_dir()
    np.save(tmp_path / "evil.npy", np.array([Marker(tmp_path / "PWNED")], object), allow_pickle=True)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(Marker(tmp_path / "PWNED")))
    for name in ("evil.npy", "raw.npy"):
        with pytest.raises(DataError, match=name):
            load_volume(tmp_path / name)
        with pytest.raises(DataError, match=name):
            load_study(tmp_path / name, DataConfig(size=(4, 4, 4)))
    (tmp_path / "m.jsonl").write_text(json.dumps({**GOOD, "image": "evil.npy"}) + "\n")
    report = validate_dataset(tmp_path / "m.jsonl", DataConfig(size=(4, 4, 4)))
    assert not report.ok and "evil.npy" in report.format()
    assert not (tmp_path / "PWNED").exists()


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


# ------------------------------------------------------------------------- the validation pass


def _mixed_dataset(d: Path) -> Path:
    """11 records: 3 unreadable lines, 5 whose volume fails (4 bad volumes), 3 good (2 volumes)."""
    np.save(d / "good.npy", _GOOD_NPY)
    write_nifti(d / "good.nii.gz")
    np.save(d / "nan.npy", np.where(_GOOD_NPY > 0.9, np.nan, _GOOD_NPY))
    _cut(write_nifti(d / "cut.nii.gz"), 500)
    series(d / "gap", [0, 2.5, 5, 10])
    lines = [_rec(id="g1", image="good.npy"), _rec(id="g2", image="good.nii.gz"), _rec(id="g3", image="good.npy"),
             _rec(id="n1", image="nan.npy"), _rec(id="n2", image="nan.npy"), _rec(id="c1", image="cut.nii.gz"),
             _rec(id="d1", image="gap"), '{"id": "broken", ', _rec(id="e1", answer=""),
             _rec(id="m1", image="missing.nii.gz"), _rec(id="multi", image=["good.npy", "cut.nii.gz"])]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    return d / "data.jsonl"


def test_validate_dataset_lists_every_bad_record_and_loads_each_volume_once(tmp_path: Path, monkeypatch) -> None:
    import medvlm3d.data.volume as volume

    source = _mixed_dataset(tmp_path)
    calls: list[Any] = []
    real = volume.load_study
    monkeypatch.setattr(volume, "load_study", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = DataConfig(size=(4, 8, 8), cache_dir=str(tmp_path / "cache"))
    report = validate_dataset(source, cfg)
    assert not report.ok and report.kind == "manifest"
    assert report.n_records == 8 and report.n_volumes == len(calls) == 6  # g3 reuses g1's volume
    assert report.bad_records == 8 and report.bad_volumes == 4
    by_stage = {s: [p for p in report.problems if p.stage == s] for s in ("record", "volume")}
    assert [p.where.rsplit(" ", 1)[-1] for p in by_stage["record"]] == ["8", "9", "10"]
    assert sorted(p.record_id for p in by_stage["volume"]) == ["c1", "d1", "multi", "n1", "n2"]
    text = report.format()
    for s in ("BAD", "data.jsonl line 8", "'e1'", "missing.nii.gz", "'n2'", "NaN or Inf", "cut.nii.gz",
              "slices missing"):
        assert s in text, s
    assert "'g1'" not in text and "'g3'" not in text
    assert json.loads(json.dumps(report.to_dict()))["bad_records"] == 8
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the good volumes, ready for training
    quick = validate_dataset(source, cfg, load_volumes=False)
    assert quick.bad_records == 3 and quick.n_volumes == 0 and "not loaded" in quick.format()


def test_validate_reports_instead_of_raising(tmp_path: Path) -> None:
    report = validate_dataset(tmp_path / "none.jsonl")
    assert [p.stage for p in report.problems] == ["source"] and "none.jsonl" in report.format()
    (tmp_path / "all_bad.jsonl").write_text("{oops\n" + _rec(task="caption") + "\n")
    report = validate_dataset(tmp_path / "all_bad.jsonl", load_volumes=False)
    assert report.bad_records == 2 and report.n_records == 0
    (tmp_path / "empty.jsonl").write_text("\n")
    report = validate_dataset(tmp_path / "empty.jsonl")
    assert not report.ok and "no records found" in report.format()
    with pytest.raises(ValueError, match="DataConfig"):
        validate_dataset(tmp_path / "none.jsonl", {"size": (4, 4, 4)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        validate_dataset(tmp_path / "none.jsonl", kind="dicom")


def test_validate_cli_exit_codes_table_and_json(tmp_path: Path, capsys) -> None:
    source = _mixed_dataset(tmp_path)
    out = tmp_path / "out" / "report.json"
    assert cli_main(["validate", "--data", str(source), "--json", str(out), "data.size=[4,8,8]"]) == 2
    text = capsys.readouterr().out
    assert "bad records" in text and "'n1'" in text and "data.jsonl line 8" in text
    saved = json.loads(out.read_text())
    assert saved["ok"] is False and saved["bad_records"] == 8 and len(saved["problems"]) == 8
    assert cli_main(["validate", "--data", str(source), "--no-volumes"]) == 2
    good = tmp_path / "good.jsonl"
    good.write_text(_rec(id="g1", image="good.npy") + "\n")
    assert cli_main(["validate", "--data", str(good), "data.size=[4,8,8]"]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["validate", "--data", str(good), "--config", str(tmp_path / "no_such.yaml")]) == 2
    assert cli_main(["validate", "--data", str(good), "data.nonsense=1"]) == 2


# ------------------------------------------------------------------------------- safe loading


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['mkdir {m}']",
    "!!python/object/apply:os.mkdir ['{m}']",
    "!!python/object/new:os.mkdir ['{m}']",
    "!!python/name:os.system",
    "!!python/module:os",
])  # fmt: skip
def test_yaml_python_tags_are_refused_and_never_run(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "RAN"
    value = tag.format(m=marker)
    (tmp_path / "evil.yaml").write_text(f"data:\n  train: {value}\n")
    (tmp_path / "child.yaml").write_text("base: evil.yaml\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        load_config(tmp_path / "evil.yaml")
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises((ConfigError, yaml.YAMLError)):  # key=value overrides are parsed with safe_load too
        load_config({}, [f"data.train={value}"])
    assert not marker.exists()


def _call(text: str, open_paren: int) -> str:
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren : i + 1]
    return text[open_paren:]


def test_no_unsafe_loading_calls_in_the_package() -> None:
    """np.load only with allow_pickle=False, torch.load only with weights_only=True, YAML only
    through safe_load, no pickle/joblib/dill loads, trust_remote_code never hard-wired on."""
    need = {r"\bnp\.load\(": "allow_pickle=False", r"\bnumpy\.load\(": "allow_pickle=False",
            r"\btorch\.load\(": "weights_only=True"}
    never = [r"\bpickle\.loads?\(", r"\bjoblib\.load\(", r"\bdill\.loads?\(", r"\byaml\.(load|full_load|unsafe_load)\(",
             r"yaml\.(Unsafe|Full)?Loader\b", r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False",
             r"allow_pickle\s*=\s*True"]
    bad, files = [], 0
    for folder in ("data", "model", "train", "eval", "medvlm3d"):
        for f in sorted((REPO / folder).rglob("*.py")):
            files += 1
            text = f.read_text(encoding="utf-8")
            for pattern, kw in need.items():
                for m in re.finditer(pattern, text):
                    if kw not in _call(text, m.end() - 1).replace(" ", ""):
                        bad.append(f"{f.relative_to(REPO)}: {m.group(0)} without {kw}")
            bad += [f"{f.relative_to(REPO)}: {m.group(0)}" for p in never for m in re.finditer(p, text)]
    assert files > 20 and not bad, bad
