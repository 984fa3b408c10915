"""The metric registry, the metric signature, and the input checks every metric shares.

    METRICS: Registry of metric functions, by name ("m3d", "coco", "closed_vqa_accuracy", ...)
    a metric: fn(preds: list[str], refs: list[str], records: list[dict], **options) -> dict
        preds / refs: one generated and one reference text per evaluated record (same order as
        `records`, the manifest records of eval/runner.py's task, e.g. with "choices",
        "question_type", "labels"); returns corpus scores (floats), or nested dicts of them, that
        eval/runner.py's `score_task` merges into the task's metrics. `options` are the run's
        scoring options (meteor: bool, coco_tokenizer: "ptb" | "simple", bertscore_model: str |
        None); a metric ignores the ones it does not use, so it must accept `**options`.
    run_metrics(names, preds, refs, records, **options) -> merged dict (ConfigError on an
        unknown name or on two metrics reporting the same key)

Adding a metric is one file in eval/metrics/ (imported by the package) or any imported module:

    @METRICS.register("exact_match")
    def exact_match(preds, refs, records, **options):
        return {"exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(preds)}

and its name in `eval.metrics` of the run config (eval/runner.py: task -> metric names).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.registry import Registry

Metric = Callable[..., dict[str, Any]]  # (preds, refs, records, **options) -> scores
METRICS = Registry("metric")


def run_metrics(names: Sequence[str], preds: list[str], refs: list[str], records: list[dict[str, Any]],
                **options: Any) -> dict[str, Any]:
    """The registered metrics `names` over one task's predictions, merged in that order."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric(s) {unknown}; registered: {METRICS.names()}")
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name in names:
        scores = METRICS.get(name)(preds, refs, records, **options)
        if not isinstance(scores, Mapping):
            raise TypeError(f"metric {name!r} returned {type(scores).__name__}; a metric returns a dict of scores")
        for key, value in scores.items():
            if key in owner:
                raise ConfigError(f"eval.metrics: metrics {owner[key]!r} and {name!r} both report {key!r}")
            owner[key] = name
            out[key] = value
    return out


def question_types(records: Sequence[dict[str, Any]]) -> list[str] | None:
    """The records' question types ("unknown" where missing), or None when no record has one."""
    types = [r.get("question_type") for r in records]
    return None if all(t is None for t in types) else [t if t is not None else "unknown" for t in types]


def _texts(values: Sequence[Any], what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise DataError(f"{what}: expected a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{what}[{i}]: expected a str, got {type(v).__name__}")
    return list(values)


def _pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    preds, refs = _texts(predictions, "predictions"), _texts(references, "references")
    if len(preds) != len(refs):
        raise DataError(f"predictions and references differ in length: {len(preds)} vs {len(refs)}")
    if not preds:
        raise DataError("predictions: expected at least one sample, got none")
    return preds, refs


def _clean(text: str) -> str:
    """One line for the java tools: no line breaks, no '|||' (METEOR's field separator)."""
    return " ".join(text.replace("|||", " ").split())



def _means(scores: Mapping[str, Sequence[float]], idx: Sequence[int] | None = None) -> dict[str, float]:
    return {k: float(np.mean(v if idx is None else [v[i] for i in idx])) for k, v in scores.items()}



def _groups(question_types: Sequence[Any] | None, n: int) -> dict[str, list[int]]:
    if question_types is None:
        return {}
    if isinstance(question_types, str) or len(question_types) != n:
        raise DataError(f"question_types: expected a list of {n} types (one per prediction), got {question_types!r:.80}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(question_types):
        groups[str(t)].append(i)
    return dict(sorted(groups.items()))
