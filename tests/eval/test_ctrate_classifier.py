"""`ctrate_ce` with a local CT-RATE label classifier equals CT-CLIP's text classifier run by hand
(RadBERT: RoBERTa + Linear on the pooler output, expit >= 0.5) and sklearn's F1 averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from roberta_helpers import tiny_roberta

from medvlm3d.data.errors import ConfigError
from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS
from medvlm3d.eval.metrics.ctrate_classifier import classifier_labels, ct_clip_state_to_hf
from medvlm3d.eval.protocols import PROTOCOLS

REPORTS = ["Emphysema and pleural effusion are seen.", "No pleural effusion. Heart size normal.",
           "Atelectasis at the bases, small lung nodule.", "Coronary artery calcification; hiatal hernia.",
           "Consolidation in the right lower lobe with bronchiectasis.", "Normal study."]
PREDS = ["Emphysema is seen.", "Pleural effusion. Heart size increased.", "Lung nodule.", "Hiatal hernia.",
         "Consolidation right.", "Normal study, no effusion."]
EXTRA = ["Tree in bud", "Thymic remnant"]  # CT-CLIP's classifier has 20 outputs; ctrate_ce reads the 18


class RadBertClassifier(torch.nn.Module):
    """CT-CLIP text_classifier/classifier.py's architecture: RoBERTa, Linear on pooler_output."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from transformers import RobertaModel

        self.model = RobertaModel(cfg)  # with its pooler (dense + tanh on the first token)
        self.classifier = torch.nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, attn_mask):
        return self.classifier(self.model(input_ids=input_ids, attention_mask=attn_mask).pooler_output)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(folder, reference module, tokenizer): a random CT-CLIP classifier, its weights mapped into a
    RobertaForSequenceClassification folder; label 'Lung nodule' gets logit exactly 0 (expit 0.5)."""
    from transformers import RobertaForSequenceClassification

    path = tmp_path_factory.mktemp("ctrate-clf")
    names = list(reversed(CT_RATE_LABELS)) + EXTRA  # id2label order differs from CT_RATE_LABELS
    tok, cfg = tiny_roberta(path, REPORTS + PREDS, head=names)
    torch.manual_seed(1)
    ref = RadBertClassifier(cfg).eval()
    enc = tok(REPORTS + PREDS, padding=True, return_tensors="pt")
    with torch.no_grad():  # centre each logit over the texts, then spread it: labels differ between texts
        pooled = ref.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        ref.classifier.weight.mul_(1000.0)
        ref.classifier.bias.copy_(-(pooled.mean(0) @ ref.classifier.weight.T))
        k = names.index("Lung nodule")
        ref.classifier.weight[k].zero_()
        ref.classifier.bias[k] = 0.0
    hf = RobertaForSequenceClassification(cfg).eval()
    hf.load_state_dict(ct_clip_state_to_hf(ref.state_dict()), strict=True)
    hf.save_pretrained(str(path))
    return path, ref, tok, names


def _by_hand(ref, tok, names, texts):
    """CT-CLIP's infer(): padding to max_length, expit(logits) >= 0.5, columns named by label."""
    enc = tok(texts, max_length=64, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.sigmoid(ref(enc["input_ids"], enc["attention_mask"])).numpy()
    labels = (probs >= 0.5).astype(int)
    return np.stack([labels[:, names.index(n)] for n in CT_RATE_LABELS], axis=1)


def test_labels_equal_the_reference_classifier_by_hand(classifier):
    path, ref, tok, names = classifier
    ours = classifier_labels(path, REPORTS + PREDS, batch_size=4)
    got = np.array([[d[n] for n in CT_RATE_LABELS] for d in ours])
    want = _by_hand(ref, tok, names, REPORTS + PREDS)
    assert np.array_equal(got, want)
    assert 0 < got.sum() < got.size and len({tuple(r) for r in got}) > 1  # labels vary: the test can fail
    assert got[:, CT_RATE_LABELS.index("Lung nodule")].tolist() == [1] * len(got)  # expit(0) = 0.5 counts (>=)


def test_ctrate_ce_equals_reference_f1_precision_recall(classifier):
    from sklearn.metrics import f1_score, precision_score, recall_score

    path, ref, tok, names = classifier
    recs = [{"id": str(i), "answer": r} for i, r in enumerate(REPORTS)]
    summary, _ = PROTOCOLS.get("ctrate_ce").score(PREDS, recs, ctrate_classifier=str(path))
    m = summary["metrics"]
    assert m["extractor"] == f"classifier {path}" and m["reference_labels"].startswith("the reference reports")
    y_pred, y_true = _by_hand(ref, tok, names, PREDS), _by_hand(ref, tok, names, REPORTS)
    ce = m["clinical_efficacy"]
    for avg in ("micro", "macro"):
        assert ce[f"f1_{avg}"] == pytest.approx(f1_score(y_true, y_pred, average=avg, zero_division=0), abs=1e-12)
        assert ce[f"precision_{avg}"] == pytest.approx(precision_score(y_true, y_pred, average=avg, zero_division=0))
        assert ce[f"recall_{avg}"] == pytest.approx(recall_score(y_true, y_pred, average=avg, zero_division=0))
    assert 0.0 < ce["f1_micro"] < 1.0
    # with the dataset's 18 labels, the references are those labels (not the classifier's)
    gold = [{n: int(j % 2) for j, n in enumerate(CT_RATE_LABELS)} for _ in REPORTS]
    summary, _ = PROTOCOLS.get("ctrate_ce").score(PREDS, [{**r, "labels": g} for r, g in zip(recs, gold)],
                                                  ctrate_classifier=str(path))
    want = f1_score(np.array([[g[n] for n in CT_RATE_LABELS] for g in gold]), y_pred, average="micro", zero_division=0)
    assert summary["metrics"]["clinical_efficacy"]["f1_micro"] == pytest.approx(want)
    assert summary["metrics"]["reference_labels"] == "the dataset's labels"


def test_without_a_classifier_the_note_says_keywords_and_bad_folders_name_the_key(classifier, tmp_path):
    summary, _ = PROTOCOLS.get("ctrate_ce").score(PREDS[:1], [{"id": "x", "answer": REPORTS[0]}])
    assert "not CT-RATE's classifier" in summary["metrics"]["extractor"] and "ctrate_classifier" in summary["notes"][0]
    with pytest.raises(ConfigError, match="ctrate_classifier .*config.json"):
        classifier_labels(tmp_path / "nowhere", ["x"])
    path, _, tok, _ = classifier
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig.from_pretrained(str(path))
    cfg.id2label = {i: f"label{i}" for i in range(cfg.num_labels)}
    other = tmp_path / "other"
    RobertaForSequenceClassification(cfg).save_pretrained(str(other))
    tok.save_pretrained(str(other))
    with pytest.raises(ConfigError, match=r"id2label lacks CT-RATE labels \['Medical material'"):
        classifier_labels(other, ["x"])
    with pytest.raises(ConfigError, match="unexpected parameter 'head.w'"):
        ct_clip_state_to_hf({"head.w": torch.zeros(1)})
