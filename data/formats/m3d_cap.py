"""The M3D-Cap format (M3D_Cap.json + text.txt reports) -> report record candidates.

Layout (shared/FORMATS.md): paths in `M3D_Cap.json` (and in the M3D-VQA CSVs' `Image Path`
column, data/formats/m3d_vqa.py) are relative to the data root, the folder holding
`M3D_Cap_npy/` and `M3D-VQA/`; it defaults to the parent of the json's / csv's folder (or
`data_root`). Volumes are `.npy` files of shape [1, 32, 256, 256].

    {"train" | "validation" | "test": [{"image": rel .npy, "text": rel .txt}, ...]}
        -> {id: "<split>_<index>", image, task: "report", question: REPORT_QUESTION,
            answer: report, meta: {split, text}}
        The report is the text after "study_findings:", else after "discussion:", else the
        whole text (markers matched case-insensitively, first occurrence, stripped).

Detected from content: a `.json` file holding that index (the file name alone is not enough).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import DataError
from ..guard import check_inside
from ..readers import REPORT_QUESTION
from .base import DATASETS, Candidate, DatasetFormat, Record, parse_json

CAP_SPLITS = ("train", "validation", "test")
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


def data_root_of(path: Path, root: Path | None) -> tuple[Path, str]:
    """(the M3D data root of an index/CSV at `path`, how to name it in messages)."""
    if root is not None:
        return root, f"data_root {root}"
    return path.parent.parent, f"data root {path.parent.parent}, the parent of {path.parent.name}/ (or pass data_root=)"


def rel_path(item: dict[str, Any], key: str, root: Path, where: str) -> Path:
    """`root` / item[key]; DataError naming `where` unless item[key] is a non-empty string."""
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a relative path string, got {value!r}")
    return root / value.strip()


def m3d_cap_candidates(path: Path, root: Path | None, split: str | None, check_files: bool,
                       allow_outside_root: bool = False) -> Iterator[Candidate]:
    """Candidates of M3D_Cap.json; every report text file is read (check_files or not), only from
    inside the data root unless `allow_outside_root`."""
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
    base, root_note = data_root_of(path, root)
    for name in [s for s in CAP_SPLITS if s in data and (split is None or s == split)]:
        for i, item in enumerate(data[name]):
            where = f"{path} {name}[{i}]"

            def build(item: Any = item, name: str = name, i: int = i, where: str = where) -> Record:
                if not isinstance(item, dict):
                    raise DataError(f"{where}: expected an object with 'image' and 'text', got {item!r}")
                image = rel_path(item, "image", base, where)
                text_path = rel_path(item, "text", base, where)
                if not allow_outside_root:  # read before the generic image check: never outside the root
                    check_inside({"text": str(text_path)}, [base], where, key="text")
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


class M3DRootFormat(DatasetFormat):
    """An M3D file whose image paths are relative to the M3D data root (data.data_root, or found
    from the file's own place: see data_root_of)."""

    def base_dir(self, source: Path) -> Path | None:
        return None  # the paths are joined with the data root already

    def roots(self, source: Path, data_root: Path | None) -> list[Path]:
        return [data_root_of(source, data_root)[0]]


@DATASETS.register("m3d_cap")
class M3DCap(M3DRootFormat):
    name = "m3d_cap"
    order = 20
    splits = CAP_SPLITS
    train_split = "train"
    help = "M3D_Cap.json: {train/validation/test: [{image, text}]}"

    def detect(self, source: Path) -> bool:
        return source.is_file() and source.suffix.lower() == ".json" and is_m3d_cap_json(source)

    def candidates(
        self, source: Path, *, split: str | None, data_root: Path | None, options: Mapping[str, Any]
    ) -> Iterator[Candidate]:
        return m3d_cap_candidates(source, data_root, split, bool(options.get("check_files", True)),
                                  bool(options.get("allow_outside_root", False)))


__all__ = ["CAP_SPLITS", "M3DCap", "M3DRootFormat", "data_root_of", "extract_report", "is_m3d_cap_json", "m3d_cap_candidates",
           "rel_path"]
