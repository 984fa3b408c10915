"""Metrics: hand-checked values on tiny strings, and agreement with the packages' own results."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest

from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS
from medvlm3d.data.errors import DataError
from medvlm3d.data.synthetic import make_study
from medvlm3d.eval import metrics
from medvlm3d.eval.findings import ct_rate_findings, is_negated, phantom_findings, split_clauses
from medvlm3d.eval.metrics import (
    BERTSCORE_SKIPPED, classification_metrics, clinical_efficacy, closed_vqa_accuracy, coco_caption_metrics,
    findings_prf, m3d_text_metrics, meteor_scores, open_vqa_metrics, simple_tokenize,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

# ------------------------------------------------------------------------------------------
# M3D text metrics (BLEU-1, ROUGE-1) without METEOR


def test_bleu1_hand_values_and_sacrebleu():
    from pycocoevalcap.bleu.bleu import Bleu
    from sacrebleu.metrics import BLEU

    preds, refs = ["a b c d", "a b"], ["a b x y", "a b x y"]
    out = m3d_text_metrics(preds, refs, meteor=False)
    # 2 of 4 unigrams match, brevity 1 -> 0.5; "a b": precision 1, brevity exp(1 - 4/2) = e^-1
    assert out["bleu1"] == pytest.approx((0.5 + math.exp(-1)) / 2, abs=1e-9)
    assert out["n"] == 2 and "meteor" not in out
    direct = BLEU(max_ngram_order=1, smooth_method="none")
    assert out["bleu1"] == pytest.approx(np.mean([direct.sentence_score(p, [r]).score / 100 for p, r in zip(preds, refs)]))
    # pycocoevalcap's Bleu on the single pair gives the same 0.5 (up to its 1e-9 smoothing)
    coco = Bleu(1).compute_score({0: ["a b x y"]}, {0: ["a b c d"]}, verbose=0)[0][0]
    assert m3d_text_metrics(["a b c d"], ["a b x y"], meteor=False)["bleu1"] == pytest.approx(coco, abs=1e-6)


def test_bleu1_clips_counts_and_is_case_sensitive():
    # "the the the" vs "the cat": clipped count 1 of 3 -> 1/3 (BP 1 since 3 > 2)
    assert m3d_text_metrics(["the the the"], ["the cat"], meteor=False)["bleu1"] == pytest.approx(1 / 3)
    assert m3d_text_metrics(["The cat"], ["the cat"], meteor=False)["bleu1"] == pytest.approx(0.5)
    assert m3d_text_metrics([""], ["the cat"], meteor=False)["bleu1"] == 0.0


def test_rouge1_hand_value_and_rouge_score():
    from rouge_score import rouge_scorer

    out = m3d_text_metrics(["the cat sat"], ["the cat ran away"], meteor=False)
    assert out["rouge1"] == pytest.approx(4 / 7)  # P 2/3, R 2/4 -> F 4/7
    direct = rouge_scorer.RougeScorer(["rouge1"]).score("the cat ran away", "the cat sat")["rouge1"].fmeasure
    assert out["rouge1"] == pytest.approx(direct)


def test_bertscore_skipped_message(caplog):
    with caplog.at_level(logging.WARNING, logger="medvlm3d.eval.metrics"):
        out = m3d_text_metrics(["a"], ["a"], meteor=False)
    assert "bertscore_f1" not in out
    assert BERTSCORE_SKIPPED in caplog.text


def test_text_metrics_bad_input():
    with pytest.raises(DataError, match="differ in length"):
        m3d_text_metrics(["a", "b"], ["a"], meteor=False)
    with pytest.raises(DataError, match=r"predictions\[1\]"):
        m3d_text_metrics(["a", None], ["a", "b"], meteor=False)
    with pytest.raises(DataError, match="at least one"):
        m3d_text_metrics([], [], meteor=False)
    with pytest.raises(DataError, match="list of strings"):
        m3d_text_metrics("a b", "a b", meteor=False)


def test_java_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="java"):
        metrics.METRICS.get("meteor_1.5")(["a"], ["a"], [])
    # M3D's METEOR is nltk's (no java)
    assert m3d_text_metrics(["a cat"], ["a cat"])["meteor"] == pytest.approx(1.0 - 0.5 * (1 / 2) ** 3)
    # COCO without java: METEOR is an error, the rest falls back to simple tokenisation
    with pytest.raises(RuntimeError, match="java"):
        coco_caption_metrics(["a b"], ["a b"])
    assert coco_caption_metrics(["a b c d"], ["a b x y"], meteor=False)["bleu1"] == pytest.approx(0.5, abs=1e-6)


# ------------------------------------------------------------------------------------------
# VQA


def test_closed_vqa_letter_matching_edge_cases():
    preds = ["B. Liver", "B", "AB.", "AB.", "b. liver", "The answer is C. Kidney", "D.Spleen"]
    letters = ["B", "B", "B", "A", "B", "C", "D"]
    out = closed_vqa_accuracy(preds, letters)
    assert out["correct"] == 4  # "B. Liver", "AB." for B, "... C. Kidney", "D.Spleen"
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["by_type"] == {} and out["macro_accuracy"] == out["accuracy"]


def test_closed_vqa_per_type_and_macro():
    out = closed_vqa_accuracy(["A. x", "C. y", "B. z"], ["A", "B", "B"], ["Organ", "Organ", "Plane"])
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["by_type"]["Organ"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert out["by_type"]["Plane"]["accuracy"] == 1.0
    assert out["macro_accuracy"] == pytest.approx(0.75)


def test_closed_vqa_bad_input():
    with pytest.raises(DataError, match="one capital letter"):
        closed_vqa_accuracy(["A."], ["AB"])
    with pytest.raises(DataError, match="equal in length"):
        closed_vqa_accuracy(["A.", "B."], ["A"])
    with pytest.raises(DataError, match="question_types"):
        closed_vqa_accuracy(["A."], ["A"], ["Organ", "Plane"])


def test_open_vqa_per_type_hand_values():
    out = open_vqa_metrics(["liver", "left kidney", "axial"], ["liver", "right kidney", "coronal"],
                           ["Organ", "Organ", "Plane"], meteor=False)
    # per sample BLEU-1 = ROUGE-1 = 1, 1/2, 0
    assert out["bleu1"] == pytest.approx(0.5) and out["rouge1"] == pytest.approx(0.5) and out["n"] == 3
    assert out["by_type"]["Organ"]["bleu1"] == pytest.approx(0.75) and out["by_type"]["Organ"]["n"] == 2
    assert out["by_type"]["Plane"]["rouge1"] == 0.0
    assert out["macro"] == pytest.approx({"bleu1": 0.375, "rouge1": 0.375})
    no_types = open_vqa_metrics(["liver"], ["liver"], meteor=False)
    assert no_types["by_type"] == {} and no_types["macro"] == pytest.approx({"bleu1": 1.0, "rouge1": 1.0})
    with pytest.raises(ValueError, match="unknown options"):
        open_vqa_metrics(["a"], ["a"], meteor=False, stemmer=True)


# ------------------------------------------------------------------------------------------
# METEOR and the COCO protocol (java; one jar start for the whole module)


@needs_java
@pytest.mark.slow
def test_meteor_per_sample_matches_the_jar():
    preds, refs = ["a b c d", "a cat sat on a mat", "liver"], ["a b c d", "the cat sat on the mat", "kidney"]
    corpus, per_sample = meteor_scores(preds, refs)
    direct = metrics._meteor_scorer().compute_score({i: [r] for i, r in enumerate(refs)},
                                                     {i: [p] for i, p in enumerate(preds)})
    assert per_sample == pytest.approx(direct[1]) and corpus == pytest.approx(direct[0])
    assert per_sample[0] == pytest.approx(1.0) and per_sample[2] == 0.0  # identical / no match
    assert 0.0 < per_sample[1] < 1.0
    assert metrics.METRICS.get("meteor_1.5")(preds, refs, [])["meteor_1.5"] == pytest.approx(np.mean(per_sample))
    # line breaks and METEOR's "|||" separator are cleaned, not sent to the jar (which would hang)
    assert meteor_scores(["a cat\nsat ||| on a mat"], ["the cat sat on the mat"])[1] == pytest.approx(
        meteor_scores(["a cat sat on a mat"], ["the cat sat on the mat"])[1])


@needs_java
@pytest.mark.slow
def test_coco_metrics_hand_values_and_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    one = coco_caption_metrics(["a b c d"], ["a b x y"], tokenizer="simple", meteor=False)
    assert one["bleu1"] == pytest.approx(0.5, abs=1e-6)
    assert one["bleu2"] == pytest.approx(math.sqrt(0.5 * 1 / 3), abs=1e-6)  # bigram "a b" of 3
    assert one["rouge_l"] == pytest.approx(0.5)  # LCS 2: P = R = 1/2
    assert one["cider"] == 0.0  # a single sample: every n-gram has idf log(1/1) = 0

    preds = ["The cat sat on the mat.", "No pleural effusion, (small) nodule.", "Heart size is normal"]
    refs = ["A cat sat on the mat.", ["There is no pleural effusion.", "No effusion."], "The heart size is normal."]
    out = coco_caption_metrics(preds, refs)
    gts = metrics._tokenize({i: [r] if isinstance(r, str) else r for i, r in enumerate(refs)}, "ptb")
    res = metrics._tokenize({i: [p] for i, p in enumerate(preds)}, "ptb")
    assert res[0] == ["the cat sat on the mat"]
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [out[f"bleu{i}"] for i in range(1, 5)] == pytest.approx(bleu)
    assert out["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert out["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert out["meteor"] == pytest.approx(metrics._meteor_scorer().compute_score(gts, res)[0])
    assert out["n"] == 3
    # the simple tokeniser agrees with PTB on plain text
    plain = ["the cat sat on the mat.", "no pleural effusion, 3.5 cm nodule!"]
    assert [simple_tokenize(t) for t in plain] == [v[0] for v in metrics._tokenize(dict(enumerate([[t] for t in plain])), "ptb").values()]


def test_coco_bad_arguments():
    with pytest.raises(ValueError, match="tokenizer"):
        coco_caption_metrics(["a"], ["a"], tokenizer="nltk", meteor=False)
    with pytest.raises(DataError, match="equal in length"):
        coco_caption_metrics(["a", "b"], ["a"], tokenizer="simple", meteor=False)


# ------------------------------------------------------------------------------------------
# BERTScore with a tiny local model


@pytest.mark.slow
# BERTScore: tests/eval/test_bertscore.py (equality with bert_score.score on a tiny local RoBERTa)


# ------------------------------------------------------------------------------------------
# clinical efficacy


def test_findings_prf_hand_values():
    ref = [{"a": 1, "b": 0}, {"a": 1, "b": 1}]
    pred = [{"a": 1, "b": 1}, {"a": 0, "b": 1}]
    out = findings_prf(pred, ref)
    # a: TP 1, FN 1 -> P 1, R 1/2; b: TP 1, FP 1 -> P 1/2, R 1; micro TP 2, FP 1, FN 1
    assert out["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert out["precision_micro"] == pytest.approx(2 / 3) and out["recall_micro"] == pytest.approx(2 / 3)
    assert out["precision_macro"] == pytest.approx(0.75) and out["f1_macro"] == pytest.approx(2 / 3)
    assert out["n"] == 2
    with pytest.raises(DataError, match="'b' as 0/1"):
        findings_prf([{"a": 1, "b": 2}], [{"a": 1, "b": 0}])
    with pytest.raises(DataError, match="'b' as 0/1"):
        findings_prf([{"a": 1}], [{"a": 1, "b": 0}])
    with pytest.raises(DataError, match="equal in length"):
        findings_prf([], [])


def test_phantom_findings_template_and_studies():
    two = ("Findings: Two focal lesions. A small hyperdense lesion in the upper left (slices 3-9). "
           "A large hypodense lesion in the lower left (slices 1-5). The liver, spleen and kidneys are otherwise normal.")
    assert phantom_findings(two) == {"lesion": 1, "hyperdense": 1, "hypodense": 1, "left": 1, "right": 0}
    assert phantom_findings("Findings: No focal lesion. The liver, spleen and kidneys are normal.") == dict.fromkeys(
        ("lesion", "hyperdense", "hypodense", "left", "right"), 0)
    for seed, n in ((3, 0), (4, 1), (5, 2)):
        study = make_study(seed, n_lesions=n)
        found = phantom_findings(study.report)
        assert found["lesion"] == int(n > 0)
        for key in ("hyperdense", "hypodense"):
            assert found[key] == int(any(l.kind == key for l in study.lesions))
        for key in ("left", "right"):
            assert found[key] == int(any(l.side == key for l in study.lesions))
    out = clinical_efficacy([two, "Findings: No focal lesion."], [two, two], extractor="phantom")
    assert out["recall_micro"] == pytest.approx(0.5) and out["precision_micro"] == 1.0
    with pytest.raises(ValueError, match="extractor"):
        clinical_efficacy(["a"], ["a"], extractor="chexpert")


@pytest.mark.parametrize("text", [
    "No pleural effusion.", "Pleural effusion was not detected.", "Pleural effusion-thickening was not observed.",
    "There is no evidence of pleural effusion.", "Without pleural effusion.", "Absence of pleural effusion.",
    "Pleural effusion not seen.", "Negative for pleural effusion.", "The pleural spaces are free of effusion and "
    "pleural effusion is absent.", "Neither pericardial nor pleural effusion.",
])
def test_ct_rate_negations(text):
    assert ct_rate_findings(text)["Pleural effusion"] == 0


def test_ct_rate_positive_clauses_and_scope():
    assert ct_rate_findings("Bilateral pleural effusion is present.")["Pleural effusion"] == 1
    mixed = ct_rate_findings("No pericardial effusion, but bilateral pleural effusion.")
    assert mixed["Pleural effusion"] == 1 and mixed["Pericardial effusion"] == 0
    mixed = ct_rate_findings("Bilateral pleural effusion is observed and no pericardial effusion")
    assert mixed["Pleural effusion"] == 1 and mixed["Pericardial effusion"] == 0
    assert ct_rate_findings("Consolidation cannot be excluded in the left base.")["Consolidation"] == 1  # uncertain
    assert ct_rate_findings("A nodule in the right thyroid lobe.")["Lung nodule"] == 0
    coronary = ct_rate_findings("Calcification in the coronary arteries.")
    assert coronary["Coronary artery wall calcification"] == 1 and coronary["Arterial wall calcification"] == 0
    both = ct_rate_findings("Calcific atheroma plaques in the aorta and coronary arteries.")
    assert both["Coronary artery wall calcification"] == 1 and both["Arterial wall calcification"] == 1
    assert split_clauses("A. B; c but d") == ["a.", "b", "c", "but d"]
    assert is_negated("was not detected") and not is_negated("cannot be excluded")


def test_ct_rate_normal_and_abnormal_reports():
    normal = (
        "Trachea and both main bronchi are open. Mediastinal main vascular structures, heart contour, heart size are "
        "normal. Pericardial effusion-thickening was not observed. No enlarged lymph nodes in pathological size and "
        "appearance were detected in mediastinal and bilateral hilar levels. When examined in the lung parenchyma "
        "window; aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected. "
        "Pleural effusion-thickening was not detected. Bone structures in the study area are natural.")
    out = ct_rate_findings(normal)
    assert list(out) == list(CT_RATE_LABELS) and sum(out.values()) == 0
    abnormal = (
        "Heart size increased. Calcific atheroma plaques are observed in the aorta and coronary arteries. Minimal "
        "pericardial effusion. Mediastinal lymph nodes in pathological size were observed. Emphysematous changes in "
        "both lungs. Subsegmental atelectasis in the lower lobes. A 5 mm nodule in the right upper lobe. Ground-glass "
        "opacities and interlobular septal thickening. Fibrotic sequelae in the left lung. Bilateral pleural effusion. "
        "Mosaic attenuation pattern. Peribronchial thickening and bronchiectasis. Hiatal hernia. Pacemaker catheter "
        "in the right atrium. Consolidation in the left lower lobe.")
    assert ct_rate_findings(abnormal) == dict.fromkeys(CT_RATE_LABELS, 1)
    with pytest.raises(DataError, match="report"):
        ct_rate_findings(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# classification


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_hand_values_and_sklearn():
    from sklearn.metrics import roc_auc_score

    out = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], scores=[0.1, 0.9, 0.2, 0.3])
    assert out["accuracy"] == 0.75 and out["balanced_accuracy"] == 0.75  # recalls 1 and 1/2
    assert out["macro_auroc"] == pytest.approx(0.75)  # pairs: .9>.1, .9>.3, .2>.1, .2<.3
    assert "macro_auroc" not in classification_metrics([0, 1], [0, 1])
    y = ["a", "b", "c", "a", "c"]
    s = np.array([[.6, .3, .1], [.2, .5, .3], [.3, .3, .4], [.5, .1, .4], [.2, .2, .6]])
    multi = classification_metrics(y, ["a", "b", "c", "c", "c"], scores=s)
    assert multi["macro_auroc"] == pytest.approx(roc_auc_score(y, s, multi_class="ovr", average="macro"))
    assert multi["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert classification_metrics([1, 1], [1, 0], scores=[0.3, 0.2], labels=[0, 1])["macro_auroc"] is None
    with pytest.raises(DataError, match="scores"):
        classification_metrics([0, 1], [0, 1], scores=[[0.1, 0.2, 0.7]] * 2)
    with pytest.raises(DataError, match="equal in length"):
        classification_metrics([0, 1], [0])


def test_findings_prf_single_label_scores_the_positive_class() -> None:
    """6 'lesion' predictions against 2 true ones: precision 2/6, recall 1, support 2."""
    from medvlm3d.eval.metrics import findings_prf

    pred = [{"lesion": 1}] * 6 + [{"lesion": 0}] * 2
    ref = [{"lesion": 1}] * 2 + [{"lesion": 0}] * 6
    out = findings_prf(pred, ref)
    assert out["per_label"]["lesion"]["support"] == 2
    assert out["per_label"]["lesion"]["precision"] == pytest.approx(2 / 6)
    assert out["per_label"]["lesion"]["recall"] == pytest.approx(1.0)
    assert out["f1_micro"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
