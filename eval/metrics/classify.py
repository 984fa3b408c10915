"""Clinical efficacy (findings read from reports) and classification metrics (scikit-learn).

    findings_prf(pred_labels, ref_labels, labels=None) -> micro/macro P/R/F1 + "per_label"
    clinical_efficacy(preds, refs, extractor="phantom" | "ct_rate" | fn) -> findings_prf(...)
    classification_metrics(y_true, y_pred, scores=None, labels=None)
        -> {"accuracy", "balanced_accuracy", "macro_f1", ["macro_auroc"], "n"}
    report_extractor(records) -> "ct_rate" | "phantom" | None      (which extractor fits)
    parse_choice(prediction, choices) -> the named choice | None
Registered:
    "clinical_efficacy" -> {"extractor", "clinical_efficacy"} when report_extractor(records)
        finds one (generated vs reference reports), else {}
    "labels_prf" -> {"labels_prf"}: CT-RATE only, generated reports vs the dataset's 18 labels
    "classification" -> classification_metrics of the parsed choices vs the records' answers,
        plus "unparsed" (predictions naming no choice) and "labels" (records[0]["choices"])
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medvlm3d.data.errors import DataError
from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS
from medvlm3d.data.readers import CHOICE_LETTERS

from ..findings import FINDING_EXTRACTORS, ct_rate_findings
from .base import METRICS, _pairs

logger = logging.getLogger(__package__)

NO_LABEL = "<none>"


def findings_prf(pred_labels: Sequence[Mapping[str, Any]], ref_labels: Sequence[Mapping[str, Any]],
                 labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Precision/recall/F1 (micro and macro over labels, zero_division=0) of binary label dicts.

    `labels` defaults to the keys of the first reference; every dict must hold each label as 0/1.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if len(pred_labels) != len(ref_labels) or not ref_labels:
        raise DataError(f"pred_labels and ref_labels must be non-empty and equal in length: "
                        f"{len(pred_labels)} vs {len(ref_labels)}")
    names = list(labels if labels is not None else ref_labels[0])
    if not names:
        raise ValueError("labels: expected at least one label name")

    def matrix(dicts: Sequence[Mapping[str, Any]], what: str) -> np.ndarray:
        rows = []
        for i, d in enumerate(dicts):
            row = []
            for name in names:
                v = d.get(name) if isinstance(d, Mapping) else None
                if not isinstance(v, (bool, int, np.integer)) or v not in (0, 1):
                    raise DataError(f"{what}[{i}]: expected label {name!r} as 0/1, got {v!r}")
                row.append(int(v))
            rows.append(row)
        return np.asarray(rows, dtype=int)

    y_pred, y_true = matrix(pred_labels, "pred_labels"), matrix(ref_labels, "ref_labels")
    out: dict[str, Any] = {"n": len(y_true)}
    if len(names) == 1:
        # sklearn reads an [N, 1] indicator as a binary target and would score class 0 too.
        p, r, f, _ = precision_recall_fscore_support(y_true[:, 0], y_pred[:, 0], average="binary", zero_division=0)
        for avg in ("micro", "macro"):
            out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
        out["per_label"] = {names[0]: {"precision": float(p), "recall": float(r), "f1": float(f),
                                       "support": int(y_true.sum())}}
        return out
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    out["per_label"] = {n: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
                        for k, n in enumerate(names)}
    return out


def clinical_efficacy(predictions: Sequence[str], references: Sequence[str],
                      extractor: str | Callable[[str], dict[str, int]] = "phantom") -> dict[str, Any]:
    """findings_prf of the labels an extractor ("phantom", "ct_rate" or a function) reads from
    the generated and the reference reports."""
    preds, refs = _pairs(predictions, references)
    if isinstance(extractor, str):
        if extractor not in FINDING_EXTRACTORS:
            raise ValueError(f"extractor must be one of {sorted(FINDING_EXTRACTORS)} or a function, got {extractor!r}")
        extractor = FINDING_EXTRACTORS[extractor]
    return findings_prf([extractor(p) for p in preds], [extractor(r) for r in refs])


def classification_metrics(y_true: Sequence[Any], y_pred: Sequence[Any], scores: Any = None,
                           labels: Sequence[Any] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1 and, with `scores`, macro AUROC (one-vs-rest).

    `scores`: [N] scores of the positive class (binary) or [N, C] per class, columns in the order
    of `labels` (default: sorted classes of y_true and y_pred; the positive class is labels[1]).
    AUROC is None (with a warning) when y_true holds a single class.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise DataError(f"y_true and y_pred must be non-empty and equal in length: {len(y_true)} vs {len(y_pred)}")
    classes = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred), key=str)
    out: dict[str, Any] = {"accuracy": float(accuracy_score(y_true, y_pred)),
                           "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
                           "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
                           "n": len(y_true)}
    if scores is None:
        return out
    s = np.asarray(scores, dtype=float)
    if s.shape not in ((len(y_true),), (len(y_true), len(classes))) or not np.isfinite(s).all():
        raise DataError(f"scores: expected finite values of shape ({len(y_true)},) or ({len(y_true)}, {len(classes)}) "
                        f"(classes {classes}), got {s.shape}")
    unknown = set(y_true) - set(classes)
    if unknown:
        raise DataError(f"y_true holds classes {sorted(unknown, key=str)} missing from labels {classes}")
    if len(set(y_true)) < 2:
        logger.warning("macro AUROC undefined: y_true holds a single class")
        out["macro_auroc"] = None
    elif len(classes) == 2:
        pos = s if s.ndim == 1 else s[:, 1]
        out["macro_auroc"] = float(roc_auc_score([int(y == classes[1]) for y in y_true], pos))
    else:
        if s.ndim != 2:
            raise DataError(f"scores: {len(classes)} classes need [N, {len(classes)}] scores, got {s.shape}")
        present = sorted({classes.index(y) for y in y_true})
        y_bin = np.asarray([[int(y == classes[c]) for c in present] for y in y_true])
        out["macro_auroc"] = float(roc_auc_score(y_bin, s[:, present], average="macro"))
    return out


def report_extractor(records: Sequence[dict[str, Any]]) -> str | None:
    """"ct_rate" when every record holds the 18 CT-RATE labels, "phantom" when every record holds
    phantom ground truth (labels.lesion and meta.n_lesions), else None."""
    if not records:
        return None
    if all(set(CT_RATE_LABELS) <= set(r.get("labels") or {}) for r in records):
        return "ct_rate"
    if all("lesion" in (r.get("labels") or {}) and "n_lesions" in (r.get("meta") or {}) for r in records):
        return "phantom"
    return None


def parse_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The choice a prediction names: the first "<letter>." of a choice, else the first choice
    text found (case-insensitive, whole words), else None."""
    letters = CHOICE_LETTERS[: len(choices)]
    m = re.search(rf"(?<![A-Za-z])([{letters}])\.", prediction)
    if m:
        return choices[letters.index(m.group(1))]
    text = prediction.lower()
    found = [(re.search(rf"(?<!\w){re.escape(c.lower())}(?!\w)", text), c) for c in choices]
    hits = [(m.start(), c) for m, c in found if m]
    return min(hits)[1] if hits else None


# --------------------------------------------------------------------------------------------
# registered


@METRICS.register("clinical_efficacy")
def clinical_efficacy_metric(preds: list[str], refs: list[str], records: list[dict[str, Any]],
                             **options: Any) -> dict[str, Any]:
    extractor = report_extractor(records)
    if extractor is None:
        return {}
    return {"extractor": extractor, "clinical_efficacy": clinical_efficacy(preds, refs, extractor)}


@METRICS.register("labels_prf")
def labels_prf(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    if report_extractor(records) != "ct_rate":
        return {}
    return {"labels_prf": findings_prf([ct_rate_findings(p) for p in preds], [r["labels"] for r in records],
                                       labels=list(CT_RATE_LABELS))}


@METRICS.register("classification")
def classification(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    labels = list(records[0]["choices"])
    y_pred = [parse_choice(p, labels) or NO_LABEL for p in preds]
    with warnings.catch_warnings():  # sklearn warns about the NO_LABEL class; "unparsed" counts it
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out = classification_metrics([r["answer"] for r in records], y_pred, labels=labels)
    out.update({"unparsed": sum(y == NO_LABEL for y in y_pred), "labels": labels})
    return out
