"""Tests of medvlm3d.eval.runner: `evaluate` on phantoms, on an M3D-VQA fixture and on a CT-RATE
fixture (real layouts, tiny volumes), the TG-IS slice mass, the image-blind derangement, and the
`medvlm3d eval` verb. A tiny untrained 2e3 model (configs/tiny.yaml) is saved once per module."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medvlm3d import build_model, load_pretrained
from medvlm3d.cli import main
from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS, volume_path
from medvlm3d.data.dataset import slice_targets
from medvlm3d.data.errors import DataError
from medvlm3d.eval.runner import (blind_partners, evaluate, format_table, label_set, parse_choice,
                                  read_eval_records, report_extractor, task_records, true_slice_mass)
from medvlm3d.model.generation import Generation

FAST = dict(progress=False, meteor=False, coco_tokenizer="simple")
M3D_HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer", "Answer Choice"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Any) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval_ckpt") / "ckpt"
    build_model(tiny_cfg("eval.max_new_tokens=4")).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def model(ckpt: Path) -> Any:
    return load_pretrained(ckpt)


def _in_unit(values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, float):
            assert 0.0 <= v <= 1.0, (k, v)


def _read_outputs(out: Path, result: dict) -> list[dict]:
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == result["n"]
    for r in rows:
        assert {"id", "prompt", "prediction", "reference", "slice_scores", "question_type"} <= set(r)
        assert len(r["slice_scores"]) == 16 and sum(r["slice_scores"]) == pytest.approx(1.0, abs=1e-4)
    return rows


# ------------------------------------------------------------------------------------ phantoms


def test_report_on_phantoms(model: Any, phantom_records: list[dict], tmp_path: Path) -> None:
    res = evaluate(model, phantom_records, "report", out_dir=tmp_path, **FAST)
    rows = _read_outputs(tmp_path, res)
    reports = [r for r in phantom_records if r["task"] == "report"]
    assert res["n"] == len(reports) == 6 and [r["reference"] for r in rows] == [r["answer"] for r in reports]
    m, p = res["metrics"], res["protocol"]
    assert p["protocol"] == "m3d_cap" and {"bleu1", "rouge1", "meteor"} <= set(p["metrics"])
    assert p["metrics"]["bertscore"].startswith("skipped") and "m3d" not in m  # computed once, by the protocol
    assert {"bleu1", "bleu4", "rouge_l", "cider"} <= set(m["coco"])
    assert m["extractor"] == "phantom" and "f1_micro" in m["clinical_efficacy"]
    assert set(m["clinical_efficacy"]["per_label"]) == {"lesion", "hyperdense", "hypodense", "left", "right"}
    _in_unit({k: v for k, v in p["metrics"].items() if k != "bertscore"})
    _in_unit(m["clinical_efficacy"])
    mass = res["tgis_slice_mass"]
    assert mass["n"] == sum(1 for r in reports if r.get("slice_labels"))
    assert 0.0 <= mass["mass"] <= 1.0 and 0.0 < mass["uniform"] < 1.0


def test_vqa_closed_and_open_on_phantoms(model: Any, phantom_records: list[dict], tmp_path: Path) -> None:
    closed = evaluate(model, phantom_records, "vqa_closed", out_dir=tmp_path / "c", **FAST)
    rows = _read_outputs(tmp_path / "c", closed)
    expected = [r for r in phantom_records if r["task"] == "vqa" and r.get("choices")]
    assert closed["n"] == len(expected)
    assert all("Choices: A. " in r["prompt"] and r["reference"][1:3] == ". " for r in rows)
    m = closed["protocol"]["metrics"]
    assert set(m["by_type"]) == {r["question_type"] for r in expected} and closed["metrics"] == {}
    assert 0.0 <= m["closed_vqa_accuracy"] <= 1.0 and closed["protocol"]["n"] == closed["n"]
    assert closed["tgis_slice_mass"]["n"] == sum(1 for r in expected if r.get("slice_labels"))

    opened = evaluate(model, phantom_records, "vqa_open", out_dir=tmp_path / "o", limit=8, **FAST)
    rows = _read_outputs(tmp_path / "o", opened)
    assert opened["n"] == 8 and not any("Choices:" in r["prompt"] for r in rows)  # the open-form records
    assert {"bleu1", "rouge1", "meteor", "by_type", "macro"} <= set(opened["protocol"]["metrics"])
    _in_unit(opened["protocol"]["metrics"]["macro"])


def test_classify_on_phantoms(model: Any, phantom_records: list[dict]) -> None:
    res = evaluate(model, phantom_records, "classify", **FAST)
    m = res["metrics"]
    assert res["n"] == 6 and m["labels"] == ["abnormal", "normal"]
    assert 0 <= m["unparsed"] <= 6 and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["balanced_accuracy"] <= 1.0


def test_bad_arguments(model: Any, phantom_records: list[dict]) -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate(model, phantom_records, "segment", **FAST)
    with pytest.raises(ValueError, match="limit"):
        evaluate(model, phantom_records, "report", limit=0, **FAST)
    with pytest.raises(DataError, match="no records for task 'vqa_closed'"):
        evaluate(model, [r for r in phantom_records if r["task"] == "report"], "vqa_closed", **FAST)
    with pytest.raises(DataError, match="2 to 10 distinct"):
        label_set([{"label": "normal"}, {"label": "normal"}])


def test_task_records_and_parse_choice(phantom_records: list[dict]) -> None:
    assert all(not r.get("choices") for r in task_records(phantom_records, "vqa_open"))
    only_closed = [r for r in phantom_records if r.get("choices")]
    assert task_records(only_closed, "vqa_open") == only_closed  # no open form: asked open
    choices = ["abnormal", "normal"]
    assert parse_choice("B. normal", choices) == "normal"
    assert parse_choice("it is abnormal, not normal", choices) == "abnormal"  # first mention
    assert parse_choice("AB. x", choices) is None and parse_choice("b.", choices) is None
    assert parse_choice("nothing", choices) is None


def test_report_extractor_from_records(phantom_records: list[dict]) -> None:
    reports = [r for r in phantom_records if r["task"] == "report"]
    assert report_extractor(reports) == "phantom"
    ct = [{"labels": dict.fromkeys(CT_RATE_LABELS, 0), "meta": {}}]
    assert report_extractor(ct) == "ct_rate"
    assert report_extractor([{"image": "/data/phantom_00001.nii.gz", "meta": {}}]) is None  # paths do not count


# --------------------------------------------------------------------------------- slice mass


def test_true_slice_mass_hand_computed() -> None:
    # 4 model slices over a native depth of 8: slice j covers native floor((j + 0.5) / 4 * 8) = 1, 3, 5, 7
    pos = ((torch.arange(4) + 0.5) / 4)[None]
    target, has = slice_targets([2, 3, 7], torch.zeros(1, 4, dtype=torch.long), pos, [8])
    assert has.tolist() == [True] and target[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    out = true_slice_mass(torch.tensor([0.1, 0.6, 0.2, 0.1]), target[0])
    assert out == pytest.approx({"mass": 0.7, "uniform": 0.5, "top1_hit": 1.0})
    assert true_slice_mass(torch.tensor([0.1, 0.6, 0.3]), target[0]) is None  # shapes differ
    assert true_slice_mass(torch.tensor([0.4, 0.1, 0.4, 0.1]), torch.zeros(4)) is None


def test_evaluate_slice_mass_with_fake_scores(model: Any, phantom_records: list[dict], monkeypatch) -> None:
    fake = torch.arange(1, 17, dtype=torch.float32)
    fake = fake / fake.sum()  # slice j gets (j + 1) / 136

    def generate_batch(model: Any, batch: Any, **_: Any) -> Generation:
        n = int(batch.input_ids.shape[0])
        return Generation(["A."] * n, [fake] * n, [torch.arange(16)] * n, [torch.zeros(16)] * n, [None] * n)

    monkeypatch.setattr("medvlm3d.model.generation.generate_batch", generate_batch)  # what eval calls
    res = evaluate(model, phantom_records, "vqa_closed", **FAST)
    labelled = [r for r in task_records(phantom_records, "vqa_closed") if r.get("slice_labels")]
    # native depth 16 = model depth 16: slice j is native slice j
    expected = np.mean([sum((j + 1) / 136 for j in r["slice_labels"]) for r in labelled])
    assert res["tgis_slice_mass"]["n"] == len(labelled)
    assert res["tgis_slice_mass"]["mass"] == pytest.approx(expected, abs=1e-6)
    answers = [r["answer_choice"] for r in task_records(phantom_records, "vqa_closed")]
    assert res["protocol"]["metrics"]["closed_vqa_accuracy"] == pytest.approx(answers.count("A") / len(answers))


# ------------------------------------------------------------------------------ image-blind


def test_blind_partners_is_a_derangement(phantom_records: list[dict]) -> None:
    recs = task_records(phantom_records, "vqa_closed")
    partners = blind_partners(recs, seed=3)
    assert partners == blind_partners(recs, seed=3)
    assert all(recs[p]["image"] != r["image"] for r, p in zip(recs, partners))
    same_image = {}
    for r, p in zip(recs, partners):  # one donor image per source image
        assert same_image.setdefault(r["image"], recs[p]["image"]) == recs[p]["image"]
    assert len(set(same_image.values())) == len(same_image)  # a permutation of the distinct images
    with pytest.raises(DataError, match="at least 2 distinct images"):
        blind_partners([r for r in recs if r["image"] == recs[0]["image"]])


def test_evaluate_blind(model: Any, phantom_records: list[dict], tmp_path: Path) -> None:
    res = evaluate(model, phantom_records, "vqa_closed", out_dir=tmp_path, blind=True, limit=10, **FAST)
    assert res["blind"] and res["tgis_slice_mass"] is None and res["n"] == 10
    by_id = {r["id"]: r for r in phantom_records}
    for row in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines()):
        assert by_id[row["image_from"]]["image"] != by_id[row["id"]]["image"]
        assert "slice_mass" not in row


# ------------------------------------------------------------------------- real layouts


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_m3d_vqa_fixture(model: Any, tmp_path: Path) -> None:
    root = tmp_path / "M3D"
    rng = np.random.default_rng(0)
    paths = []
    for case in ("000001", "000002"):
        npy = root / "M3D_Cap_npy" / "ct_case" / case / "Axial_non_contrast.npy"
        npy.parent.mkdir(parents=True)
        np.save(npy, rng.random((1, 16, 32, 32), dtype=np.float32))  # [1, D, H, W] in [0, 1]
        paths.append(f"M3D_Cap_npy/ct_case/{case}/Axial_non_contrast.npy")
    src = _csv(root / "M3D-VQA" / "M3D_VQA_test.csv", M3D_HEADER, [
        [paths[0], "report", 1, "Which plane is this image?", "Axial", "Sagittal", "Coronal", "Oblique", "Axial", "A"],
        [paths[0], "report", 4, "What is abnormal?", "Cyst", "Lesion", "Stone", "Mass", "Lesion", "B"],
        [paths[1], "report", 3, "Which organ is shown?", "Liver", "Lung", "Brain", "Heart", "Lung", "B"],
    ])  # fmt: skip
    closed = evaluate(model, read_eval_records(str(src), model.cfg.data, "vqa_closed"), "vqa_closed",
                      out_dir=tmp_path / "c", **FAST)
    rows = _read_outputs(tmp_path / "c", closed)
    assert [r["reference"] for r in rows] == ["A. Axial", "B. Lesion", "B. Lung"]
    assert set(closed["protocol"]["metrics"]["by_type"]) == {"Plane", "Organ", "Abnormality"}
    assert closed["tgis_slice_mass"] is None
    opened = evaluate(model, read_eval_records(str(src), model.cfg.data, "vqa_open"), "vqa_open", **FAST)
    assert opened["n"] == 3 and set(opened["protocol"]["metrics"]["by_type"]) == {"Plane", "Organ", "Abnormality"}


def test_ct_rate_fixture(model: Any, tmp_path: Path) -> None:
    ds = tmp_path / "CT-RATE" / "dataset"
    names = ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    rng = np.random.default_rng(1)
    for name in names:
        hu = np.full((24, 24, 12), -1000, dtype=np.int16)  # [X, Y, Z], HU already (air -1000)
        hu[4:20, 4:20, :] = rng.integers(-100, 100, (16, 16, 12), dtype=np.int16)
        path = volume_path(ds, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 1.5, 1.0])), str(path))
    findings = ["Bilateral pleural effusion. No lung nodule.", "Cardiomegaly. Emphysema in both lungs."]
    _csv(ds / "radiology_text_reports" / "validation_reports.csv",
         ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
         [[n, "Not given.", "Non-contrast.", f, "Not given."] for n, f in zip(names, findings)])
    _csv(ds / "metadata" / "validation_metadata.csv",
         ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
         [[n, "1.0", "-1024", "[0.7, 0.7]", "1.5"] for n in names])
    labels = [[int(c in ("Pleural effusion",)) for c in CT_RATE_LABELS],
              [int(c in ("Cardiomegaly", "Emphysema")) for c in CT_RATE_LABELS]]
    _csv(ds / "multi_abnormality_labels" / "valid_predicted_labels.csv", ["VolumeName", *CT_RATE_LABELS],
         [[n, *lab] for n, lab in zip(names, labels)])
    records = read_eval_records(str(tmp_path / "CT-RATE"), model.cfg.data, "report")
    res = evaluate(model, records, "report", out_dir=tmp_path / "out", **FAST)
    rows = _read_outputs(tmp_path / "out", res)
    assert [r["reference"] for r in rows] == findings
    m = res["metrics"]
    assert m["extractor"] == "ct_rate" and set(m["labels_prf"]["per_label"]) == set(CT_RATE_LABELS)
    assert m["labels_prf"]["per_label"]["Pleural effusion"]["support"] == 1
    _in_unit(m["clinical_efficacy"])


# ---------------------------------------------------------------------------------------- CLI


def test_cli_eval_prints_table(ckpt: Path, phantom_manifest: Path, tmp_path: Path, capsys) -> None:
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(phantom_manifest), "--task", "vqa_closed",
               "--limit", "12", "--batch-size", "6", "--no-meteor", "--blind", "--out", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "eval vqa_closed: 12 records" in out and "(image-blind control)" in out
    assert "image-blind control: closed_vqa_accuracy" in out and "protocol m3d_vqa_closed" in out
    assert "tgis_slice_mass/mass" in out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "value"]
    assert (tmp_path / "e" / "metrics.json").is_file() and (tmp_path / "e" / "blind" / "predictions.jsonl").is_file()


def test_cli_eval_errors(ckpt: Path, phantom_manifest: Path, tmp_path: Path, capsys) -> None:
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(phantom_manifest), "--task", "report",
               "--protocol", "voteMI"])
    assert rc == 2 and "needs --task classify" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(tmp_path / "none"), "--data", str(phantom_manifest), "--task", "report"])
    assert rc == 2 and "checkpoint folder not found" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "x.jsonl"), "--task", "report"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(phantom_manifest), "--task", "report",
               "--protocol", "m3d_nope"])
    assert rc == 2 and "registered protocol" in capsys.readouterr().err


def test_format_table_aligns() -> None:
    text = format_table([["a", 0.5], ["longer", None]], ["name", "value"])
    lines = text.splitlines()
    assert lines[0] == "name    value" and lines[2] == "a       0.5000" and lines[3] == "longer  -"
