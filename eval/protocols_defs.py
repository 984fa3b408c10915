"""The registered protocols (eval/protocols.py: PROTOCOLS, Protocol); each docstring names the
reference implementation it equals and its aggregation. docs/metrics.md has the same table."""

from __future__ import annotations

from typing import Any

from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS

from .findings import ct_rate_findings
from .metrics import coco_caption_metrics, findings_prf
from .metrics.ctrate_classifier import classifier_labels
from .protocols import Rows, _refs, protocol

TEXT = ("bleu1", "rouge1", "meteor", "bertscore")


@protocol(TEXT, "mean over samples")
def m3d_cap() -> None:
    """M3D-LaMed report generation (M3D-Cap): per sample, HF evaluate's bleu (max_order=1),
    rouge (rouge1), meteor (nltk, WordNet) and bertscore (lang="en": roberta-large, layer 17),
    each averaged over samples."""


@protocol(("closed_vqa_accuracy",), "mean over samples; per question type and macro over types", by_type=True)
def m3d_vqa_closed() -> None:
    """M3D-LaMed closed VQA (M3D-VQA multiple choice): correct when the prediction contains
    "<answer letter>." (case-sensitive substring, as M3D's script); accuracy overall, per
    question type (Plane, Phase, Organ, Abnormality, Location) and their macro mean."""


@protocol(TEXT, "mean over samples; per question type and macro over types", by_type=True)
def m3d_vqa_open() -> None:
    """M3D-LaMed open VQA: the M3D-Cap text metrics (evaluate's bleu max_order=1, rouge1, meteor,
    bertscore lang="en") per sample, averaged overall, per question type and macro over types."""


@protocol(("bleu1", "rouge1", "rouge_l", "meteor", "bertscore"), "mean over samples (text; multiple choice apart)",
          choice_metric="choice_paren")
def med2e3_ctrate() -> None:
    """Med-2E3 on CT-RATE / M3D: BLEU-1, ROUGE-1, ROUGE-L (evaluate's bleu max_order=1 and rouge),
    METEOR (evaluate's meteor = nltk), BERTScore (evaluate's bertscore lang="en"), each a per-sample
    mean over the free-text records; multiple-choice records (with choices / answer_choice) are
    correct when the first "(X)" in the prediction is the answer letter (choice_paren, a mean over
    those records)."""


def _coco(preds: list[str], recs: Rows, *, coco_tokenizer: str = "ptb", **_: Any) -> tuple[dict, list[str]]:
    out = coco_caption_metrics(preds, _refs(recs), tokenizer=coco_tokenizer)
    return {"coco": out}, [f"coco: corpus level, tokenizer {coco_tokenizer}, METEOR from the METEOR-1.5 jar"]


@protocol((), "corpus level", corpus=_coco)
def coco() -> None:
    """COCO-caption protocol (pycocoevalcap's COCOEvalCap, as CT-CHAT / CT-RATE papers): PTB
    tokenizer, BLEU-1..4, METEOR-1.5 jar, ROUGE-L, CIDEr-D, corpus level (no per-sample means)."""


def _ctrate_ce(preds: list[str], recs: Rows, *, ctrate_classifier: str | None = None, device: str = "cpu",
               **_: Any) -> tuple[dict, list[str]]:
    if ctrate_classifier:
        extract = lambda texts: classifier_labels(ctrate_classifier, texts, device)  # noqa: E731
        used = f"classifier {ctrate_classifier}"
    else:
        extract = lambda texts: [ct_rate_findings(t) for t in texts]  # noqa: E731
        used = ("keywords (eval/findings.py rules, an approximation, not CT-RATE's classifier: pass "
                "ctrate_classifier=<folder> for numbers comparable to the papers)")
    if all(set(CT_RATE_LABELS) <= set(r.get("labels") or {}) for r in recs):
        ref_labels, ref_from = [r["labels"] for r in recs], "the dataset's labels"
    else:
        ref_labels, ref_from = extract(_refs(recs)), "the reference reports, same extractor"
    out = findings_prf(extract(preds), ref_labels, labels=list(CT_RATE_LABELS))
    return {"extractor": used, "reference_labels": ref_from, "clinical_efficacy": out}, [
        f"ctrate_ce: labels read by {used}; references from {ref_from}"]


@protocol((), "micro and macro over the 18 labels", corpus=_ctrate_ce)
def ctrate_ce() -> None:
    """CT-RATE clinical efficacy: the 18 CT-RATE abnormality labels read from each generated report
    by a local text classifier (option ctrate_classifier=<folder>, id2label naming the labels: CT-CLIP's
    RadBERT classifier, a label is 1 at sigmoid >= 0.5; eval/metrics/ctrate_classifier.py) or, without
    one, by keyword rules (eval/findings.py); precision, recall, F1 micro and macro over labels
    (sklearn, as CT-CLIP's f1_score) against the dataset's labels (or the references', same
    extractor). The output says which extractor was used."""
