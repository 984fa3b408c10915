"""Text metrics over standard packages (eval/metrics/__init__.py documents each implementation).

    meteor_scores(preds, refs) -> (corpus METEOR, [per-sample METEOR])   pycocoevalcap's jar
        (the M3D metrics use nltk's METEOR instead: eval/metrics/meteor.py)
    m3d_text_metrics(preds, refs, *, meteor=True, bertscore_model=None, ...)
        -> {"bleu1", "rouge1", "meteor", ["bertscore_f1"], "n"}    (per-sample means)
    coco_caption_metrics(preds, refs, *, tokenizer="ptb", meteor=True)
        -> {"bleu1".."bleu4", "meteor", "rouge_l", "cider", "n"}    (corpus level)
    bleu1_scores(preds, refs), rouge_scores(preds, refs, "rouge1" | "rougeL") -> [N] per-sample
Registered: "m3d" -> {"m3d": m3d_text_metrics(...)}, "coco" -> {"coco": coco_caption_metrics(...)},
    "bleu1" / "rouge1" / "rouge_l" -> {name: per-sample mean}.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvlm3d.data.errors import DataError

from .base import METRICS, _clean, _means, _pairs, _texts

logger = logging.getLogger(__package__)

BERTSCORE_SKIPPED = "BERTScore skipped: no local model folder given"
_PTB_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


# --------------------------------------------------------------------------------------------
# METEOR (pycocoevalcap's jar, one process reused)

_meteor: Any = None
_meteor_lock = threading.Lock()


def _require_java(what: str) -> None:
    if shutil.which("java") is None:
        raise RuntimeError(f"{what} needs `java` on PATH (pycocoevalcap runs a Java jar); install a Java runtime "
                           "(e.g. apt-get install default-jre-headless) or pass meteor=False")


def close_meteor() -> None:
    """Stop the cached METEOR jar process (started by the first METEOR score)."""
    global _meteor
    with _meteor_lock:
        if _meteor is not None:
            proc = _meteor.meteor_p
            proc.stdin.close()
            proc.kill()
            proc.wait()
            _meteor = None


atexit.register(close_meteor)


def _meteor_scorer() -> Any:
    global _meteor
    _require_java("METEOR")
    from pycocoevalcap.meteor.meteor import Meteor

    if _meteor is None or _meteor.meteor_p.poll() is not None:
        _meteor = Meteor()
    return _meteor


def meteor_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus METEOR, per-sample METEOR) from pycocoevalcap's jar; references may be lists."""
    preds = [_clean(p) for p in _texts(predictions, "predictions")]
    refs = [[_clean(r) for r in ([x] if isinstance(x, str) else x)] for x in references]
    with _meteor_lock:
        corpus, per_sample = _meteor_scorer().compute_score(dict(enumerate(refs)), {i: [p] for i, p in enumerate(preds)})
    return float(corpus), [float(s) for s in per_sample]


# --------------------------------------------------------------------------------------------
# M3D protocol


def bleu1_scores(preds: list[str], refs: list[str]) -> list[float]:
    """Per-sample BLEU-1 as evaluate's `bleu` with max_order=1 (module docstring of the package)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=True)
    return [bleu.sentence_score(p, [r]).score / 100.0 for p, r in zip(preds, refs)]


def rouge_scores(preds: list[str], refs: list[str], kind: str = "rouge1") -> list[float]:
    """Per-sample ROUGE F-measure ("rouge1", "rougeL") as evaluate's `rouge` (no stemmer)."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer([kind], use_stemmer=False)
    return [rouge.score(r, p)[kind].fmeasure for p, r in zip(preds, refs)]


def _m3d_sample_scores(preds: list[str], refs: list[str], meteor: bool, bertscore_model: str | Path | None,
                       bertscore_layer: int | None, device: str) -> dict[str, list[float]]:
    scores = {"bleu1": bleu1_scores(preds, refs), "rouge1": rouge_scores(preds, refs, "rouge1")}
    if meteor:  # M3D scores with HF evaluate's meteor = nltk's (eval/metrics/meteor.py)
        from .meteor import meteor_nltk

        scores["meteor"] = meteor_nltk(preds, refs)
    if bertscore_model is None:
        logger.warning(BERTSCORE_SKIPPED)
    else:  # bert-score with the folder's layer (eval/metrics/bertscore_metric.py)
        from .bertscore_metric import bertscore

        scores["bertscore_f1"] = bertscore(preds, refs, bertscore_model, bertscore_layer, device=device)["f1"]
    return scores



