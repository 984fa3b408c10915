"""The JSONL manifest format (DESIGN.md): one JSON object per line, one study per object.

    {"id", "image" (path or [paths], relative to the manifest's folder), "task": "report"|"vqa",
     "question", "answer", optional "choices", "answer_choice", "question_type", "label",
     "labels", "slice_labels", "meta"}  -> the same record, image paths made absolute

Detected by the `.jsonl` suffix (a manifest is the native format; it is asked first). A bad line
(bytes that are not UTF-8, broken JSON) fails only its own record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import DataError
from .base import DATASETS, Candidate, DatasetFormat, Record, parse_json


def manifest_lines(path: Path) -> Iterator[Candidate]:
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


@DATASETS.register("manifest")
class Manifest(DatasetFormat):
    name = "manifest"
    order = 10
    help = "a .jsonl file"

    def detect(self, source: Path) -> bool:
        return source.is_file() and source.suffix.lower() == ".jsonl"

    def candidates(
        self, source: Path, *, split: str | None, data_root: Path | None, options: Mapping[str, Any]
    ) -> Iterator[Candidate]:
        if not source.is_file():
            raise DataError(f"manifest {source} must be a .jsonl file")
        return manifest_lines(source)
