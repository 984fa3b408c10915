"""VQA metrics (M3D protocol).

    open_vqa_metrics(preds, refs, question_types=None, **text options)
        -> {"bleu1", "rouge1", "meteor", ["bertscore_f1"], "n", "by_type": {type: {...}},
            "macro": {metric: mean over types}}
    closed_vqa_accuracy(preds, answer_letters, question_types=None)
        -> {"accuracy", "correct", "n", "by_type": {type: {"accuracy", "correct", "n"}}, "macro_accuracy"}
Registered: "open_vqa" and "closed_vqa_accuracy" (records give the question types; a closed
reference "B. liver" gives the letter "B"), each merged flat into the task's metrics.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from medvlm3d.data.errors import DataError

from .base import METRICS, _groups, _means, _pairs, _texts, question_types
from .text import _m3d_sample_scores


def open_vqa_metrics(predictions: Sequence[str], references: Sequence[str], question_types: Sequence[Any] | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """M3D text metrics overall, per question type ("by_type") and their mean over types ("macro")."""
    preds, refs = _pairs(predictions, references)
    groups = _groups(question_types, len(preds))
    scores = _m3d_sample_scores(preds, refs, kwargs.pop("meteor", True), kwargs.pop("bertscore_model", None),
                                kwargs.pop("bertscore_layer", None), kwargs.pop("device", "cpu"))
    if kwargs:
        raise ValueError(f"unknown options {sorted(kwargs)}; expected meteor, bertscore_model, bertscore_layer, device")
    out: dict[str, Any] = {**_means(scores), "n": len(preds)}
    out["by_type"] = {t: {**_means(scores, idx), "n": len(idx)} for t, idx in groups.items()}
    out["macro"] = ({k: float(np.mean([g[k] for g in out["by_type"].values()])) for k in scores}
                    if groups else _means(scores))
    return out


def closed_vqa_accuracy(predictions: Sequence[str], answer_letters: Sequence[str],
                        question_types: Sequence[Any] | None = None) -> dict[str, Any]:
    """M3D closed-VQA accuracy: a prediction is correct when it contains "<letter>." (substring,
    case-sensitive), exactly as M3D scores it: "B. Liver" and "AB." count for B; "B" and "b." do not.

    Without question types, "by_type" is empty and "macro_accuracy" equals "accuracy".
    """
    preds = _texts(predictions, "predictions")
    letters = _texts(answer_letters, "answer_letters")
    if len(preds) != len(letters) or not preds:
        raise DataError(f"predictions and answer_letters must be non-empty and equal in length: "
                        f"{len(preds)} vs {len(letters)}")
    for i, a in enumerate(letters):
        if not re.fullmatch(r"[A-Z]", a):
            raise DataError(f"answer_letters[{i}]: expected one capital letter such as 'A'..'D', got {a!r}")
    hits = [int(f"{a}." in p) for p, a in zip(preds, letters)]
    groups = _groups(question_types, len(preds))

    def acc(idx: Sequence[int]) -> dict[str, Any]:
        correct = sum(hits[i] for i in idx)
        return {"accuracy": correct / len(idx), "correct": correct, "n": len(idx)}

    out = acc(range(len(hits)))
    out["by_type"] = {t: acc(idx) for t, idx in groups.items()}
    out["macro_accuracy"] = (float(np.mean([g["accuracy"] for g in out["by_type"].values()]))
                             if groups else out["accuracy"])
    return out


@METRICS.register("open_vqa")
def open_vqa(preds: list[str], refs: list[str], records: list[dict[str, Any]], *, meteor: bool = True,
             bertscore_model: str | None = None, bertscore_layers: int | None = None, **options: Any) -> dict[str, Any]:
    return open_vqa_metrics(preds, refs, question_types(records), meteor=meteor, bertscore_model=bertscore_model,
                            bertscore_layer=bertscore_layers)


@METRICS.register("closed_vqa_accuracy")
def closed_vqa(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    return closed_vqa_accuracy(preds, [ref.split(".", 1)[0] for ref in refs], question_types(records))
