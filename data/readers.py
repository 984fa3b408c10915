"""Dataset readers: a JSONL manifest, M3D-Cap, M3D-VQA or a CT-RATE root -> manifest records.

    read_records(source, kind="auto", *, data_root=None, split=None, vqa_mode="closed",
                 ct_rate_target="findings", skip_bad_records=False, check_files=True) -> list[dict]
    read_records_report(..., allow_empty=False) -> ReadReport(records, skipped, errors, kind, source)
    detect_kind(source) -> "manifest" | "m3d_cap" | "m3d_vqa" | "ct_rate"
    validate_record(rec, where, *, check_files=False) -> normalised copy of rec (or DataError)
    write_manifest(records, path) -> Path         (JSONL, UTF-8, atomic)

A record (one study) is a dict:
    id: str, image: str | list[str] (absolute after reading), task: "report" | "vqa",
    question: str, answer: str (non-empty);
    optional: choices: list[str] (2..10), answer_choice: "A".."J" (one of the choices' letters),
    question_type: str, label: str, labels: dict[str, int], slice_labels: list[int] (axial
    indices at native depth; or one list per image), meta: dict.
Readers keep the raw fields; prompts are built later (data/prompts.py).

Kinds are detected from content and layout, never from substrings of names: a `.jsonl` file is
a manifest; a `.json` file holding {"train"|"validation"|"test": [{"image", "text"}, ...]} is
M3D-Cap; a `.csv` whose header has the M3D-VQA columns is M3D-VQA; a folder holding
`radiology_text_reports/` (itself, or through `dataset/`) is a CT-RATE root. Format details live
in data/m3d.py and data/ct_rate.py, which yield (where, build) pairs; this module validates each
record, resolves duplicates and, with `skip_bad_records`, logs and counts the bad ones.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import DataError

logger = logging.getLogger(__name__)

Record = dict[str, Any]
Candidate = tuple[str, Callable[[], Record]]  # (where, build): build() -> raw record or DataError

KINDS = ("manifest", "m3d_cap", "m3d_vqa", "ct_rate")
TASKS = ("report", "vqa")
VQA_MODES = ("closed", "open")
CT_RATE_TARGETS = ("findings", "findings_impressions")
CHOICE_LETTERS = "ABCDEFGHIJ"  # as in data/prompts.py
REQUIRED_KEYS = ("id", "image", "task", "question", "answer")
OPTIONAL_KEYS = ("choices", "answer_choice", "question_type", "label", "labels", "slice_labels", "meta")
REPORT_QUESTION = "Write the findings of this scan."
_KIND_HELP = (
    "manifest (a .jsonl file), m3d_cap (M3D_Cap.json: {train/validation/test: [{image, text}]}), "
    "m3d_vqa (an M3D-VQA .csv with columns Image Path, ..., Answer Choice), "
    "ct_rate (a CT-RATE folder holding radiology_text_reports/, or its parent holding dataset/)"
)


# --------------------------------------------------------------------------------------------
# validation


def _text(rec: Record, key: str, where: str, required: bool) -> str | None:
    value = rec.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return str(value)


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        raise DataError(f"{where}: 'slice_labels' must be a list of integer slice indices, got {value!r}")
    if any(x < 0 for x in value):
        raise DataError(f"{where}: 'slice_labels' must be >= 0, got {list(value)!r}")
    return [int(x) for x in value]


def validate_record(rec: Any, where: str, *, check_files: bool = False) -> Record:
    """Check one record and return a normalised copy (canonical key order); DataError if bad.

    `where` names the record's origin (e.g. "manifest.jsonl line 7") and opens every message,
    followed by the record id once known. Pure: with `check_files=False` nothing is read.
    Unknown extra keys are kept as they are.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object / dict, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, bool) and isinstance(rid, (str, int)) and str(rid).strip():
        where = f"{where} (id {str(rid)!r})"
    if missing:
        raise DataError(f"{where}: missing required field(s) {missing}; a record needs {list(REQUIRED_KEYS)}")
    out: Record = {"id": _text(rec, "id", where, True)}
    image = rec["image"]
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, (list, tuple)):
        image = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in image]
        if not image or any(not isinstance(p, str) or not p.strip() for p in image):
            raise DataError(f"{where}: 'image' must be a path or a non-empty list of paths, got {rec['image']!r}")
    elif not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: 'image' must be a path or a non-empty list of paths, got {image!r}")
    out["image"] = image
    if rec["task"] not in TASKS:
        raise DataError(f"{where}: unknown task {rec['task']!r}; expected one of {list(TASKS)}")
    out["task"] = rec["task"]
    out["question"] = _text(rec, "question", where, True)
    out["answer"] = _text(rec, "answer", where, True)

    choices = rec.get("choices")
    if choices is not None:
        if (
            not isinstance(choices, (list, tuple))
            or not 2 <= len(choices) <= len(CHOICE_LETTERS)
            or any(isinstance(c, bool) or not isinstance(c, (str, int, float)) or not str(c).strip() for c in choices)
        ):
            raise DataError(
                f"{where}: 'choices' must be a list of 2 to {len(CHOICE_LETTERS)} non-empty strings, got {choices!r}"
            )
        out["choices"] = [str(c) for c in choices]
    letter = rec.get("answer_choice")
    if letter is not None:
        letters = list(CHOICE_LETTERS[: len(out.get("choices", []))])
        norm = str(letter).strip().rstrip(".").strip().upper() if isinstance(letter, str) else None
        if not letters:
            raise DataError(f"{where}: 'answer_choice' {letter!r} given without 'choices'")
        if norm not in letters:
            raise DataError(f"{where}: 'answer_choice' must be one of the choice letters {letters}, got {letter!r}")
        out["answer_choice"] = norm
    for key in ("question_type", "label"):
        value = _text(rec, key, where, False)
        if value is not None:
            out[key] = value
    labels = rec.get("labels")
    if labels is not None:
        if not isinstance(labels, dict):
            raise DataError(f"{where}: 'labels' must be a mapping of name -> 0/1 integer, got {labels!r}")
        norm_labels: dict[str, int] = {}
        for name, value in labels.items():
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) == int(value)
            if not ok or not isinstance(name, str):
                raise DataError(f"{where}: 'labels' must map names to integers, got {name!r}: {value!r}")
            norm_labels[name] = int(value)
        out["labels"] = norm_labels
    slice_labels = rec.get("slice_labels")
    if slice_labels is not None:
        if isinstance(slice_labels, (list, tuple)) and slice_labels and all(
            isinstance(x, (list, tuple)) for x in slice_labels
        ):
            n_img = len(image) if isinstance(image, list) else 1
            if len(slice_labels) != n_img:
                raise DataError(
                    f"{where}: 'slice_labels' holds {len(slice_labels)} lists for {n_img} image(s); give one "
                    "list of ints, or one list per image"
                )
            out["slice_labels"] = [_int_list(x, where) for x in slice_labels]
        else:
            out["slice_labels"] = _int_list(slice_labels, where)
    meta = rec.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise DataError(f"{where}: 'meta' must be a mapping, got {type(meta).__name__}")
        out["meta"] = dict(meta)
    for key, value in rec.items():
        if key not in out and key not in REQUIRED_KEYS and key not in OPTIONAL_KEYS:
            out[key] = value
    if check_files:
        _check_files(out, where)
    return out


