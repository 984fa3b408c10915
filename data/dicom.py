"""DICOM reading with pydicom 3: a series folder, or one multi-frame (enhanced) file.

    read_dicom(path, plan) -> DicomVolume
        array  float32 [X, Y, Z]: X = columns, Y = rows, Z = slices (frames) sorted along the
               slice normal; values after RescaleSlope / RescaleIntercept (HU for CT)
        affine float64 [4, 4]: voxel index (x, y, z) -> RAS world millimetres (MONAI / nibabel
               convention), ready for `monai.transforms.Orientation`
        modality "ct" | "mri" | "" (from the Modality tag; "" when neither CT nor MR)
        shape  (X, Y, Z) as stored, before any oversize stride

Why not MONAI's `PydicomReader`: with MONAI 1.6.1 it orders a series by InstanceNumber and
takes the slice spacing from the z coordinate only, and for enhanced multi-frame files it falls
back to an identity affine. Here slices are sorted by ImagePositionPatient projected on the
slice normal (the cross product of the two ImageOrientationPatient direction cosines); file
names and InstanceNumber are never used for the order (InstanceNumber only as a fallback, with
a warning, when a file has no geometry at all).

Malformed series are DataErrors naming the folder or file: no DICOM file, several series
(SeriesInstanceUID) or orientations in one folder, a DICOM file without SeriesInstanceUID (a
truncated or damaged header), two slices at one position, slices of different sizes, a file
without pixel data or with undecodable pixel data. Files that are not DICOM at all (notes,
.DS_Store, thumbnails) are skipped (logged at debug level), as a PACS import would; a FIFO,
socket or device in the folder is a DataError (it would block the reader).

Missing slices are an error, not a warning: when a gap between neighbouring slices exceeds
`GAP_FACTOR` (1.5) times the median spacing, the series is refused, naming the positions
around the gap and about how many slices are missing. A radiologist treats such a series as
incomplete (a finding may lie in the gap) and would not read it as a silently compressed or
interpolated volume; for training, its z geometry and its native slice indices (the manifest's
`slice_labels`) would be wrong. Small irregularities (rounded positions; spacing within 1.5x of
the median) are accepted and averaged (a warning above 10 %). A gap at either end of a series
cannot be seen and is not checked. With `skip_bad_records` such a study is logged and skipped.

`plan(shape_xyz) -> strides_xyz` comes from the caller (see `volume.plan_strides`): it refuses
or stride-subsamples an oversized series *before* any float array is allocated; only the kept
slices / frames are decoded.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels

from .errors import DataError
from .guard import Budget, check_regular

logger = logging.getLogger(__name__)

Plan = Callable[[tuple[int, int, int]], tuple[int, int, int]]
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GAP_FACTOR = 1.5  # a gap over this many median spacings means missing slices


@dataclass
class DicomVolume:
    array: np.ndarray  # float32 [X, Y, Z]
    affine: np.ndarray  # [4, 4] RAS
    modality: str  # "ct" | "mri" | ""
    shape: tuple[int, int, int]  # (X, Y, Z) as stored, before any oversize stride


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble ('DICM' at byte 128)."""
    return path.is_file() and pydicom.misc.is_dicom(str(path))


def _modality(ds: Any) -> str:
    return {"CT": "ct", "MR": "mri"}.get(str(ds.get("Modality", "")).upper(), "")


def _item(ds: Any, seq: str) -> Any:
    value = ds.get(seq)
    return value[0] if value else None


def _group_attr(ds: Any, frame: Any, seq: str, attr: str) -> Any:
    """`attr` from the per-frame functional group, else the shared group, else the top level."""
    for group in (frame, _item(ds, "SharedFunctionalGroupsSequence")):
        item = _item(group, seq) if group is not None else None
        if item is not None and attr in item:
            return item.get(attr)
    return ds.get(attr)


def _rescale(ds: Any, frame: Any = None) -> tuple[float, float]:
    slope = _group_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    inter = _group_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return float(1.0 if slope is None else slope), float(0.0 if inter is None else inter)


