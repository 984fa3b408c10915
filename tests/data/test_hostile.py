"""Hostile inputs, by class: special files never hang, memory is bounded from the header before
any read, and image paths may not escape the data root. Each case must end in a DataError that
names the file (or record) within a hard time limit."""

from __future__ import annotations

import gzip
import os
import resource
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

import medvlm3d.data.nifti as nifti_mod
from medvlm3d.config import DataConfig
from medvlm3d.data.errors import DataError
from medvlm3d.data.guard import check_regular, load_peak_bytes
from medvlm3d.data.readers import read_records
from medvlm3d.data.volume import load_volume, load_volume_from_config

LIMIT_S = 10.0
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


def within(limit: float, fn: Callable[[], Any]) -> BaseException | None:
    """Run fn in a daemon thread; fail the test if it has not finished after `limit` seconds (a
    hang); return the exception it raised (None if it returned)."""
    box: dict[str, BaseException | None] = {"e": None}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still running after {limit} s: a hang"
    return box["e"]


def assert_data_error(e: BaseException | None, *names: str, match: str = "") -> str:
    assert isinstance(e, DataError), f"expected DataError, got {type(e).__name__}: {e}"
    msg = str(e)
    for n in names:
        assert n in msg, msg
    if match:
        import re

        assert re.search(match, msg, re.I), msg
    return msg


def nifti_gz(path: Path, shape: tuple[int, int, int] = (8, 8, 8)) -> Path:
    nib.save(nib.Nifti1Image(np.ones(shape, np.int16), np.eye(4)), str(path))
    return path


# ------------------------------------------------------------------------ 1. special files


@pytest.mark.parametrize("name", ["x.npy", "x.nii.gz", "x.nii", "x.dcm", "noext"])
def test_fifo_named_as_a_volume_is_refused_at_once(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    os.mkfifo(p)
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    assert_data_error(e, str(p), match="FIFO")


def test_fifo_inside_a_dicom_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "notes.txt").write_text("not dicom")
    os.mkfifo(folder / "IM0001")
    e = within(LIMIT_S, lambda: load_volume(folder, size=(8, 8, 8)))
    assert_data_error(e, str(folder / "IM0001"), match="FIFO")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "socket"])
def test_symlink_to_a_special_file_is_refused(tmp_path: Path, target: str) -> None:
    if target == "fifo":
        dest = tmp_path / "pipe"
        os.mkfifo(dest)
    elif target == "socket":
        dest = tmp_path / "s.sock"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(dest))
    else:
        dest = Path(target)
    link = tmp_path / "vol.nii.gz"
    link.symlink_to(dest)
    e = within(LIMIT_S, lambda: load_volume(link, size=(8, 8, 8)))
    assert_data_error(e, str(link), match="symlink to")
    if target == "socket":
        sock.close()


def test_device_named_by_path_is_refused() -> None:
    e = within(LIMIT_S, lambda: load_volume("/dev/zero", size=(8, 8, 8)))
    assert_data_error(e, "/dev/zero", match="character device")


@pytest.mark.parametrize("name,kind", [("m.jsonl", "auto"), ("m.jsonl", "manifest"), ("v.csv", "auto"),
                                       ("v.csv", "m3d_vqa"), ("c.json", "auto")])
def test_fifo_named_as_a_data_source_is_refused(tmp_path: Path, name: str, kind: str) -> None:
    p = tmp_path / name
    os.mkfifo(p)
    e = within(LIMIT_S, lambda: read_records(p, kind))
    assert_data_error(e, str(p), match="FIFO")


def test_check_regular_accepts_files_folders_and_links_to_them(tmp_path: Path) -> None:
    f = tmp_path / "a.npy"
    f.write_bytes(b"x")
    (tmp_path / "link").symlink_to(f)
    for p in (f, tmp_path, tmp_path / "link", tmp_path / "missing"):
        check_regular(p)
    with pytest.raises(DataError, match="not a regular file; expected .* as a regular file$"):
        check_regular(tmp_path, "a DICOM member", dir_ok=False)


# ------------------------------------------------------------------- 2. memory from the header