def _check_files(rec: Record, where: str) -> None:
    for p in rec["image"] if isinstance(rec["image"], list) else [rec["image"]]:
        if not Path(p).exists():
            if f"(id {rec['id']!r})" not in where:
                where = f"{where} (id {rec['id']!r})"
            raise DataError(f"{where}: image file not found: {p}")


# --------------------------------------------------------------------------------------------
# CSV helpers (shared by data/m3d.py and data/ct_rate.py)


def csv_header(path: Path) -> list[str]:
    """The stripped column names of a UTF-8 CSV (BOM allowed); DataError if unreadable."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    except UnicodeDecodeError as e:  # the first block is decoded at once: the bad byte may be in a row
        raise DataError(f"{path}: not valid UTF-8 ({e.reason}, in its first {len(e.object)} bytes); expected a "
                        "UTF-8 CSV") from e
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read the header of CSV {path}: {e}") from e


def csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str] | str]]:
    """(line, row) for each data row of a UTF-8 CSV; `row` is a dict of stripped column names.

    A row whose field count differs from the header comes as a message string instead, so that
    only that record fails. A missing file, missing `required` columns, bytes that are not UTF-8
    or broken quoting fail the whole file with a DataError naming it.
    """
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    header = csv_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected columns {list(required)}, found {header}")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            next(reader)
            for values in reader:
                if not values:
                    continue
                if len(values) != len(header):
                    yield reader.line_num, f"row has {len(values)} fields, the header has {len(header)}"
                else:
                    yield reader.line_num, dict(zip(header, values))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 after line {reader.line_num} ({e.reason})") from e
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from e


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class ReadReport:
    """What a read produced: the records, and the bad ones skipped (as (where, message) pairs)."""

    records: list[Record]
    kind: str
    source: str
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)


def detect_kind(source: str | os.PathLike[str]) -> str:
    """The kind of `source`, from its content and layout (see the module docstring)."""
    from .ct_rate import REPORT_COLUMNS, find_ct_rate_dataset
    from .m3d import VQA_REQUIRED, is_m3d_cap_json

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(source)!r} does not exist")
    if path.is_dir():
        if find_ct_rate_dataset(path) is not None:
            return "ct_rate"
        raise DataError(f"cannot tell what dataset folder {path} is; supported kinds: {_KIND_HELP}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "manifest"
    if suffix == ".json" and is_m3d_cap_json(path):
        return "m3d_cap"
    if suffix == ".csv":
        header = csv_header(path)
        if set(VQA_REQUIRED) <= set(header):
            return "m3d_vqa"
        if set(REPORT_COLUMNS) <= set(header):
            raise DataError(
                f"{path} is a CT-RATE reports CSV; pass the CT-RATE root (the folder holding dataset/ "
                "or radiology_text_reports/) instead"
            )
    raise DataError(f"cannot tell what dataset file {path} is; supported kinds: {_KIND_HELP}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(text: str, where: str, what: str = "valid JSON") -> Any:
    """Strict JSON (no NaN / Infinity); every failure (bad syntax, nesting too deep for the
    parser, integers over Python's digit limit, NaN) is a DataError naming `where`."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in text.strip() else f"column {e.colno}"
        raise DataError(f"{where}: not {what} ({e.msg} at {at})") from e
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: not {what} ({type(e).__name__}: {str(e)[:200]})") from e


def _read_lines(path: Path) -> Iterator[Candidate]:
    """Manifest lines as candidates; a bad line (bytes, JSON) fails only its own record."""
    try:
        fh = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot open manifest {path}: {e}") from e
    with fh:
        for n, raw in enumerate(fh, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue

            def build(raw: bytes = raw, where: str = f"{path} line {n}") -> Record:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
                return parse_json(text, where, "a valid JSON object")

            yield f"{path} line {n}", build


def _resolve(rec: Record, base: Path) -> Record:
    def one(p: str) -> str:
        q = Path(p).expanduser()
        return os.path.abspath(q if q.is_absolute() else base / q)

    rec["image"] = [one(p) for p in rec["image"]] if isinstance(rec["image"], list) else one(rec["image"])
    return rec


def _collect(
    candidates: Iterable[Candidate], *, skip: bool, check_files: bool, base: Path | None, report: ReadReport
) -> None:
    seen: dict[str, str] = {}
    for where, build in candidates:
        try:
            rec = validate_record(build(), where)
            if base is not None:
                rec = _resolve(rec, base)
            if check_files:
                _check_files(rec, where)
            if rec["id"] in seen:
                raise DataError(f"{where}: duplicate id {rec['id']!r} (first seen at {seen[rec['id']]})")
            seen[rec["id"]] = where
            report.records.append(rec)
        except DataError as e:
            if not skip:
                raise
            logger.warning("skipping bad record: %s", e)
            report.errors.append((where, str(e)))


def read_records_report(
    source: str | os.PathLike[str],
    kind: str = "auto",
    *,
    data_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    vqa_mode: str = "closed",
    ct_rate_target: str = "findings",
    skip_bad_records: bool = False,
    check_files: bool = True,
    allow_empty: bool = False,
) -> ReadReport:
    """Like `read_records`, but returns a `ReadReport` that also lists the skipped records.

    `allow_empty`: return the report even when no record is usable (a validation pass lists
    every bad one) instead of raising DataError."""
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"kind must be one of {['auto', *KINDS]}, got {kind!r}")
    if vqa_mode not in VQA_MODES:
        raise ValueError(f"vqa_mode must be one of {list(VQA_MODES)}, got {vqa_mode!r}")
    if ct_rate_target not in CT_RATE_TARGETS:
        raise ValueError(f"ct_rate_target must be one of {list(CT_RATE_TARGETS)}, got {ct_rate_target!r}")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(source)!r} does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    root = Path(data_root).expanduser() if data_root not in (None, "") else None
    if root is not None and not root.is_dir():
        raise DataError(f"data_root {str(data_root)!r} is not a folder")
    if split is not None and kind in ("manifest", "m3d_vqa"):
        raise ValueError(f"split applies to m3d_cap and ct_rate sources only; a {kind} file is one split already")
    report = ReadReport(records=[], kind=kind, source=str(path))
    base: Path | None = None
    candidates: Iterable[Candidate]
    if kind == "manifest":
        if not path.is_file():
            raise DataError(f"manifest {path} must be a .jsonl file")
        candidates, base = _read_lines(path), path.parent
    elif kind == "m3d_cap":
        from .m3d import m3d_cap_candidates

        candidates = m3d_cap_candidates(path, root, split, check_files)
    elif kind == "m3d_vqa":
        from .m3d import m3d_vqa_candidates

        candidates = m3d_vqa_candidates(path, root, vqa_mode, check_files)
    else:
        from .ct_rate import ct_rate_candidates

        candidates = ct_rate_candidates(path, split, ct_rate_target)
    _collect(candidates, skip=skip_bad_records, check_files=check_files, base=base, report=report)
    if report.skipped:
        logger.warning("%s: skipped %d bad record(s), kept %d", path, report.skipped, len(report.records))
    if not report.records and not allow_empty:
        raise DataError(f"{path}: no usable records ({kind}, split={split!r}, {report.skipped} skipped)")
    return report


