"""Score any model's outputs under a named protocol (eval/protocols.py), from files.

    read_predictions(path) -> {id: prediction}        preds.jsonl lines {"id", "prediction"}
    read_references(path, protocol, kind="auto", split=None) -> [N] manifest records
        (a manifest, or an M3D-Cap / M3D-VQA / CT-RATE source through medvlm3d.data.read_records;
        image files are not checked: scoring needs only the texts)
    align(preds, records, allow_missing=False) -> (predictions [M], records [M], missing counts)
        DataError listing the first few ids missing on either side unless allow_missing
    score_predictions(protocol, preds {id: prediction}, records, allow_missing=False, **options)
        -> (summary (eval/protocols.py's, plus "missing"), per-sample rows): the in-memory core,
        what `medvlm3d score` and `medvlm3d eval` (eval/runner.py `evaluate`) both call
    score_files(protocol, pred, ref, out=None, allow_missing=False, kind="auto", split=None,
                **options) -> summary (score_predictions's, plus "pred", "ref")
        writes out/metrics.json and out/per_sample.jsonl when `out` is given
    write_per_sample(path, rows)                       per-sample scores as JSONL
    score_table(summary) -> str                        the plain-text table the CLI prints
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from medvlm3d.data.errors import ConfigError, DataError

from .protocols import PROTOCOLS
from medvlm3d.io import atomic_write_text

from .runner import _flatten, format_table

VQA_MODE = {"m3d_vqa_open": "open"}  # M3D-VQA references: open questions for this one, else closed
SHOW = 5


def read_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """{id: prediction} from a JSONL file of {"id", "prediction"} objects (ids unique)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: predictions file not found")
    out: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{n}: not a JSON object ({e})") from e
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("prediction"), str):
            raise DataError(f"{p}:{n}: expected {{\"id\": ..., \"prediction\": \"text\"}}, got {line[:80]!r}")
        key = str(obj["id"])
        if key in out:
            raise DataError(f"{p}:{n}: duplicate id {key!r}")
        out[key] = obj["prediction"]
    if not out:
        raise DataError(f"{p}: no predictions")
    return out


def read_references(path: str | os.PathLike[str], protocol: str, kind: str = "auto",
                    split: str | None = None) -> list[dict[str, Any]]:
    """The reference records (the protocol's references are their "answer")."""
    from medvlm3d.data.readers import read_records

    return read_records(path, kind, split=split, vqa_mode=VQA_MODE.get(protocol, "closed"), check_files=False)


def align(preds: dict[str, str], records: Sequence[dict[str, Any]],
          allow_missing: bool = False) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """Predictions and records paired by id, in the records' order."""
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"references: duplicate ids {dup[:SHOW]}")
    no_pred = [i for i in ids if i not in preds]
    no_ref = [i for i in preds if i not in set(ids)]
    if (no_pred or no_ref) and not allow_missing:
        parts = [f"{len(no_pred)} reference id(s) have no prediction (first: {no_pred[:SHOW]})" if no_pred else "",
                 f"{len(no_ref)} prediction id(s) have no reference (first: {no_ref[:SHOW]})" if no_ref else ""]
        raise DataError("; ".join(p for p in parts if p) + "; pass --allow-missing to score the ids on both sides")
    kept = [r for r in records if str(r["id"]) in preds]
    if not kept:
        raise DataError("no id is on both sides: nothing to score")
    missing = {"without_prediction": len(no_pred), "without_reference": len(no_ref),
               "first_without_prediction": no_pred[:SHOW], "first_without_reference": no_ref[:SHOW]}
    return [preds[str(r["id"])] for r in kept], kept, missing


def score_predictions(protocol: str, preds: Mapping[str, str], records: Sequence[dict[str, Any]],
                      allow_missing: bool = False, **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score predictions {id: text} against reference records under `protocol` (module docstring)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol: unknown protocol {protocol!r}; registered: {PROTOCOLS.names()}")
    texts, kept, missing = align(dict(preds), records, allow_missing)
    summary, rows = PROTOCOLS.get(protocol).score(texts, kept, **options)
    summary["missing"] = missing
    return summary, rows


def write_per_sample(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def score_files(protocol: str, pred: str | os.PathLike[str], ref: str | os.PathLike[str],
                out: str | os.PathLike[str] | None = None, allow_missing: bool = False, kind: str = "auto",
                split: str | None = None, **options: Any) -> dict[str, Any]:
    """Score a predictions file against references under `protocol` (module docstring)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol: unknown protocol {protocol!r}; registered: {PROTOCOLS.names()}")
    summary, rows = score_predictions(protocol, read_predictions(pred), read_references(ref, protocol, kind, split),
                                      allow_missing, **options)
    summary.update({"pred": str(pred), "ref": str(ref)})
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metrics.json", json.dumps(summary, indent=2) + "\n")
        write_per_sample(folder / "per_sample.jsonl", rows)
    return summary


def score_table(summary: dict[str, Any]) -> str:
    """Title, a metric/value table (nested results flattened, per-label details left out), notes."""
    miss = summary.get("missing") or {}
    title = f"{summary['protocol']}: {summary['n']} samples ({summary['aggregation']})"
    if miss.get("without_prediction") or miss.get("without_reference"):
        title += (f"; left out: {miss['without_prediction']} without prediction, "
                  f"{miss['without_reference']} without reference")
    lines = [title, format_table(list(_flatten(summary["metrics"])), ["metric", "value"])]
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)
