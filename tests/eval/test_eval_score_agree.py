"""`medvlm3d eval` scores through `medvlm3d score`'s code: on the predictions.jsonl an eval run
writes, `score_files` (and the `score` verb) give exactly eval's protocol numbers and rows."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from medvlm3d import build_model
from medvlm3d.cli import main
from medvlm3d.eval.runner import evaluate, metrics_table
from medvlm3d.eval.score import score_files
from medvlm3d.model.generation import Generation

TEXTS = {"report": ["Findings: Two focal lesions. A small hyperdense lesion in the upper left.", "No lesion.",
                    "Findings: one large hypodense lesion in the lower right.", "Findings: a lesion."],
         "vqa_closed": ["A. small", "B. 2", "It is C.", "D", "B. hyperdense", "A. 1"]}


@pytest.fixture(scope="module")
def model(tiny_cfg: Any) -> Any:
    torch.manual_seed(0)
    return build_model(tiny_cfg("eval.max_new_tokens=2"))


def _fake_generation(monkeypatch, texts: list[str]) -> None:
    """Generation returns fixed, varied texts (an untrained model's output scores 0 everywhere)."""
    cycle = itertools.cycle(texts)

    def generate_batch(model: Any, batch: Any, **_: Any) -> Generation:
        n = int(batch.input_ids.shape[0])
        return Generation([next(cycle) for _ in range(n)], [None] * n, [torch.arange(16)] * n,
                          [torch.zeros(16)] * n, [None] * n)

    monkeypatch.setattr("medvlm3d.model.generation.generate_batch", generate_batch)


@pytest.mark.parametrize("task,protocol", [("report", "m3d_cap"), ("vqa_closed", "m3d_vqa_closed"),
                                           ("report", "med2e3_ctrate")])
def test_eval_and_score_agree_exactly(model: Any, phantom_records: list[dict], phantom_manifest: Path,
                                      tmp_path: Path, monkeypatch, task: str, protocol: str) -> None:
    _fake_generation(monkeypatch, TEXTS[task])
    res = evaluate(model, phantom_records, task, out_dir=tmp_path / "e", progress=False, meteor=False,
                   coco_tokenizer="simple", protocol="auto" if protocol.startswith("m3d") else protocol)
    ours = res["protocol"]
    assert ours["protocol"] == protocol and ours["n"] == res["n"]
    # the predictions file eval wrote, scored by `medvlm3d score`'s code against the whole manifest
    summary = score_files(protocol, tmp_path / "e" / "predictions.jsonl", phantom_manifest, out=tmp_path / "s",
                          allow_missing=True)
    assert summary["metrics"] == ours["metrics"] and summary["n"] == ours["n"]  # exact, not approximate
    assert summary["missing"]["without_reference"] == 0
    assert (tmp_path / "s" / "per_sample.jsonl").read_text() == (tmp_path / "e" / "per_sample.jsonl").read_text()
    values = [v for k, v in ours["metrics"].items() if isinstance(v, float)]
    assert values and any(0.0 < v < 1.0 for v in values)  # varied predictions: the agreement is not 0 == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"] == json.loads(json.dumps(ours))
    table = metrics_table(res)
    assert f"protocol {protocol}" in table and any(line.split()[0] == "meteor" for line in table.splitlines()[2:]
                                                    if line.strip()) == (task == "report")


def test_score_verb_on_eval_predictions_prints_eval_numbers(model: Any, phantom_records: list[dict],
                                                             phantom_manifest: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    _fake_generation(monkeypatch, TEXTS["vqa_closed"])
    res = evaluate(model, phantom_records, "vqa_closed", out_dir=tmp_path / "e", progress=False, limit=9)
    assert main(["score", "--protocol", "m3d_vqa_closed", "--pred", str(tmp_path / "e" / "predictions.jsonl"),
                 "--ref", str(phantom_manifest), "--allow-missing"]) == 0
    out = capsys.readouterr().out
    acc = res["protocol"]["metrics"]["closed_vqa_accuracy"]
    row = next(line for line in out.splitlines() if line.startswith("closed_vqa_accuracy"))
    assert row.split()[1] == f"{acc:.4f}" and "m3d_vqa_closed: 9 samples" in out
    assert evaluate(model, phantom_records, "vqa_closed", progress=False, limit=3, protocol=None)["protocol"] is None