def read_records(
    source: str | os.PathLike[str],
    kind: str = "auto",
    *,
    data_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    vqa_mode: str = "closed",
    ct_rate_target: str = "findings",
    skip_bad_records: bool = False,
    check_files: bool = True,
) -> list[Record]:
    """Read a dataset into manifest records (see the module docstring).

    `kind`: "auto" | "manifest" | "m3d_cap" | "m3d_vqa" | "ct_rate". `data_root` overrides the
    M3D data root (default: the parent of the json/csv's folder). `split`: M3D-Cap "train" |
    "validation" | "test", CT-RATE "train" | "valid"; None reads all. `vqa_mode` "open" drops the
    choices of M3D-VQA. `ct_rate_target` "findings_impressions" appends the impressions.
    `skip_bad_records`: log (warning) and skip bad records instead of raising on the first; use
    `read_records_report` to get their count and reasons. `check_files`: check that images exist.
    """
    return read_records_report(
        source,
        kind,
        data_root=data_root,
        split=split,
        vqa_mode=vqa_mode,
        ct_rate_target=ct_rate_target,
        skip_bad_records=skip_bad_records,
        check_files=check_files,
    ).records


# --------------------------------------------------------------------------------------------
# writing


def write_manifest(records: Sequence[Record], path: str | os.PathLike[str]) -> Path:
    """Validate `records` and write them as a JSONL manifest, atomically; returns the path.

    Absolute image paths inside the manifest's folder are written relative to it (POSIX
    separators); other paths are written as given (relative ones are read back relative to the
    manifest's folder).
    """
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    folders = (Path(os.path.abspath(out.parent)), out.parent.resolve())

    def rel(p: str) -> str:
        q = Path(p).expanduser()
        if not q.is_absolute():
            return p
        for folder, target in zip(folders, (Path(os.path.abspath(q)), q.resolve())):
            if target.is_relative_to(folder):
                return target.relative_to(folder).as_posix()
        return p

    lines = []
    for i, rec in enumerate(records):
        rec = validate_record(rec, f"record {i} written to {out}")
        rec["image"] = [rel(p) for p in rec["image"]] if isinstance(rec["image"], list) else rel(rec["image"])
        lines.append(json.dumps(rec, ensure_ascii=False))
    from medvlm3d.io import atomic_write_text

    return atomic_write_text(out, "".join(line + "\n" for line in lines))
