"""Dataset readers: a JSONL manifest, M3D-Cap, M3D-VQA or a CT-RATE root -> manifest records.

    read_records(source, kind="auto", *, data_root=None, split=None, vqa_mode="closed",
                 ct_rate_target="findings", skip_bad_records=False, check_files=True) -> list[dict]
    read_records_report(..., allow_empty=False) -> ReadReport(records, skipped, errors, kind, source)
    detect_kind(source) -> "manifest" | "m3d_cap" | "m3d_vqa" | "ct_rate" | <a registered format>
    get_format(kind) -> DatasetFormat (data/formats/); resolve_source(source, kind, split, train=) -> (kind, split)
    validate_record(rec, where, *, check_files=False) -> normalised copy of rec (or DataError)
    write_manifest(records, path) -> Path         (JSONL, UTF-8, atomic)

A record (one study) is a dict:
    id: str, image: str | list[str] (absolute after reading), task: "report" | "vqa",
    question: str, answer: str (non-empty);
    optional: choices: list[str] (2..10), answer_choice: "A".."J" (one of the choices' letters),
    question_type: str, label: str, labels: dict[str, int], slice_labels: list[int] (axial
    indices at native depth; or one list per image), meta: dict.
Readers keep the raw fields; prompts are built later (data/prompts.py).

Formats are registered in `medvlm3d.data.formats.DATASETS` (one file each in data/formats/:
manifest, m3d_cap, m3d_vqa, ct_rate, or any format a test or plugin registers). kind="auto" asks
them in their documented order (data/formats/__init__.py) and reads with the first whose
`detect` says yes, from content and layout, never from substrings of names. A format yields
(where, build) candidates; this module validates each record, resolves relative image paths
against the format's `base_dir`, refuses images outside the format's `roots` (unless
`allow_outside_root`), resolves duplicates and, with `skip_bad_records`, logs and
counts the bad ones.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .errors import ConfigError, DataError
from .guard import check_inside, check_regular

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # data/formats imports this module (REPORT_QUESTION): imported lazily here
    from .formats.base import Candidate, DatasetFormat

Record = dict[str, Any]

TASKS = ("report", "vqa")
VQA_MODES = ("closed", "open")
CT_RATE_TARGETS = ("findings", "findings_impressions")
CHOICE_LETTERS = "ABCDEFGHIJ"  # as in data/prompts.py
REQUIRED_KEYS = ("id", "image", "task", "question", "answer")
OPTIONAL_KEYS = ("choices", "answer_choice", "question_type", "label", "labels", "slice_labels", "meta")
REPORT_QUESTION = "Write the findings of this scan."


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


def get_format(kind: str) -> DatasetFormat:
    """The registered `DatasetFormat` named `kind`; ConfigError listing the names if unknown."""
    from .formats import DATASETS

    if kind not in DATASETS:
        raise ConfigError(f"data.kind must be one of {['auto', *DATASETS.names()]}, got {kind!r}")
    return DATASETS.build(kind)


def detect_kind(source: str | os.PathLike[str]) -> str:
    """The name of the first registered format (in detection order) that says `source` is its."""
    from .formats import DATASETS, describe_formats, detection_order

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(source)!r} does not exist")
    check_regular(path, "a data source")  # a FIFO named like a manifest would block detection
    for name in detection_order():
        if DATASETS.build(name).detect(path):
            return name
    what = "folder" if path.is_dir() else "file"
    raise DataError(f"cannot tell what dataset {what} {path} is; supported kinds: {describe_formats()}")


def resolve_source(
    source: str | os.PathLike[str], kind: str, split: str | None, *, train: bool
) -> tuple[str, str | None]:
    """(kind, split) to read `source` with: "auto" detected; for a multi-split format `split`,
    else (when `train`) the format's train split, else None (all splits); None for a
    single-split format (a manifest file is one split already)."""
    kind = detect_kind(source) if kind == "auto" else kind
    fmt = get_format(kind)
    if not fmt.splits:
        return kind, None
    return kind, split or (fmt.train_split if train else None)


def _resolve(rec: Record, base: Path) -> Record:
    def one(p: str) -> str:
        q = Path(p).expanduser()
        return os.path.abspath(q if q.is_absolute() else base / q)

    rec["image"] = [one(p) for p in rec["image"]] if isinstance(rec["image"], list) else one(rec["image"])
    return rec


def _collect(
    candidates: Iterable[Candidate], *, skip: bool, check_files: bool, base: Path | None, report: ReadReport,
    roots: Sequence[Path] = (),
) -> None:
    seen: dict[str, str] = {}
    for where, build in candidates:
        try:
            rec = validate_record(build(), where)
            if base is not None:
                rec = _resolve(rec, base)
            if roots:
                check_inside(rec, roots, where)
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


def _multi_split() -> str:
    from .formats import DATASETS

    return ", ".join(n for n in DATASETS.names() if DATASETS.get(n).splits)


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
    allow_outside_root: bool = False,
) -> ReadReport:
    """Like `read_records`, but returns a `ReadReport` that also lists the skipped records.

    `allow_empty`: return the report even when no record is usable (a validation pass lists
    every bad one) instead of raising DataError."""
    if kind != "auto":
        get_format(kind)
    if vqa_mode not in VQA_MODES:
        raise ValueError(f"vqa_mode must be one of {list(VQA_MODES)}, got {vqa_mode!r}")
    if ct_rate_target not in CT_RATE_TARGETS:
        raise ValueError(f"ct_rate_target must be one of {list(CT_RATE_TARGETS)}, got {ct_rate_target!r}")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(source)!r} does not exist")
    check_regular(path, "a data source")
    kind = detect_kind(path) if kind == "auto" else kind
    fmt = get_format(kind)
    root = Path(data_root).expanduser() if data_root not in (None, "") else None
    if root is not None and not root.is_dir():
        raise DataError(f"data_root {str(data_root)!r} is not a folder")
    if split is not None and not fmt.splits:
        raise ValueError(f"split applies to multi-split sources ({_multi_split()}) only; a {kind} file is one split "
                         "already")
    report = ReadReport(records=[], kind=kind, source=str(path))
    options = {"vqa_mode": vqa_mode, "ct_rate_target": ct_rate_target, "check_files": check_files,
               "allow_outside_root": allow_outside_root}
    candidates = fmt.candidates(path, split=split, data_root=root, options=options)
    base = fmt.base_dir(path)
    roots = () if allow_outside_root else fmt.roots(path, root)
    _collect(candidates, skip=skip_bad_records, check_files=check_files, base=base, report=report, roots=roots)
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
    allow_outside_root: bool = False,
) -> list[Record]:
    """Read a dataset into manifest records (see the module docstring).

    `kind`: "auto" or a registered format ("manifest" | "m3d_cap" | "m3d_vqa" | "ct_rate" | ...;
    ConfigError listing them if unknown). `data_root` overrides the
    M3D data root (default: the parent of the json/csv's folder). `split`: M3D-Cap "train" |
    "validation" | "test", CT-RATE "train" | "valid"; None reads all. `vqa_mode` "open" drops the
    choices of M3D-VQA. `ct_rate_target` "findings_impressions" appends the impressions.
    `skip_bad_records`: log (warning) and skip bad records instead of raising on the first; use
    `read_records_report` to get their count and reasons. `check_files`: check that images exist.
    `allow_outside_root`: accept images outside the format's `roots` (else a DataError per record).
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
        allow_outside_root=allow_outside_root,
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
