"""Evaluation protocols: a named list of registered metrics (eval/metrics/) plus its aggregation,
each equal to the reference implementation a paper used (docs/metrics.md gives the same table).

    PROTOCOLS: Registry of Protocol, by name: m3d_cap, m3d_vqa_closed, m3d_vqa_open,
        med2e3_ctrate, coco, ctrate_ce
    Protocol.score(preds [N] str, records [N] manifest records, **options)
        -> (summary dict, per-sample rows [N] of {"id", <metric>: float, ...})
        references are the records' "answer"; options: bertscore_model, bertscore_layers,
        bertscore_rescale, coco_tokenizer, ctrate_classifier, device
    summary = {"protocol", "reference", "aggregation", "n", "metrics": {...}, "notes": [...]}

Per-sample metrics (PER_SAMPLE, the registered names that have one value per sample): bleu1,
rouge1, rouge_l, meteor (nltk), bertscore (F1), closed_vqa_accuracy (M3D "<letter>." rule),
choice_paren (Med-2E3 "(X)" rule). Corpus-only: coco, clinical_efficacy (ctrate_ce).
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from medvlm3d.data.errors import DataError
from medvlm3d.registry import Registry

from .metrics import BERTSCORE_SKIP, bertscore, meteor_nltk
from .metrics.text import bleu1_scores, rouge_scores

PROTOCOLS = Registry("protocol")
Rows = list[dict[str, Any]]


def answer_letter(rec: dict[str, Any]) -> str:
    """The record's correct choice letter: "answer_choice", else "(B)" / "B." at the answer's start."""
    letter = rec.get("answer_choice")
    if not letter:
        m = re.match(r"\s*\(?([A-J])[).]", str(rec.get("answer", "")))
        letter = m.group(1) if m else None
    if not letter:
        raise DataError(f"record {rec.get('id')!r}: a multiple-choice reference needs 'answer_choice' or an "
                        f"answer starting with '(X)' or 'X.', got {str(rec.get('answer'))[:60]!r}")
    return str(letter)


def _m3d_letter_hits(preds: list[str], recs: Rows, **_: Any) -> list[float]:
    return [float(f"{answer_letter(r)}." in p) for p, r in zip(preds, recs)]  # M3D: substring "B."


def _paren_hits(preds: list[str], recs: Rows, **_: Any) -> list[float]:
    out = []
    for p, r in zip(preds, recs):  # Med-2E3: the first "(X)" in the prediction is its choice
        m = re.search(r"\(([A-J])\)", p)
        out.append(float(m is not None and m.group(1) == answer_letter(r)))
    return out


def _bertscore_f1(preds: list[str], recs: Rows, *, bertscore_model: str | None = None,
                  bertscore_layers: int | None = None, bertscore_rescale: bool = False, device: str = "cpu",
                  **_: Any) -> list[float] | None:
    if not bertscore_model:
        return None
    return bertscore(preds, [r["answer"] for r in recs], bertscore_model, bertscore_layers, device=device,
                     rescale_with_baseline=bertscore_rescale)["f1"]


def _refs(recs: Rows) -> list[str]:
    return [str(r["answer"]) for r in recs]


# registered metric name -> per-sample scores [N] (None = skipped)
PER_SAMPLE: dict[str, Callable[..., list[float] | None]] = {
    "bleu1": lambda p, r, **o: bleu1_scores(p, _refs(r)),
    "rouge1": lambda p, r, **o: rouge_scores(p, _refs(r), "rouge1"),
    "rouge_l": lambda p, r, **o: rouge_scores(p, _refs(r), "rougeL"),
    "meteor": lambda p, r, **o: meteor_nltk(p, _refs(r)),
    "bertscore": _bertscore_f1,
    "closed_vqa_accuracy": _m3d_letter_hits,
    "choice_paren": _paren_hits,
}


def _mean_over(rows: Rows, names: Sequence[str], idx: Sequence[int]) -> dict[str, float]:
    out = {}
    for n in names:
        vals = [rows[i][n] for i in idx if n in rows[i]]
        if vals:
            out[n] = float(np.mean(vals))
    return out


def is_choice(rec: dict[str, Any]) -> bool:
    return bool(rec.get("choices") or rec.get("answer_choice"))


@dataclass(frozen=True)
class Protocol:
    """A protocol: per-sample `metrics` (PER_SAMPLE names), averaged over samples, and with
    `by_type` also per question type and their macro mean; `corpus` computes corpus-level ones.
    With `choice_metric`, multiple-choice records (with "choices" / "answer_choice") are scored by
    it alone and the other records by `metrics` (each mean over the samples it applies to)."""

    name: str
    metrics: tuple[str, ...]
    aggregation: str
    reference: str
    by_type: bool = False
    corpus: Callable[..., tuple[dict[str, Any], list[str]]] | None = None
    choice_metric: str | None = None

    def score(self, preds: Sequence[str], records: Sequence[dict[str, Any]], **options: Any) -> tuple[dict[str, Any], Rows]:
        preds, recs = list(preds), list(records)
        if len(preds) != len(recs) or not preds:
            raise DataError(f"protocol {self.name}: predictions and records must be non-empty and equal in length: "
                            f"{len(preds)} vs {len(recs)}")
        rows: Rows = [{"id": r.get("id")} for r in recs]
        metrics: dict[str, Any] = {}
        notes: list[str] = []
        choice = [i for i, r in enumerate(recs) if self.choice_metric and is_choice(r)]
        plan = [(n, [i for i in range(len(recs)) if i not in set(choice)]) for n in self.metrics]
        if self.choice_metric:
            plan.append((self.choice_metric, choice))
            metrics.update({"n_text": len(recs) - len(choice), "n_choice": len(choice)})
        for name, idx in plan:
            if not idx:
                continue
            values = PER_SAMPLE[name]([preds[i] for i in idx], [recs[i] for i in idx], **options)
            if values is None:
                metrics[name] = BERTSCORE_SKIP
                notes.append(f"{name}: {BERTSCORE_SKIP}")
                continue
            for i, v in zip(idx, values):
                rows[i][name] = float(v)
        names = [n for n, _ in plan if any(n in row for row in rows)]
        metrics.update(_mean_over(rows, names, range(len(rows))))
        if self.by_type:
            groups: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(recs):
                groups[str(r.get("question_type") or "unknown")].append(i)
            by_type = {t: {**_mean_over(rows, names, idx), "n": len(idx)} for t, idx in sorted(groups.items())}
            metrics["by_type"] = by_type
            metrics["macro"] = {n: float(np.mean([g[n] for g in by_type.values()])) for n in names}
        if self.corpus is not None:
            extra, more = self.corpus(preds, recs, **options)
            metrics.update(extra)
            notes += more
        summary = {"protocol": self.name, "reference": self.reference, "aggregation": self.aggregation,
                   "n": len(preds), "metrics": metrics, "notes": notes}
        return summary, rows


def protocol(metrics: Sequence[str], aggregation: str, *, by_type: bool = False,
             corpus: Callable[..., tuple[dict[str, Any], list[str]]] | None = None,
             choice_metric: str | None = None) -> Callable[[Callable], Protocol]:
    """Register the decorated function's name as a Protocol; its docstring is the reference it equals."""
    unknown = [m for m in (*metrics, *([choice_metric] if choice_metric else [])) if m not in PER_SAMPLE]
    if unknown:
        raise ValueError(f"protocol metrics {unknown} have no per-sample scorer; known: {sorted(PER_SAMPLE)}")

    def wrap(fn: Callable) -> Protocol:
        p = Protocol(fn.__name__, tuple(metrics), aggregation, inspect.cleandoc(fn.__doc__ or ""), by_type, corpus,
                     choice_metric)
        PROTOCOLS.register(fn.__name__)(p)
        return p

    return wrap


from . import protocols_defs  # noqa: E402,F401  (registers the protocols)
