"""Validation pass: read every record of a dataset and load every volume it references, once.

    validate_dataset(source, cfg: DataConfig | None = None, kind="auto", load_volumes=True,
                     *, split=None) -> ValidationReport
    ValidationReport: .ok, .problems (list of Problem(stage, where, record_id, message)),
        .warnings, .n_records, .n_volumes, .bad_records, .format(max_rows) -> str, .to_dict()

    medvlm3d validate --data PATH [--config NAME|YAML] [--kind K] [--split S] [--no-volumes]
                      [--json OUT] [key=value ...]
        prints a summary table and the bad records; exit 2 when any record is bad or the config
        or command line is bad, 0 when all are good (the verb: medvlm3d/cli/validate.py).

Steps:
  1. records: `read_records_report(skip_bad_records=True, check_files=True, allow_empty=True)`
     with the config's data_root, vqa_mode and ct_rate_target, so every bad record (broken
     JSON line, bad CSV row, missing field or file, empty answer, unknown task...) is listed
     with its origin (file and line, or split and index). A source that cannot be read at all
     (missing, unknown layout, CSV without the required columns) is one "source" problem.
  2. volumes (`load_volumes`): each distinct (image paths, CT rescale) is loaded once with
     `load_study(paths, cfg, train=False, rescale=...)`: the config's own preprocessing. With
     `cfg.cache_dir` set this fills the preprocessing cache that training then hits, so the
     pass costs about one epoch of data loading once, and little when the cache is warm. A
     failure is listed for every record that uses the volume; warnings (e.g. a constant
     volume) are collected.
With `load_volumes=False` no volume is opened (the records' files are only checked to exist)
(reading a `DataConfig` imports torch: the config types live beside their components).
The training recipe calls this before step 1 when `data.skip_bad_records` is false, and stops
with `report.format()` when `not report.ok`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medvlm3d.config import DataConfig
from .errors import DataError
from .readers import get_format, read_records_report

logger = logging.getLogger(__name__)

STAGES = ("source", "record", "volume")


@dataclass
class Problem:
    """One failure: `stage` "source" | "record" | "volume"; `where` names the file (and line or
    index) or the volume; `record_id` is set for volume failures."""

    stage: str
    where: str
    message: str
    record_id: str | None = None


@dataclass
class ValidationReport:
    source: str
    kind: str
    n_records: int = 0  # records that passed the record checks
    n_volumes: int = 0  # distinct volumes (or multi-image studies) loaded
    volumes_checked: bool = True
    problems: list[Problem] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_records(self) -> int:
        """Records that failed: unreadable ones plus readable ones whose volume failed."""
        unreadable = sum(p.stage == "record" for p in self.problems)
        return unreadable + len({p.record_id for p in self.problems if p.stage == "volume"})

    @property
    def bad_volumes(self) -> int:
        return len({p.where for p in self.problems if p.stage == "volume"})

    def format(self, max_rows: int = 50) -> str:
        """A summary table, then the problems (at most `max_rows`) and the warnings."""
        src = [p for p in self.problems if p.stage == "source"]
        vols = f"{self.n_volumes}  ({self.bad_volumes} bad)" if self.volumes_checked else "not loaded (--no-volumes)"
        rows = [
            ("source", f"{self.source} ({self.kind})"),
            ("status", "OK" if self.ok else "BAD"),
            ("records read", str(self.n_records + sum(p.stage == "record" for p in self.problems))),
            ("bad records", f"{self.bad_records}  ({sum(p.stage == 'record' for p in self.problems)} unreadable, "
                            f"{len({p.record_id for p in self.problems if p.stage == 'volume'})} with a bad volume)"),
            ("volumes loaded", vols),
            ("warnings", str(len(self.warnings))),
            ("time", f"{self.seconds:.1f} s"),
        ]
        if src:
            rows.insert(2, ("source error", src[0].message))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        listed = [p for p in self.problems if p.stage != "source"]
        if listed:
            lines.append("")
            lines.append("bad records:")
            for p in listed[:max_rows]:
                who = f"record {p.record_id!r}: " if p.record_id is not None else ""
                lines.append(f"  [{p.stage}] {who}{p.message}")
            if len(listed) > max_rows:
                lines.append(f"  ... and {len(listed) - max_rows} more (write them all with --json)")
        if self.warnings:
            lines.append("")
            lines.append("warnings:")
            lines += [f"  {msg}" if where in msg else f"  {where}: {msg}" for where, msg in self.warnings[:max_rows]]
            if len(self.warnings) > max_rows:
                lines.append(f"  ... and {len(self.warnings) - max_rows} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, bad_records=self.bad_records, bad_volumes=self.bad_volumes)
        out["warnings"] = [list(w) for w in self.warnings]
        return out


def _check_volumes(records: list[dict[str, Any]], cfg: DataConfig, report: ValidationReport) -> None:
    from .dataset import _rescale  # the CT-RATE slope/intercept rule of StudyDataset
    from .volume import load_study  # torch + MONAI: imported only when volumes are loaded

    outcome: dict[tuple[Any, ...], tuple[str, str] | None] = {}  # key -> (where, message) or None
    t0 = time.perf_counter()
    for rec in records:
        rid = str(rec["id"])
        image = rec["image"]
        paths = tuple(image) if isinstance(image, list) else (image,)
        where = ", ".join(paths)
        try:
            rescale = _rescale(rec, rid)
        except DataError as e:
            report.problems.append(Problem("volume", where, str(e), rid))
            continue
        key = (paths, rescale)
        if key not in outcome:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    load_study(list(paths) if len(paths) > 1 else paths[0], cfg, train=False, rescale=rescale)
                    outcome[key] = None
                except Exception as e:  # a validation pass lists every failure and goes on
                    msg = str(e) if isinstance(e, DataError) else f"{where}: {type(e).__name__}: {e}"
                    outcome[key] = (where, msg)
            report.warnings += [(where, str(w.message)) for w in caught]
            report.n_volumes += 1
            if report.n_volumes % 100 == 0:
                logger.info("validate: %d volumes loaded (%.1f s)", report.n_volumes, time.perf_counter() - t0)
        failed = outcome[key]
        if failed is not None:
            report.problems.append(Problem("volume", failed[0], failed[1], rid))


def validate_dataset(
    source: str | Path,
    cfg: DataConfig | None = None,
    kind: str = "auto",
    load_volumes: bool = True,
    *,
    split: str | None = None,
) -> ValidationReport:
    """Read every record of `source` and (`load_volumes`) load each referenced volume once with
    `cfg`'s preprocessing; never raises for bad data: every failure is in the report.

    `kind` "auto" takes `cfg.kind`, then detection; `split` as in `read_records` (None: all).
    Raises ValueError only for bad arguments (a cfg that is not a DataConfig, an unknown kind).
    """
    cfg = DataConfig() if cfg is None else cfg
    if not isinstance(cfg, DataConfig):
        raise ValueError(f"cfg must be a DataConfig (or None), got {type(cfg).__name__}")
    if kind != "auto":
        get_format(kind)  # ConfigError listing the registered formats
    kind = cfg.kind if kind == "auto" else kind
    t0 = time.perf_counter()
    report = ValidationReport(source=str(source), kind=kind, volumes_checked=load_volumes)
    try:
        read = read_records_report(
            source, kind, data_root=cfg.data_root or None, split=split, vqa_mode=cfg.vqa_mode,
            ct_rate_target=cfg.ct_rate_target, skip_bad_records=True, check_files=True, allow_empty=True,
            allow_outside_root=cfg.allow_outside_root,
        )  # fmt: skip
    except DataError as e:
        report.problems.append(Problem("source", str(source), str(e)))
        report.seconds = time.perf_counter() - t0
        return report
    report.kind = read.kind
    report.n_records = len(read.records)
    report.problems += [Problem("record", where, msg) for where, msg in read.errors]
    if not read.records and not read.errors:
        report.problems.append(Problem("source", str(source), f"{source}: no records found ({read.kind})"))
    if load_volumes and read.records:
        _check_volumes(read.records, cfg, report)
    report.seconds = time.perf_counter() - t0
    level = logging.INFO if report.ok else logging.WARNING
    logger.log(level, "validate %s: %d records, %d bad, %d volumes loaded (%.1f s)", source,
               report.n_records + sum(p.stage == "record" for p in report.problems), report.bad_records,
               report.n_volumes, report.seconds)
    return report


__all__ = ["Problem", "ValidationReport", "validate_dataset"]
