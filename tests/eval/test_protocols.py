"""Protocol registry: names, per-sample rows, per-type / macro aggregation, the choice rules."""

from __future__ import annotations

import pytest

from medvlm3d.data.errors import DataError
from medvlm3d.eval.metrics import BERTSCORE_SKIP, bleu1_scores, meteor_nltk
from medvlm3d.eval.protocols import PROTOCOLS


def test_the_protocols_are_registered_with_their_reference():
    assert set(PROTOCOLS.names()) == {"m3d_cap", "m3d_vqa_closed", "m3d_vqa_open", "med2e3_ctrate", "coco", "ctrate_ce"}
    assert "evaluate" in PROTOCOLS.get("m3d_cap").reference and "(X)" in PROTOCOLS.get("med2e3_ctrate").reference


def test_m3d_closed_by_type_and_macro():
    recs = [{"id": "a", "answer": "B. liver", "answer_choice": "B", "question_type": "Organ"},
            {"id": "b", "answer": "A. axial", "answer_choice": "A", "question_type": "Plane"},
            {"id": "c", "answer": "C. kidney", "question_type": "Organ"}]
    summary, rows = PROTOCOLS.get("m3d_vqa_closed").score(["B. Liver", "A", "It is C. kidney"], recs)
    assert [r["closed_vqa_accuracy"] for r in rows] == [1.0, 0.0, 1.0] and rows[2]["id"] == "c"
    m = summary["metrics"]
    assert m["closed_vqa_accuracy"] == pytest.approx(2 / 3)
    assert m["by_type"]["Organ"] == {"closed_vqa_accuracy": 1.0, "n": 2} and m["macro"]["closed_vqa_accuracy"] == 0.5
    with pytest.raises(DataError, match="answer_choice"):
        PROTOCOLS.get("m3d_vqa_closed").score(["B."], [{"id": "x", "answer": "liver"}])


def test_m3d_cap_per_sample_and_bertscore_note():
    preds, refs = ["a small lesion in the liver", "no effusion"], ["small liver lesion", "no pleural effusion"]
    summary, rows = PROTOCOLS.get("m3d_cap").score(preds, [{"id": i, "answer": r} for i, r in enumerate(refs)])
    assert [r["meteor"] for r in rows] == pytest.approx(meteor_nltk(preds, refs))
    assert summary["metrics"]["bleu1"] == pytest.approx(sum(bleu1_scores(preds, refs)) / 2)
    assert summary["metrics"]["bertscore"] == BERTSCORE_SKIP and any("bertscore" in n for n in summary["notes"])
    assert "bertscore" not in rows[0]


def test_med2e3_choice_records_by_paren_letter_text_records_by_text_metrics():
    recs = [{"id": "q1", "answer": "(B) liver", "answer_choice": "B", "choices": ["spleen", "liver"]},
            {"id": "q2", "answer": "(A) spleen", "choices": ["spleen", "liver"]},
            {"id": "r1", "answer": "No pleural effusion."}]
    summary, rows = PROTOCOLS.get("med2e3_ctrate").score(["(B) liver", "B. spleen (B)", "No pleural effusion."], recs)
    assert rows[0] == {"id": "q1", "choice_paren": 1.0} and rows[1] == {"id": "q2", "choice_paren": 0.0}
    assert rows[2]["rouge_l"] == pytest.approx(1.0) and rows[2]["meteor"] > 0.9
    m = summary["metrics"]
    assert m["choice_paren"] == 0.5 and m["n_choice"] == 2 and m["n_text"] == 1 and m["bleu1"] == pytest.approx(1.0)


def test_ctrate_ce_says_which_extractor():
    summary, _ = PROTOCOLS.get("ctrate_ce").score(["Emphysema. No effusion."],
                                                   [{"id": "x", "answer": "Emphysema and pleural effusion."}])
    assert summary["metrics"]["extractor"].startswith("keywords")
    assert summary["metrics"]["clinical_efficacy"]["n"] == 1 and summary["notes"]