def m3d_text_metrics(predictions: Sequence[str], references: Sequence[str], *, meteor: bool = True,
                     bertscore_model: str | Path | None = None, bertscore_layer: int | None = None,
                     device: str = "cpu") -> dict[str, float]:
    """BLEU-1, ROUGE-1, METEOR, [BERTScore-F1], each averaged over samples, plus "n"."""
    preds, refs = _pairs(predictions, references)
    out: dict[str, float] = _means(_m3d_sample_scores(preds, refs, meteor, bertscore_model, bertscore_layer, device))
    out["n"] = len(preds)
    return out


# --------------------------------------------------------------------------------------------
# COCO-caption protocol


def simple_tokenize(text: str) -> str:
    """Fallback for PTBTokenizer: lower-case; words (keeping inner . - as in "3.5", "x-ray"), "'s"-style
    clitics split off, punctuation dropped. Agrees with PTB on plain text; differs on brackets (PTB
    keeps "-lrb-"/"-rrb-": pycocoevalcap's punctuation list is upper-case) and rarer PTB rules."""
    tokens = re.findall(r"'[a-z]+|[a-z0-9]+(?:[.\-][a-z0-9]+)*|[^\sa-z0-9]", text.lower())
    return " ".join(t for t in tokens if t not in _PTB_PUNCT and re.search(r"[a-z0-9]", t))


def _tokenize(captions: dict[int, list[str]], tokenizer: str) -> dict[int, list[str]]:
    if tokenizer == "ptb" and shutil.which("java") is None:
        logger.warning("java not found: COCO metrics use simple_tokenize instead of PTBTokenizer")
        tokenizer = "simple"
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            return PTBTokenizer().tokenize({k: [{"caption": _clean(c)} for c in v] for k, v in captions.items()})
        except OSError as e:  # e.g. the package folder (where it writes a temp file) is read-only
            logger.warning("PTBTokenizer failed (%s): COCO metrics use simple_tokenize", e)
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def coco_caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                         tokenizer: str = "ptb", meteor: bool = True) -> dict[str, float]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L, CIDEr through pycocoevalcap (as CT-CHAT scores)."""
    if tokenizer not in ("ptb", "simple"):
        raise ValueError(f"tokenizer must be 'ptb' or 'simple', got {tokenizer!r}")
    preds = _texts(predictions, "predictions")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise DataError(f"references: expected a list of strings (or of lists of strings), got {type(references).__name__}")
    refs = [[r] if isinstance(r, str) else _texts(r, f"references[{i}]") for i, r in enumerate(references)]
    if len(preds) != len(refs) or not preds:
        raise DataError(f"predictions and references must be non-empty and equal in length: {len(preds)} vs {len(refs)}")
    if meteor:
        _require_java("METEOR")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = _tokenize(dict(enumerate(refs)), tokenizer)
    res = _tokenize({i: [p] for i, p in enumerate(preds)}, tokenizer)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}
    if meteor:
        out["meteor"] = meteor_scores([res[i][0] for i in res], [gts[i] for i in res])[0]
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["n"] = len(preds)
    return out


# --------------------------------------------------------------------------------------------
# registered


@METRICS.register("m3d")
def m3d(preds: list[str], refs: list[str], records: list[dict[str, Any]], *, meteor: bool = True,
        bertscore_model: str | None = None, bertscore_layers: int | None = None, **options: Any) -> dict[str, Any]:
    """M3D report metrics (BLEU-1, ROUGE-1, METEOR, [BERTScore-F1]) under "m3d"."""
    return {"m3d": m3d_text_metrics(preds, refs, meteor=meteor, bertscore_model=bertscore_model,
                                    bertscore_layer=bertscore_layers)}


@METRICS.register("coco")
def coco(preds: list[str], refs: list[str], records: list[dict[str, Any]], *, meteor: bool = True,
         coco_tokenizer: str = "ptb", **options: Any) -> dict[str, Any]:
    """COCO-caption corpus metrics under "coco"."""
    return {"coco": coco_caption_metrics(preds, refs, tokenizer=coco_tokenizer, meteor=meteor)}


@METRICS.register("bleu1")
def bleu1(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """BLEU-1 (evaluate's `bleu`, max_order=1) averaged over samples."""
    return {"bleu1": float(np.mean(bleu1_scores(*_pairs(preds, refs))))}


@METRICS.register("rouge1")
def rouge1(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """ROUGE-1 F (evaluate's `rouge`) averaged over samples."""
    return {"rouge1": float(np.mean(rouge_scores(*_pairs(preds, refs), "rouge1")))}


@METRICS.register("rouge_l")
def rouge_l(preds: list[str], refs: list[str], records: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """ROUGE-L F (evaluate's `rouge` "rougeL") averaged over samples."""
    return {"rouge_l": float(np.mean(rouge_scores(*_pairs(preds, refs), "rougeL")))}