def _forge_dims(path: Path, dims: tuple[int, int, int], isize: int) -> Path:
    """Rewrite the dims of a .nii.gz header and forge its gzip ISIZE trailer to `isize`."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[42:48] = struct.pack("<3h", *dims)
    blob = bytearray(gzip.compress(bytes(raw)))
    blob[-4:] = struct.pack("<I", isize % 2**32)
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("dims", [(30000, 30000, 30000), (2000, 2000, 600), (32767, 2, 32767)])
def test_forged_nifti_dims_with_forged_trailer_refused_before_reading(tmp_path: Path, dims) -> None:
    p = nifti_gz(tmp_path / "forged.nii.gz")
    need = 352 + int(np.prod(dims)) * 2
    _forge_dims(p, dims, need)  # the trailer agrees with the lie
    t0 = time.perf_counter()
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    msg = assert_data_error(e, str(p), str(tuple(dims)), match="max_load_bytes=2147483648")
    assert "header describes" in msg and time.perf_counter() - t0 < 2.0


def test_forged_dims_within_budget_end_as_truncated_not_trusted(tmp_path: Path) -> None:
    p = _forge_dims(nifti_gz(tmp_path / "short.nii.gz"), (200, 200, 200), 352 + 200**3 * 2)
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    assert_data_error(e, str(p), match="truncated")


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gzip_stream(path: Path, head: bytes, zeros: int) -> Path:
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(head)
        chunk = bytes(2**20)
        for _ in range(zeros // len(chunk)):
            fh.write(chunk)
    return path


def _nifti_header(dims: tuple[int, int, int]) -> bytes:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape(dims)
    return img.header.binaryblock + b"\0" * 4  # 348 + extension flag = vox_offset 352


def test_gzip_bomb_with_a_truthful_header_is_refused_fast(tmp_path: Path) -> None:
    dims = (400, 500, 500)  # 200 MB of int16 zeros, compressed to a few hundred KB
    p = _gzip_stream(tmp_path / "bomb.nii.gz", _nifti_header(dims), 200 * 2**20)
    assert p.stat().st_size < 2**20
    cfg = DataConfig(size=(8, 8, 8), max_load_bytes=50 * 2**20)
    before, t0 = _rss_peak_mib(), time.perf_counter()
    e = within(LIMIT_S, lambda: load_volume_from_config(p, cfg))
    assert_data_error(e, str(p), "(400, 500, 500)", match=f"max_load_bytes={50 * 2**20}")
    assert time.perf_counter() - t0 < 1.0 and _rss_peak_mib() - before < 40


def test_gzip_bomb_behind_a_small_header_stops_early(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(nifti_mod, "MAX_GZ_EXTRA", 2**20)
    p = _gzip_stream(tmp_path / "tail.nii.gz", _nifti_header((8, 8, 8)) + bytes(1024), 64 * 2**20)
    t0 = time.perf_counter()
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    assert_data_error(e, str(p), match="more than the header describes")
    assert time.perf_counter() - t0 < 2.0


def _dicom(path: Path, rows: int, cols: int, frames: int, series: str, z: float = 0.0) -> Path:
    """An RLE-compressed (encapsulated) CT file declaring rows x cols x frames with a few bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_SOP, generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_SOP, meta.MediaStorageSOPInstanceUID, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], [1, 0, 0, 0, 1, 0]
    ds.SpacingBetweenSlices = 1.0
    ds.PixelData = encapsulate([bytes(8)] * frames)
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("frames", [2, 40])
def test_dicom_multiframe_declaring_30000_squared_is_refused_before_decoding(tmp_path: Path, frames: int) -> None:
    p = _dicom(tmp_path / "mf.dcm", 30000, 30000, frames, generate_uid())
    before = _rss_peak_mib()
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    assert_data_error(e, str(p), f"(30000, 30000, {frames})", match="max_load_bytes")
    assert _rss_peak_mib() - before < 100


def test_dicom_series_declaring_huge_slices_is_refused_over_the_whole_series(tmp_path: Path) -> None:
    uid, folder = generate_uid(), tmp_path / "series"
    for k in range(3):
        _dicom(folder / f"IM{k}", 30000, 30000, 1, uid, z=float(k))
    e = within(LIMIT_S, lambda: load_volume(folder, size=(8, 8, 8)))
    assert_data_error(e, str(folder), "(30000, 30000, 3)", match="max_load_bytes")
    # a series each of whose slices fits, but not all of them together (budget 8 MiB)
    folder2 = tmp_path / "tall"
    for k in range(20):
        _dicom(folder2 / f"IM{k}", 512, 512, 1, uid, z=float(k))
    cfg = DataConfig(size=(8, 8, 8), max_load_bytes=8 * 2**20)
    e = within(LIMIT_S, lambda: load_volume_from_config(folder2, cfg))
    assert_data_error(e, str(folder2), "(512, 512, 20)", match="max_load_bytes")


def _npy_header(path: Path, shape: tuple[int, ...], descr: str = "<f4", size: int | None = None) -> Path:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    with path.open("wb") as fh:
        fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text)
        if size is not None:
            fh.truncate(fh.tell() + size)  # a sparse file: the claimed bytes "exist", none written
    return path