def _affine(iop: Sequence[float], first: np.ndarray, step: np.ndarray, spacing: Sequence[float],
            strides: tuple[int, int, int]) -> np.ndarray:
    """RAS affine of the [X=columns, Y=rows, Z=slices] array (DICOM is LPS)."""
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * float(spacing[1]) * strides[0]  # along a row = increasing column index
    lps[:3, 1] = col_dir * float(spacing[0]) * strides[1]  # down a column = increasing row index
    lps[:3, 2] = step * strides[2]
    lps[:3, 3] = first
    return _LPS_TO_RAS @ lps


def _order(
    positions: list[Any], iop: Any, fallback: list[int], where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, first position, step vector) from ImagePositionPatient along the slice normal."""
    n = len(positions)
    if iop is None or any(p is None for p in positions):
        warnings.warn(f"{where}: ImagePositionPatient/ImageOrientationPatient missing; slices ordered by "
                      "InstanceNumber and the affine assumes axial 1 mm slices", stacklevel=3)
        return np.argsort(np.asarray(fallback), kind="stable"), np.zeros(3), np.array([0.0, 0.0, 1.0])
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    pos = np.asarray(positions, dtype=float)
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    gaps = np.diff(proj[order])
    if n > 1 and np.any(gaps < 1e-4):
        k = int(np.argmin(gaps))
        raise DataError(f"{where}: two slices lie at the same position ({proj[order][k]:.3f} mm along the slice "
                        "normal); expected one volume per series (several acquisitions mixed?)")
    _check_gaps(proj[order], where)
    step = (pos[order[-1]] - pos[order[0]]) / (n - 1) if n > 1 else normal
    return order, pos[order[0]], step


def _check_gaps(sorted_proj: np.ndarray, where: str) -> None:
    """DataError when a slice spacing exceeds GAP_FACTOR x the median (missing slices)."""
    gaps = np.diff(sorted_proj)
    if gaps.size < 2:
        return
    med = float(np.median(gaps))
    big = np.flatnonzero(gaps > GAP_FACTOR * med)
    if big.size:
        k = int(big[np.argmax(gaps[big])])
        missing = max(1, int(round(gaps[k] / med)) - 1)
        more = f"; {big.size - 1} more gap(s)" if big.size > 1 else ""
        raise DataError(
            f"{where}: slices missing from the series: a gap of {gaps[k]:.3g} mm between the slices at "
            f"{sorted_proj[k]:.3f} and {sorted_proj[k + 1]:.3f} mm along the slice normal, where the spacing is "
            f"{med:.3g} mm (about {missing} slice(s) missing{more}); expected evenly spaced slices of one "
            "complete series"
        )
    if float(gaps.max() - gaps.min()) > 0.1 * med:
        warnings.warn(f"{where}: uneven slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm); the mean step "
                      "is used", stacklevel=4)


def _check_pixels(ds: Any, where: str, frames: int) -> None:
    """Pixel data present and, when stored uncompressed, long enough for the declared frames of
    Rows x Columns: checked on the header (pixel data not loaded) before any array is allocated."""
    tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise DataError(f"{where}: DICOM file has no pixel data; expected an image")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise DataError(f"{where}: Rows x Columns = {rows} x {cols}; expected a non-empty image")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        return  # encapsulated fragments: the decoder checks them
    elem = ds.get_item(tag)
    length = getattr(elem, "length", None)
    if length is None:
        length = len(elem.value) if isinstance(elem.value, (bytes, bytearray)) else None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if length is None or length == 0xFFFFFFFF or bits < 8:
        return
    need = rows * cols * int(ds.get("SamplesPerPixel", 1) or 1) * (bits // 8) * frames
    if length < need:
        raise DataError(f"{where}: pixel data holds {length} bytes, but {frames} frame(s) of {rows} x {cols} at "
                        f"{bits} bits need {need}; truncated or damaged file")


def _check_iop(iops: list[Any], where: str) -> Any:
    known = [np.asarray(v, float) for v in iops if v is not None]
    for v in known[:1]:
        if v.shape != (6,) or not np.isfinite(v).all() or not np.allclose(
            [np.linalg.norm(v[:3]), np.linalg.norm(v[3:]), v[:3] @ v[3:]], [1.0, 1.0, 0.0], atol=1e-2
        ):
            raise DataError(f"{where}: ImageOrientationPatient {v.tolist()} is not two orthogonal unit vectors; "
                            "expected the row and column direction cosines")
    if known and any(not np.allclose(v, known[0], atol=1e-3) for v in known):
        raise DataError(f"{where}: slices have different ImageOrientationPatient; expected one volume")
    return known[0] if len(known) == len(iops) else None


def _bytes_per_sample(ds: Any) -> int:
    return max(1, int(ds.get("BitsAllocated", 16) or 16) // 8) * max(1, int(ds.get("SamplesPerPixel", 1) or 1))


def read_series(folder: Path, plan: Plan, budget: Budget | None = None) -> DicomVolume:
    """A folder of single-frame DICOM files of one series (a lone multi-frame file also works)."""
    headers: list[tuple[Path, Any]] = []
    members = sorted(p for p in folder.iterdir() if not p.is_dir() and p.name.upper() != "DICOMDIR")
    for f in members:
        check_regular(f, "a DICOM series member", dir_ok=False)  # a FIFO here would block dcmread
    for f in members:
        try:
            headers.append((f, pydicom.dcmread(f, defer_size="4 KB")))  # pixel data seen, not loaded
        except InvalidDicomError:
            logger.debug("%s: not a DICOM file, skipped", f)
        except Exception as e:  # truncated or damaged header
            raise DataError(f"{f}: unreadable DICOM file: {type(e).__name__}: {e}") from e
    if not headers:
        subs = sum(1 for p in folder.iterdir() if p.is_dir())
        hint = f" (it holds {subs} sub-folders: give one series folder)" if subs else ""
        raise DataError(f"{folder}: no DICOM files found{hint}; expected a folder holding one DICOM series")
    series: dict[str, list[str]] = {}
    for f, ds in headers:
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if not uid:
            raise DataError(f"{f}: DICOM file without SeriesInstanceUID (truncated or damaged header?); expected "
                            "an image slice of one series")
        series.setdefault(uid, []).append(f.name)
    if len(series) > 1:
        parts = [f"{uid} ({len(names)} file(s), e.g. {names[0]})" for uid, names in sorted(series.items())]
        raise DataError(f"{folder}: holds {len(series)} different series: {'; '.join(parts[:3])}"
                        f"{' ...' if len(parts) > 3 else ''}; expected one series per folder")
    if len(headers) == 1:
        return read_multiframe(headers[0][0], plan, budget)
    for f, ds in headers:
        _check_pixels(ds, str(f), 1)
    shapes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for _, ds in headers}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices have different sizes {sorted(shapes)}; expected one volume")
    rows, cols = shapes.pop()
    sx, sy, sz = plan((cols, rows, len(headers)))
    if budget is not None:  # Rows x Columns x slices x bytes, summed over the series, before any decoding
        budget((cols, rows, len(headers)), max(_bytes_per_sample(ds) for _, ds in headers), (sx, sy, sz))
    iop = _check_iop([ds.get("ImageOrientationPatient") for _, ds in headers], str(folder))
    order, first, step = _order([ds.get("ImagePositionPatient") for _, ds in headers], iop,
                                [int(ds.get("InstanceNumber", 0) or 0) for _, ds in headers], str(folder))
    keep = order[::sz]
    out = np.empty((len(keep), len(range(0, rows, sy)), len(range(0, cols, sx))), dtype=np.float32)
    for i, k in enumerate(keep):
        f = headers[k][0]
        ds = pydicom.dcmread(f)
        if not any(t in ds for t in _PIXEL_TAGS):
            raise DataError(f"{f}: DICOM file has no pixel data; expected an image slice")
        try:
            arr = ds.pixel_array
        except Exception as e:
            raise DataError(f"{f}: cannot decode DICOM pixel data: {type(e).__name__}: {e}") from e
        if arr.shape != (rows, cols):
            raise DataError(f"{f}: expected one {rows}x{cols} grey slice, got pixel array {arr.shape}")
        slope, inter = _rescale(ds)
        out[i] = arr[::sy, ::sx].astype(np.float32) * slope + inter
    spacing = headers[0][1].get("PixelSpacing") or (1.0, 1.0)
    affine = _affine(iop if iop is not None else (1, 0, 0, 0, 1, 0), first, step, spacing, (sx, sy, sz))
    return DicomVolume(out.transpose(2, 1, 0), affine, _modality(headers[0][1]), (cols, rows, len(headers)))


def read_multiframe(path: Path, plan: Plan, budget: Budget | None = None) -> DicomVolume:
    """One multi-frame (e.g. Enhanced CT / MR) DICOM file; frames are sorted like a series."""
    try:
        ds = pydicom.dcmread(path, defer_size="256 KB")
    except Exception as e:
        raise DataError(f"{path}: unreadable DICOM file: {type(e).__name__}: {e}") from e
    n = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixels(ds, str(path), max(n, 1))
    if n < 2:
        raise DataError(f"{path}: a single 2D DICOM slice; expected a 3D volume (give the folder holding "
                        "the whole series, or a multi-frame file)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(f"{path}: colour DICOM ({ds.SamplesPerPixel} samples per pixel); expected grey values")
    rows, cols = int(ds.Rows), int(ds.Columns)
    sx, sy, sz = plan((cols, rows, n))
    if budget is not None:  # Rows x Columns x frames x bytes, before any frame is decoded
        budget((cols, rows, n), _bytes_per_sample(ds), (sx, sy, sz))
    per = list(ds.get("PerFrameFunctionalGroupsSequence") or [None] * n)
    if len(per) != n:
        raise DataError(f"{path}: {len(per)} per-frame groups for NumberOfFrames={n}")
    iops = [_group_attr(ds, fr, "PlaneOrientationSequence", "ImageOrientationPatient") for fr in per]
    iop = _check_iop(iops, str(path))
    positions = [_group_attr(ds, fr, "PlanePositionSequence", "ImagePositionPatient") for fr in per]
    if iop is not None and all(p is None for p in positions) and ds.get("ImagePositionPatient") is not None:
        gap = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        positions = [np.asarray(ds.ImagePositionPatient, float) + k * gap * normal for k in range(n)]
    order, first, step = _order(positions, iop, list(range(n)), str(path))
    keep = order[::sz]
    out = np.empty((len(keep), len(range(0, rows, sy)), len(range(0, cols, sx))), dtype=np.float32)
    slot = {int(k): i for i, k in enumerate(keep)}
    try:  # frames are decoded one at a time straight from the file
        for k, arr in zip(sorted(slot), iter_pixels(path, indices=sorted(slot))):
            slope, inter = _rescale(ds, per[k])
            out[slot[k]] = arr[::sy, ::sx].astype(np.float32) * slope + inter
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot decode DICOM pixel data: {type(e).__name__}: {e}") from e
    spacing = _group_attr(ds, per[0], "PixelMeasuresSequence", "PixelSpacing") or (1.0, 1.0)
    affine = _affine(iop if iop is not None else (1, 0, 0, 0, 1, 0), first, step, spacing, (sx, sy, sz))
    return DicomVolume(out.transpose(2, 1, 0), affine, _modality(ds), (cols, rows, n))


def read_dicom(path: Path, plan: Plan, budget: Budget | None = None) -> DicomVolume:
    """A series folder or a multi-frame file -> DicomVolume (see the module docstring); `budget`
    (data/guard.py) refuses, from the headers alone, a load over data.max_load_bytes."""
    return read_series(path, plan, budget) if path.is_dir() else read_multiframe(path, plan, budget)
