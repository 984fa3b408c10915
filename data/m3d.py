"""M3D-Data readers: M3D-Cap (M3D_Cap.json + text.txt) and M3D-VQA (CSV) -> record candidates.

Layout (shared/FORMATS.md): paths in `M3D_Cap.json` and in the VQA CSVs' `Image Path` column
are relative to the data root, the folder holding `M3D_Cap_npy/` and `M3D-VQA/`; it defaults to
the parent of the json's / csv's folder. Volumes are `.npy` files of shape [1, 32, 256, 256].

    M3D-Cap: {"train" | "validation" | "test": [{"image": rel .npy, "text": rel .txt}, ...]}
        -> {id: "<split>_<index>", image, task: "report", question: REPORT_QUESTION,
            answer: report, meta: {split, text}}
        The report is the text after "study_findings:", else after "discussion:", else the
        whole text (markers matched case-insensitively, first occurrence, stripped).
    M3D-VQA: columns Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice
        -> {id: "<csv stem>_<line>", image, task: "vqa", question, answer, question_type,
            choices: [A, B, C, D], answer_choice}    (vqa_mode "open" drops the last two)
        `Text` (the study's caption) is optional and not kept. Trailing empty choices are
        dropped (yes/no files with two choices).

The functions here yield (where, build) pairs; data/readers.py validates and collects them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .errors import DataError
from .readers import REPORT_QUESTION, Candidate, Record, csv_rows, parse_json

CAP_SPLITS = ("train", "validation", "test")
VQA_COLUMNS = (
    "Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
    "Answer", "Answer Choice",
)  # fmt: skip
VQA_REQUIRED = tuple(c for c in VQA_COLUMNS if c != "Text")
QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
_MARKERS = ("study_findings:", "discussion:")


def extract_report(text: str) -> str:
    """The report part of an M3D-Cap text.txt (see the module docstring)."""
    lower = text.lower()
    for marker in _MARKERS:
        i = lower.find(marker)
        if i >= 0:
            return text[i + len(marker) :].strip()
    return text.strip()


def _load_json(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return parse_json(text, str(path))


def _is_cap_index(data: Any) -> bool:
    if not isinstance(data, dict) or not data or not set(data) <= set(CAP_SPLITS):
        return False
    for items in data.values():
        if not isinstance(items, list):
            return False
        if items and not (isinstance(items[0], dict) and {"image", "text"} <= set(items[0])):
            return False
    return True


def is_m3d_cap_json(path: Path) -> bool:
    """True when `path` holds an M3D-Cap index; DataError when it is not readable JSON."""
    return _is_cap_index(_load_json(path))


def _data_root(path: Path, root: Path | None) -> tuple[Path, str]:
    if root is not None:
        return root, f"data_root {root}"
    return path.parent.parent, f"data root {path.parent.parent}, the parent of {path.parent.name}/ (or pass data_root=)"


def _rel_path(item: dict[str, Any], key: str, root: Path, where: str) -> Path:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a relative path string, got {value!r}")
    return root / value.strip()


def m3d_cap_candidates(path: Path, root: Path | None, split: str | None, check_files: bool) -> Iterator[Candidate]:
    """Candidates of M3D_Cap.json; every report text file is read (check_files or not)."""
    if split is not None and split not in CAP_SPLITS:
        raise ValueError(f"M3D-Cap split must be one of {list(CAP_SPLITS)} or None, got {split!r}")
    data = _load_json(path)
    if not _is_cap_index(data):
        raise DataError(
            f"{path}: not an M3D-Cap index; expected a JSON object with lists under {list(CAP_SPLITS)}, "
            'each item {"image": "<relative .npy>", "text": "<relative .txt>"}'
        )
    if split is not None and split not in data:
        raise DataError(f"{path}: has no {split!r} split; it has {sorted(data)}")
    base, root_note = _data_root(path, root)
    for name in [s for s in CAP_SPLITS if s in data and (split is None or s == split)]:
        for i, item in enumerate(data[name]):
            where = f"{path} {name}[{i}]"

            def build(item: Any = item, name: str = name, i: int = i, where: str = where) -> Record:
                if not isinstance(item, dict):
                    raise DataError(f"{where}: expected an object with 'image' and 'text', got {item!r}")
                image = _rel_path(item, "image", base, where)
                text_path = _rel_path(item, "text", base, where)
                if not text_path.is_file():
                    raise DataError(
                        f"{where}: report file not found: {text_path} (paths are relative to the {root_note})"
                    )
                try:
                    report = extract_report(text_path.read_bytes().decode("utf-8-sig"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: report {text_path} is not valid UTF-8 ({e.reason})") from e
                if not report:
                    raise DataError(f"{where}: report {text_path} is empty; expected the study's findings text")
                if check_files and not image.exists():
                    raise DataError(f"{where}: image file not found: {image} (paths are relative to the {root_note})")
                return {
                    "id": f"{name}_{i}", "image": str(image), "task": "report", "question": REPORT_QUESTION,
                    "answer": report, "meta": {"split": name, "text": str(text_path)},
                }  # fmt: skip

            yield where, build


def _question_type(value: str, where: str) -> str:
    text = value.strip()
    names = {v.lower(): v for v in QUESTION_TYPES.values()}
    if text.lower() in names:
        return names[text.lower()]
    try:
        code = float(text)
    except ValueError:
        code = 0.0
    if code in QUESTION_TYPES:
        return QUESTION_TYPES[int(code)]
    raise DataError(f"{where}: 'Question Type' must be a code 1-5 ({QUESTION_TYPES}), got {value!r}")


def _choices(row: dict[str, str], where: str) -> list[str]:
    values = [row[f"Choice {c}"].strip() for c in "ABCD"]
    while values and not values[-1]:
        values.pop()
    if any(not v for v in values):
        raise DataError(f"{where}: empty choice among {values}; expected Choice A..D filled from A on")
    return values


def m3d_vqa_candidates(path: Path, root: Path | None, vqa_mode: str, check_files: bool) -> Iterator[Candidate]:
    """Candidates of one M3D-VQA CSV."""
    base, root_note = _data_root(path, root)
    for line, row in csv_rows(path, VQA_REQUIRED):
        where = f"{path} line {line}"

        def build(row: dict[str, str] | str = row, line: int = line, where: str = where) -> Record:
            if isinstance(row, str):
                raise DataError(f"{where}: {row}")
            image = _rel_path(row, "Image Path", base, where)
            rec: Record = {
                "id": f"{path.stem}_{line}", "image": str(image), "task": "vqa",
                "question": row["Question"].strip(), "answer": row["Answer"].strip(),
                "question_type": _question_type(row["Question Type"], where),
            }  # fmt: skip
            if not rec["question"] or not rec["answer"]:
                raise DataError(f"{where}: empty 'Question' or 'Answer'; both must be non-empty")
            if check_files and not image.exists():
                raise DataError(f"{where}: image file not found: {image} (paths are relative to the {root_note})")
            if vqa_mode == "closed":
                rec["choices"] = _choices(row, where)
                rec["answer_choice"] = row["Answer Choice"].strip()
            return rec

        yield where, build


__all__ = [
    "CAP_SPLITS", "QUESTION_TYPES", "VQA_COLUMNS", "VQA_REQUIRED", "extract_report", "is_m3d_cap_json",
    "m3d_cap_candidates", "m3d_vqa_candidates",
]  # fmt: skip