def test_npy_header_claiming_a_huge_shape_is_refused_from_the_header(tmp_path: Path) -> None:
    p = _npy_header(tmp_path / "huge.npy", (1, 100000, 100000, 1000))
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    assert_data_error(e, str(p), "(1, 100000, 100000, 1000)", match="header describes")
    q = _npy_header(tmp_path / "sparse.npy", (200, 500, 500), size=200 * 500 * 500 * 4)  # 200 MB, sparse
    cfg = DataConfig(size=(8, 8, 8), max_load_bytes=50 * 2**20)
    e = within(LIMIT_S, lambda: load_volume_from_config(q, cfg))
    assert_data_error(e, str(q), "(200, 500, 500)", match=f"max_load_bytes={50 * 2**20}")


def test_npy_object_header_is_refused_never_unpickled(tmp_path: Path) -> None:
    p = _npy_header(tmp_path / "obj.npy", (2, 2, 2), descr="|O")
    e = within(LIMIT_S, lambda: load_volume(p, size=(8, 8, 8)))
    assert_data_error(e, str(p), match="object")


def test_budget_formula_and_a_normal_volume_fits(tmp_path: Path) -> None:
    assert load_peak_bytes((10, 10, 10), 2, 1000) == 2000 + 2 * 4 * 1000
    assert DataConfig().max_load_bytes == 2 * 1024**3
    p = nifti_gz(tmp_path / "ok.nii.gz", (16, 16, 16))
    assert load_volume(p, size=(8, 8, 8)).shape == (1, 8, 8, 8)
    np.save(tmp_path / "ok.npy", np.zeros((1, 8, 16, 16), np.float32))
    assert load_volume(tmp_path / "ok.npy", size=(8, 8, 8), max_load_bytes=10**6).shape == (1, 8, 8, 8)
    with pytest.raises(DataError, match="ok.npy.*max_load_bytes=1000 "):
        load_volume(tmp_path / "ok.npy", size=(8, 8, 8), max_load_bytes=1000)


# ---------------------------------------------------------------------- 3. the data root


def _manifest(folder: Path, images: list[Any]) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"r{i}", "image": im, "task": "report", "question": "Q?", "answer": "A."})
             for i, im in enumerate(images)]
    path = folder / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    p = tmp_path / "secret.npy"
    np.save(p, np.zeros((1, 4, 4, 4), np.float32))
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "in.npy", np.zeros((1, 4, 4, 4), np.float32))
    return p


@pytest.mark.parametrize("image", ["../secret.npy", "sub/../../secret.npy", "ABS", ["in.npy", "../secret.npy"],
                                   "LINK"])
def test_image_outside_the_manifest_folder_is_refused(tmp_path: Path, outside: Path, image: Any) -> None:
    data = tmp_path / "data"
    if image == "ABS":
        image = str(outside)
    if image == "LINK":
        (data / "link.npy").symlink_to(outside)
        image = "link.npy"
    m = _manifest(data, ["in.npy", image])
    e = within(LIMIT_S, lambda: read_records(m))
    assert_data_error(e, "(id 'r1')", "secret.npy", match="outside the data root.*allow_outside_root")
    recs = read_records(m, allow_outside_root=True)
    assert len(recs) == 2 and recs[0]["image"] == str(data / "in.npy")


def test_outside_root_is_allowed_by_data_root_and_skipped_when_asked(tmp_path: Path, outside: Path) -> None:
    m = _manifest(tmp_path / "data", ["in.npy", "../secret.npy"])
    assert len(read_records(m, data_root=tmp_path)) == 2  # the given data_root holds both
    assert [r["id"] for r in read_records(m, skip_bad_records=True)] == ["r0"]
    assert DataConfig().allow_outside_root is False


def test_m3d_vqa_path_escaping_the_m3d_root_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "m3d"
    (root / "vqa").mkdir(parents=True)
    cols = "Image Path,Question Type,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer Choice\n"
    csv = root / "vqa" / "v.csv"
    csv.write_text(cols + "../secret.npy,1,Which plane?,axial,coronal,,,axial,A\n")
    e = within(LIMIT_S, lambda: read_records(csv, check_files=False))
    assert_data_error(e, "secret.npy", match="outside the data root")


def test_m3d_cap_report_text_escaping_the_root_is_never_read(tmp_path: Path, outside: Path) -> None:
    import json

    root = tmp_path / "m3d"
    (root / "cap").mkdir(parents=True)
    (tmp_path / "passwd.txt").write_text("root:x:0:0")
    index = root / "cap" / "M3D_Cap.json"
    index.write_text(json.dumps({"train": [{"image": "a.npy", "text": "../passwd.txt"}]}))
    e = within(LIMIT_S, lambda: read_records(index, check_files=False))
    assert_data_error(e, "passwd.txt", match="text .* outside the data root")
    recs = read_records(index, check_files=False, allow_outside_root=True)
    assert recs[0]["answer"] == "root:x:0:0"
