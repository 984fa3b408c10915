"""METEOR two ways: nltk's (= HF `evaluate`'s `meteor`, the M3D / Med-2E3 protocol) and the METEOR-1.5 jar.

    meteor_nltk(preds, refs, alpha=0.9, beta=3.0, gamma=0.5) -> [N] per-sample scores in [0, 1]
        refs: one string per prediction, or a list of strings (several references, best one)
Registered:
    "meteor"     -> {"meteor": mean of meteor_nltk}       (what `evaluate.load("meteor")` reports)
    "meteor_1.5" -> {"meteor_1.5": mean of the jar's per-sample scores} (pycocoevalcap's
                    meteor-1.5.jar, `-l en -norm`, needs java; the COCO protocol's METEOR)

`meteor_nltk` is evaluate's `_compute` for nltk >= 3.6.5: each string is split by
`nltk.word_tokenize` (Punkt English sentences, then the Treebank-style word tokenizer), then
`nltk.translate.meteor_score.single_meteor_score(ref_tokens, pred_tokens, alpha, beta, gamma)`
(`meteor_score([...], ...)` for several references: the best one) with nltk's defaults:
lower-casing, PorterStemmer stems, WordNet 3.0 synonyms. The NLTK data come offline from
registry packages (eval/metrics/nltk_data.py), never from nltk.download.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medvlm3d.data.errors import DataError

from . import nltk_data
from .base import METRICS, _texts
from .text import meteor_scores


def _references(references: Sequence[str | Sequence[str]], n: int) -> list[list[str]]:
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise DataError(f"references: expected a list of strings (or of lists of strings), got {type(references).__name__}")
    refs = [[r] if isinstance(r, str) else _texts(r, f"references[{i}]") for i, r in enumerate(references)]
    if len(refs) != n or not refs or any(not r for r in refs):
        raise DataError(f"predictions and references must be non-empty and equal in length (each sample with at "
                        f"least one reference): {n} vs {len(refs)}")
    return refs


def meteor_nltk(predictions: Sequence[str], references: Sequence[str | Sequence[str]], alpha: float = 0.9,
                beta: float = 3.0, gamma: float = 0.5) -> list[float]:
    """Per-sample METEOR exactly as HF evaluate's `meteor` computes it (module docstring)."""
    preds = _texts(predictions, "predictions")
    refs = _references(references, len(preds))
    nltk_data.ensure()
    from nltk import word_tokenize
    from nltk.translate import meteor_score as ms

    out = []
    for pred, group in zip(preds, refs):
        hyp = word_tokenize(pred)
        if len(group) == 1:
            s = ms.single_meteor_score(word_tokenize(group[0]), hyp, alpha=alpha, beta=beta, gamma=gamma)
        else:
            s = ms.meteor_score([word_tokenize(r) for r in group], hyp, alpha=alpha, beta=beta, gamma=gamma)
        out.append(float(s))
    return out


@METRICS.register("meteor")
def meteor(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """nltk METEOR (HF evaluate's `meteor`), averaged over samples."""
    return {"meteor": float(np.mean(meteor_nltk(preds, refs)))}


@METRICS.register("meteor_1.5")
def meteor_jar(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """METEOR-1.5 jar (pycocoevalcap), per-sample scores averaged over samples."""
    return {"meteor_1.5": float(np.mean(meteor_scores(preds, refs)[1]))}
