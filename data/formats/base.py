"""The dataset-format registry and interface, plus the CSV / JSON helpers the formats share.

    DATASETS: Registry of DatasetFormat classes, by name ("manifest", "m3d_cap", ...)
    DatasetFormat: name, order, splits, train_split, detect(source) -> bool,
        candidates(source, *, split, data_root, options) -> iterator of (where, build),
        base_dir(source) -> folder for relative image paths (or None),
        roots(source, data_root) -> [folders the images must lie in] (data.allow_outside_root),
        read(source, *, split, data_root, options) -> list of validated manifest records
    detection_order() -> [format names] in the order kind="auto" asks them
    csv_header(path) -> [column names]; csv_rows(path, required) -> (line, row | message) pairs
    parse_json(text, where) -> value (strict JSON; DataError on any failure)

A format yields candidates: (where, build) pairs, `where` naming the record's origin (e.g.
"a.csv line 3") and `build()` returning the raw record dict or raising DataError. The generic
reader (data/readers.py) validates each one against the manifest schema, resolves relative image
paths against `base_dir(source)`, drops duplicates and, with `skip_bad_records`, skips the bad
ones. `options` holds the reader's keyword options (vqa_mode, ct_rate_target, check_files); a
format reads those it uses.

Adding a format is one file in data/formats/ (imported by the package on first use):

    @DATASETS.register("my_csv")
    class MyCsv(DatasetFormat):
        name = "my_csv"
        def detect(self, source): return source.suffix == ".csv" and "Report" in csv_header(source)
        def candidates(self, source, *, split, data_root, options): ...
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from medvlm3d.registry import Registry

from ..errors import DataError

Record = dict[str, Any]
Candidate = tuple[str, Callable[[], Record]]  # (where, build): build() -> raw record or DataError

DATASETS = Registry("dataset format")


class DatasetFormat:
    """One dataset layout. Subclasses set `name` (its registry name) and implement `detect` and
    `candidates`; `read` then gives validated records.

    `order`: kind="auto" asks the formats by ascending (order, name); the first whose `detect`
    says yes reads the source. `splits`: the split names a multi-split source holds (empty: a
    file is one split, and passing a split is an error). `train_split`: the split training reads
    when `data.train_split` is empty. `help`: one line for the "supported kinds" message.
    """

    name: str = ""
    order: int = 100
    splits: tuple[str, ...] = ()
    train_split: str | None = None
    help: str = ""

    def detect(self, source: Path) -> bool:
        """True when `source` (an existing file or folder) is in this format; may raise
        DataError when the source is recognisably this format's but unusable."""
        raise NotImplementedError

    def candidates(
        self, source: Path, *, split: str | None, data_root: Path | None, options: Mapping[str, Any]
    ) -> Iterator[Candidate]:
        raise NotImplementedError

    def base_dir(self, source: Path) -> Path | None:
        """Where relative image paths of the records are resolved: the source's folder by
        default; None when `candidates` already gives absolute (or root-joined) paths."""
        return source if source.is_dir() else source.parent

    def roots(self, source: Path, data_root: Path | None) -> list[Path]:
        """The folders the records' images must lie in (unless data.allow_outside_root): the
        source's folder (or `base_dir`) and `data_root` when given."""
        base = self.base_dir(source)
        return [base if base is not None else (source if source.is_dir() else source.parent),
                *([data_root] if data_root is not None else [])]

    def read(
        self,
        source: str | os.PathLike[str],
        *,
        split: str | None = None,
        data_root: str | os.PathLike[str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> list[Record]:
        """Validated manifest records of `source` (DataError on the first bad one). `options`:
        the keyword options of `read_records` (vqa_mode, ct_rate_target, check_files,
        skip_bad_records)."""
        from ..readers import read_records_report

        opts = dict(options or {})
        return read_records_report(source, self.name, split=split, data_root=data_root, **opts).records


def detection_order() -> list[str]:
    """Registered format names in the order kind="auto" tries them."""
    return sorted(DATASETS.names(), key=lambda n: (DATASETS.get(n).order, n))


def describe_formats() -> str:
    """"name (help), ..." of every registered format, in detection order."""
    return ", ".join(f"{n} ({DATASETS.get(n).help})" if DATASETS.get(n).help else n for n in detection_order())


# --------------------------------------------------------------------------------------------
# shared helpers


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


__all__ = [
    "DATASETS", "Candidate", "DatasetFormat", "Record", "csv_header", "csv_rows", "describe_formats",
    "detection_order", "parse_json",
]  # fmt: skip
