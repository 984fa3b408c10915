"""BERTScore equals `bert_score.score` (bert-score package) on a tiny random local RoBERTa."""

from __future__ import annotations

import json

import numpy as np
import pytest
from roberta_helpers import tiny_roberta

from medvlm3d.data.errors import ConfigError
from medvlm3d.eval.metrics import BERTSCORE_SKIP, METRICS, bertscore, bertscore_layer, m3d_text_metrics

TEXT = ["the liver is normal", "a small lesion in the left kidney", "no pleural effusion", "the cat sat on the mat",
        "hypodense mass in the right lobe", "heart size is normal"]
PREDS = ["the liver is normal", "a lesion in the left kidney", "small pleural effusion", "mass in the right lobe"]
REFS = ["the liver is normal", "small lesion, left kidney", "no pleural effusion", "hypodense mass right lobe"]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A random 3-layer RoBERTa with a byte-level BPE tokenizer trained here, saved to a folder."""
    path = tmp_path_factory.mktemp("tiny-roberta")
    tiny_roberta(path, TEXT)
    return path


def test_equal_to_bert_score_score_with_the_same_layer(roberta_dir):
    from bert_score import score

    for layer in (1, 2):
        ours = bertscore(PREDS, REFS, roberta_dir, layer=layer, batch_size=3)
        p, r, f = score(PREDS, REFS, model_type=str(roberta_dir), num_layers=layer, idf=False, batch_size=3)
        assert ours["precision"] == pytest.approx(p.tolist(), abs=1e-6)
        assert ours["recall"] == pytest.approx(r.tolist(), abs=1e-6)
        assert ours["f1"] == pytest.approx(f.tolist(), abs=1e-6)
        assert ours["f1"][0] == pytest.approx(1.0, abs=1e-5)  # identical strings
    assert bertscore(PREDS, REFS, roberta_dir, layer=1)["f1"] != pytest.approx(ours["f1"], abs=1e-4)  # layer matters


def test_registered_metric_and_m3d_use_it(roberta_dir):
    out = METRICS.get("bertscore")(PREDS, REFS, [], bertscore_model=str(roberta_dir), bertscore_layers=2)
    direct = bertscore(PREDS, REFS, roberta_dir, layer=2)
    assert out["bertscore"]["f1"] == pytest.approx(np.mean(direct["f1"]), abs=1e-6) and out["bertscore"]["layer"] == 2
    m3d = m3d_text_metrics(PREDS, REFS, meteor=False, bertscore_model=roberta_dir, bertscore_layer=2)
    assert m3d["bertscore_f1"] == pytest.approx(np.mean(direct["f1"]), abs=1e-6)


def test_no_folder_is_a_note_not_a_zero():
    assert METRICS.get("bertscore")(PREDS, REFS, []) == {"bertscore": BERTSCORE_SKIP}
    assert "eval.bertscore_model" in BERTSCORE_SKIP


def test_layer_from_bert_score_table_or_required(tmp_path, roberta_dir):
    named = tmp_path / "roberta-large"
    named.mkdir()
    assert bertscore_layer(named) == 17  # evaluate's lang="en" default
    other = tmp_path / "my-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_name_or_path": "roberta-large"}))
    assert bertscore_layer(other) == 17 and bertscore_layer(other, 5) == 5
    with pytest.raises(ConfigError, match="bertscore_layers"):
        bertscore_layer(roberta_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bertscore(["a"], ["a"], tmp_path / "missing", layer=1)
