"""Benchmark metrics as pure functions over standard packages (no hand-written n-gram metrics).

M3D protocol (report generation, open VQA), each score averaged over samples, in [0, 1]:
    m3d_text_metrics(predictions, references, *, meteor=True, bertscore_model=None, ...)
        -> {"bleu1", "rouge1", "meteor", ["bertscore_f1"], "n"}
    open_vqa_metrics(predictions, references, question_types=None, **same)
        -> {<the above, overall>, "by_type": {type: {...}}, "macro": {metric: mean over types}}
    closed_vqa_accuracy(predictions, answer_letters, question_types=None)
        -> {"accuracy", "correct", "n", "by_type": {type: {"accuracy", "correct", "n"}}, "macro_accuracy"}
COCO-caption protocol (CT-CHAT / CT-RATE papers), corpus level:
    coco_caption_metrics(predictions, references, *, tokenizer="ptb", meteor=True)
        -> {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "n"}
Clinical efficacy and classification:
    findings_prf(pred_labels, ref_labels, labels=None) -> micro/macro P/R/F1 + "per_label"
    clinical_efficacy(predictions, references, extractor="phantom" | "ct_rate") -> findings_prf(...)
    classification_metrics(y_true, y_pred, scores=None, labels=None)
        -> {"accuracy", "balanced_accuracy", "macro_f1", ["macro_auroc"], "n"}
    bertscore(predictions, references, model_dir, layer=None, ...) -> {"precision", "recall", "f1"} lists

Implementations:
  - BLEU-1 (M3D): sacrebleu `BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a")`
    `.sentence_score` per sample = brevity penalty x clipped unigram precision, case-sensitive.
    This is what M3D's `evaluate.load("bleu").compute(..., max_order=1)` computes per sample
    (same 13a tokenizer, no smoothing, same brevity penalty), without the hub.
  - ROUGE-1 (M3D): rouge-score `RougeScorer(["rouge1"], use_stemmer=False)` F-measure per sample
    (evaluate's "rouge" default).
  - METEOR: pycocoevalcap's meteor-1.5.jar (`java -jar ... -l en -norm`), per-sample scores for
    M3D, the jar's aggregate for COCO. M3D used nltk's METEOR, whose wordnet cannot be downloaded
    here, so values differ from nltk's slightly. Needs `java` on PATH (RuntimeError otherwise,
    or pass meteor=False). One jar process is started on first use (several seconds) and reused;
    `close_meteor()` stops it.
  - BERTScore-F1: only with a local model folder (`bertscore_model=`): transformers AutoModel,
    token embeddings of one hidden layer (special tokens dropped), L2-normalised, greedy cosine
    matching: P = mean over prediction tokens of the best match, R = the same over reference
    tokens, F1 = 2PR/(P+R); no idf weighting, no baseline rescaling (bert-score's defaults;
    bert-score's `lang="en"` uses roberta-large with layer=17). Without a folder it is skipped and
    "BERTScore skipped: no local model folder given" is logged (warning).
  - COCO: pycocoevalcap Bleu(4) (option "closest"), Meteor, Rouge (ROUGE-L, beta 1.2), Cider
    (CIDEr-D, idf from the references of this corpus: a single sample scores 0). Tokenised by
    pycocoevalcap's PTBTokenizer (Stanford CoreNLP jar, java, lower-cased, punctuation dropped) as
    COCOEvalCap does; tokenizer="simple" (or no java) uses `simple_tokenize` instead.
  - Classification and findings: scikit-learn (zero_division=0).
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medvlm3d.data.errors import DataError

from .findings import FINDING_EXTRACTORS, ct_rate_findings, phantom_findings

logger = logging.getLogger(__name__)

__all__ = [
    "bertscore", "classification_metrics", "clinical_efficacy", "close_meteor", "closed_vqa_accuracy",
    "coco_caption_metrics", "ct_rate_findings", "findings_prf", "m3d_text_metrics", "meteor_scores",
    "open_vqa_metrics", "phantom_findings", "simple_tokenize",
]

BERTSCORE_SKIPPED = "BERTScore skipped: no local model folder given"
_PTB_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


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
# BERTScore (local model folder only)


def bertscore(predictions: Sequence[str], references: Sequence[str], model_dir: str | Path, layer: int | None = None,
              batch_size: int = 16, device: str = "cpu") -> dict[str, list[float]]:
    """Per-sample BERTScore precision/recall/F1 with the model in `model_dir` (see module docstring).

    `layer` picks the hidden state (0 = embeddings, default the last layer).
    """
    preds, refs = _pairs(predictions, references)
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"BERTScore model folder {str(path)!r} does not exist (a local HF model folder is needed)")
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    max_len = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    def embed(texts: list[str]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_special_tokens_mask=True, return_tensors="pt")
            special = enc.pop("special_tokens_mask").bool()
            with torch.no_grad():
                hidden = model(**enc.to(device), output_hidden_states=True).hidden_states
            if layer is not None and not -len(hidden) <= layer < len(hidden):
                raise ValueError(f"layer must index one of the model's {len(hidden)} hidden states, got {layer}")
            states = torch.nn.functional.normalize(hidden[-1 if layer is None else layer].float(), dim=-1)
            keep = enc["attention_mask"].bool().cpu() & ~special
            out += [s[k] for s, k in zip(states.cpu(), keep)]
        return out

    scores: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    for c, r in zip(embed(preds), embed(refs)):
        if len(c) == 0 or len(r) == 0:
            p = rc = f = 0.0
        else:
            sim = c @ r.T
            p, rc = float(sim.max(dim=1).values.mean()), float(sim.max(dim=0).values.mean())
            f = 2 * p * rc / (p + rc) if p + rc > 0 else 0.0
        scores["precision"].append(p)
        scores["recall"].append(rc)
        scores["f1"].append(f)
    return scores


# --------------------------------------------------------------------------------------------
# M3D protocol


def _m3d_sample_scores(preds: list[str], refs: list[str], meteor: bool, bertscore_model: str | Path | None,
                       bertscore_layer: int | None, device: str) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    bleu = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=True)
    rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    scores = {"bleu1": [bleu.sentence_score(p, [r]).score / 100.0 for p, r in zip(preds, refs)],
              "rouge1": [rouge.score(r, p)["rouge1"].fmeasure for p, r in zip(preds, refs)]}
    if meteor:
        scores["meteor"] = meteor_scores(preds, refs)[1]
    if bertscore_model is None:
        logger.warning(BERTSCORE_SKIPPED)
    else:
        scores["bertscore_f1"] = bertscore(preds, refs, bertscore_model, bertscore_layer, device=device)["f1"]
    return scores


def _means(scores: Mapping[str, Sequence[float]], idx: Sequence[int] | None = None) -> dict[str, float]:
    return {k: float(np.mean(v if idx is None else [v[i] for i in idx])) for k, v in scores.items()}


def m3d_text_metrics(predictions: Sequence[str], references: Sequence[str], *, meteor: bool = True,
                     bertscore_model: str | Path | None = None, bertscore_layer: int | None = None,
                     device: str = "cpu") -> dict[str, float]:
    """BLEU-1, ROUGE-1, METEOR, [BERTScore-F1], each averaged over samples, plus "n"."""
    preds, refs = _pairs(predictions, references)
    out: dict[str, float] = _means(_m3d_sample_scores(preds, refs, meteor, bertscore_model, bertscore_layer, device))
    out["n"] = len(preds)
    return out


def _groups(question_types: Sequence[Any] | None, n: int) -> dict[str, list[int]]:
    if question_types is None:
        return {}
    if isinstance(question_types, str) or len(question_types) != n:
        raise DataError(f"question_types: expected a list of {n} types (one per prediction), got {question_types!r:.80}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(question_types):
        groups[str(t)].append(i)
    return dict(sorted(groups.items()))


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
# clinical efficacy and classification


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
