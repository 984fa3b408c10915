"""`medvlm3d score` (eval/score.py + medvlm3d/cli/score.py) on files written by hand."""

from __future__ import annotations

import json

import pytest

from medvlm3d.cli import main
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.eval.score import score_files

REFS = [
    {"id": "s1", "image": "s1.nii.gz", "task": "vqa", "question": "Which organ?", "answer": "B. liver",
     "choices": ["spleen", "liver", "kidney"], "answer_choice": "B", "question_type": "Organ"},
    {"id": "s2", "image": "s2.nii.gz", "task": "vqa", "question": "Which plane?", "answer": "A. axial",
     "choices": ["axial", "coronal"], "answer_choice": "A", "question_type": "Plane"},
    {"id": "s3", "image": "s3.nii.gz", "task": "vqa", "question": "Which organ?", "answer": "C. kidney",
     "choices": ["spleen", "liver", "kidney"], "answer_choice": "C", "question_type": "Organ"},
    {"id": "s4", "image": "s4.nii.gz", "task": "vqa", "question": "Which plane?", "answer": "B. coronal",
     "choices": ["axial", "coronal"], "answer_choice": "B", "question_type": "Plane"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    refs = _write(tmp_path / "refs.jsonl", REFS)
    # s1 right, s2 wrong ("A" without the dot), s3 right, s4 wrong
    preds = _write(tmp_path / "preds.jsonl", [{"id": "s4", "prediction": "A. axial"}, {"id": "s1", "prediction": "B. liver"},
                                              {"id": "s2", "prediction": "A"}, {"id": "s3", "prediction": "C. kidney"}])
    return preds, refs


def test_closed_vqa_exact_values_and_files(files, tmp_path):
    preds, refs = files
    out = tmp_path / "scores"
    summary = score_files("m3d_vqa_closed", preds, refs, out=out)
    m = summary["metrics"]
    assert m["closed_vqa_accuracy"] == 0.5 and m["by_type"]["Organ"]["closed_vqa_accuracy"] == 1.0
    assert m["by_type"]["Plane"]["closed_vqa_accuracy"] == 0.0 and summary["n"] == 4
    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"]["closed_vqa_accuracy"] == 0.5 and written["protocol"] == "m3d_vqa_closed"
    rows = [json.loads(line) for line in (out / "per_sample.jsonl").read_text().splitlines()]
    assert {r["id"]: r["closed_vqa_accuracy"] for r in rows} == {"s1": 1.0, "s2": 0.0, "s3": 1.0, "s4": 0.0}


def test_text_protocol_identical_strings_score_one(tmp_path):
    refs = _write(tmp_path / "r.jsonl", [{**r, "task": "report", "answer": t} for r, t in
                                         zip(REFS[:2], ["No pleural effusion.", "The liver is normal."])])
    preds = _write(tmp_path / "p.jsonl", [{"id": "s1", "prediction": "No pleural effusion."},
                                          {"id": "s2", "prediction": "The liver is normal."}])
    m = score_files("m3d_cap", preds, refs)["metrics"]
    assert m["bleu1"] == pytest.approx(1.0) and m["rouge1"] == pytest.approx(1.0) and m["meteor"] > 0.9
    assert m["bertscore"].startswith("skipped")


def test_missing_ids_error_unless_allowed(files, tmp_path):
    preds, refs = files
    few = _write(tmp_path / "few.jsonl", [{"id": "s1", "prediction": "B. liver"}, {"id": "zz", "prediction": "x"}])
    with pytest.raises(DataError, match=r"3 reference id\(s\) have no prediction.*'s2'.*1 prediction id\(s\).*'zz'"):
        score_files("m3d_vqa_closed", few, refs)
    summary = score_files("m3d_vqa_closed", few, refs, allow_missing=True)
    assert summary["n"] == 1 and summary["metrics"]["closed_vqa_accuracy"] == 1.0
    assert summary["missing"]["without_prediction"] == 3 and summary["missing"]["without_reference"] == 1
    with pytest.raises(ConfigError, match="unknown protocol"):
        score_files("m3d_nope", preds, refs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "s1"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        score_files("m3d_vqa_closed", bad, refs)


def test_cli_verb_prints_the_table(files, tmp_path, capsys):
    preds, refs = files
    assert main(["score", "--protocol", "m3d_vqa_closed", "--pred", str(preds), "--ref", str(refs),
                 "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "m3d_vqa_closed: 4 samples" in text and "closed_vqa_accuracy" in text and "0.5000" in text
    assert (tmp_path / "o" / "per_sample.jsonl").is_file()


def test_cli_verb_missing_ids_exit_2(files, tmp_path, capsys):
    preds, refs = files
    few = tmp_path / "few.jsonl"
    few.write_text(preds.read_text().splitlines()[0] + "\n")
    assert main(["score", "--protocol", "m3d_vqa_closed", "--pred", str(few), "--ref", str(refs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
