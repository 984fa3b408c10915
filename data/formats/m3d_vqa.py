"""The M3D-VQA format (one CSV per split) -> VQA record candidates.

    columns Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice
        -> {id: "<csv stem>_<line>", image, task: "vqa", question, answer, question_type,
            choices: [A, B, C, D], answer_choice}    (options["vqa_mode"] "open" drops the last two)
    `Text` (the study's caption) is optional and not kept. Trailing empty choices are dropped
    (yes/no files with two choices). `Image Path` is relative to the M3D data root (see
    data/formats/m3d_cap.py): the parent of the CSV's folder, or `data_root`.

Detected from content: a `.csv` whose header holds the columns above (`Text` optional).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import DataError
from .base import DATASETS, Candidate, Record, csv_header, csv_rows
from .m3d_cap import M3DRootFormat, data_root_of, rel_path

VQA_COLUMNS = (
    "Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
    "Answer", "Answer Choice",
)  # fmt: skip
VQA_REQUIRED = tuple(c for c in VQA_COLUMNS if c != "Text")
QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}


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
    base, root_note = data_root_of(path, root)
    for line, row in csv_rows(path, VQA_REQUIRED):
        where = f"{path} line {line}"

        def build(row: dict[str, str] | str = row, line: int = line, where: str = where) -> Record:
            if isinstance(row, str):
                raise DataError(f"{where}: {row}")
            image = rel_path(row, "Image Path", base, where)
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


@DATASETS.register("m3d_vqa")
class M3DVQA(M3DRootFormat):
    name = "m3d_vqa"
    order = 30
    help = "an M3D-VQA .csv with columns Image Path, ..., Answer Choice"

    def detect(self, source: Path) -> bool:
        return source.is_file() and source.suffix.lower() == ".csv" and set(VQA_REQUIRED) <= set(csv_header(source))

    def candidates(
        self, source: Path, *, split: str | None, data_root: Path | None, options: Mapping[str, Any]
    ) -> Iterator[Candidate]:
        return m3d_vqa_candidates(source, data_root, options.get("vqa_mode", "closed"),
                                  bool(options.get("check_files", True)))


__all__ = ["M3DVQA", "QUESTION_TYPES", "VQA_COLUMNS", "VQA_REQUIRED", "m3d_vqa_candidates"]
