"""Tests for medvlm3d.data.readers (+ m3d, ct_rate): fixtures in the real dataset layouts."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS, volume_path
from medvlm3d.data.errors import DataError
from medvlm3d.data.formats.m3d_cap import extract_report
from medvlm3d.data.readers import (
    REPORT_QUESTION,
    detect_kind,
    read_records,
    read_records_report,
    validate_record,
    write_manifest,
)

VQA_HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer", "Answer Choice"]  # fmt: skip


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# fixtures in the real layouts


@pytest.fixture()
def m3d_root(tmp_path: Path) -> Path:
    """<root>/M3D_Cap_npy/{M3D_Cap.json, ct_case/..., ct_quizze/...}, <root>/M3D-VQA/M3D_VQA_test.csv."""
    root = tmp_path / "M3D"
    cap = root / "M3D_Cap_npy"
    cases = {
        "ct_case/000001/Axial_non_contrast.npy": "age: 40\nstudy_findings: Liver lesion in segment 4.\n",
        "ct_case/000002/Axial_portal_venous.npy": "History of pain.\ndiscussion:  Simple hepatic cyst. ",
        "ct_quizze/000003/Coronal.npy": "  Whole text report.\n",
    }
    items = []
    for rel, text in cases.items():
        npy = cap / rel
        npy.parent.mkdir(parents=True)
        np.save(npy, np.zeros((1, 2, 2, 2), dtype=np.float32))
        (npy.parent / "text.txt").write_text(text, encoding="utf-8")
        items.append({"image": f"M3D_Cap_npy/{rel}", "text": f"M3D_Cap_npy/{Path(rel).parent}/text.txt"})
    index = {"train": items[:2], "validation": items[2:], "test": []}
    (cap / "M3D_Cap.json").write_text(json.dumps(index), encoding="utf-8")
    img = "M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy"
    _csv(root / "M3D-VQA" / "M3D_VQA_test.csv", VQA_HEADER, [
        [img, "report", 1, "Which plane is this image?", "Axial", "Sagittal", "Coronal", "Oblique", "Axial", "A"],
        [img, "report", "4", "What is abnormal?", "Cyst", "Lesion", "Stone", "Mass", "Lesion", "B"],
        [img, "report", "3.0", "Is the liver shown?", "Yes", "No", "", "", "Yes", "A."],
    ])  # fmt: skip
    return root


def _ct_rate(base: Path, reports: dict[str, list[list[str]]], with_meta: bool = True) -> Path:
    """A CT-RATE tree under base/dataset; `reports` maps split -> rows of the reports CSV."""
    ds = base / "dataset"
    names = {"train": ("train_reports.csv", "train_metadata.csv", "train_predicted_labels.csv"),
             "valid": ("validation_reports.csv", "validation_metadata.csv", "valid_predicted_labels.csv")}  # fmt: skip
    for split, rows in reports.items():
        rep, meta, lab = names[split]
        columns = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
        _csv(ds / "radiology_text_reports" / rep, columns, rows)
        for i, row in enumerate(rows):
            vol = volume_path(ds, row[0])
            vol.parent.mkdir(parents=True, exist_ok=True)
            vol.write_bytes(b"")  # only existence matters here
        if with_meta:
            _csv(ds / "metadata" / meta, ["VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept",
                                          "XYSpacing", "ZSpacing"],
                 [[r[0], "X", "1.0", "-1024", "[0.7, 0.75]", "1.5"] for r in rows])  # fmt: skip
            _csv(ds / "multi_abnormality_labels" / lab, ["VolumeName", *CT_RATE_LABELS],
                 [[r[0]] + [str((i + j) % 2) for j in range(18)] for i, r in enumerate(rows)])  # fmt: skip
    return ds


@pytest.fixture()
def ct_root(tmp_path: Path) -> Path:
    _ct_rate(tmp_path / "CT-RATE", {
        "train": [["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Clear lungs.", "Normal study."]],
        "valid": [["valid_1_a_1.nii.gz", "Not given.", "Contrast.", "Nodule in the right lung.", "Nodule."],
                  ["valid_1_a_2.nii.gz", "Fever.", "Contrast.", "Effusion.", "Not given."]],
    })  # fmt: skip
    return tmp_path / "CT-RATE"


# --------------------------------------------------------------------------------------------
# M3D-Cap


def test_m3d_cap_reads_all_splits_and_report_markers(m3d_root: Path) -> None:
    recs = read_records(m3d_root / "M3D_Cap_npy" / "M3D_Cap.json")
    assert [r["id"] for r in recs] == ["train_0", "train_1", "validation_0"]
    assert [r["answer"] for r in recs] == ["Liver lesion in segment 4.", "Simple hepatic cyst.", "Whole text report."]
    assert all(r["task"] == "report" and r["question"] == REPORT_QUESTION for r in recs)
    assert recs[0]["image"] == str(m3d_root / "M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy")
    assert Path(recs[2]["image"]).is_file() and recs[2]["meta"]["split"] == "validation"
    assert extract_report("Study_Findings: A.\nDiscussion: B.") == "A.\nDiscussion: B."


def test_m3d_cap_split_selection(m3d_root: Path) -> None:
    path = m3d_root / "M3D_Cap_npy" / "M3D_Cap.json"
    assert [r["id"] for r in read_records(path, split="validation")] == ["validation_0"]
    with pytest.raises(DataError, match="no usable records"):
        read_records(path, split="test")  # present but empty
    with pytest.raises(ValueError, match="validation"):
        read_records(path, split="val")


def test_m3d_cap_data_root_override(m3d_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "index" / "M3D_Cap.json"
    moved.parent.mkdir(parents=True)
    moved.write_bytes((m3d_root / "M3D_Cap_npy" / "M3D_Cap.json").read_bytes())
    with pytest.raises(DataError, match=r"M3D_Cap\.json train\[0\].*not found.*data_root"):
        read_records(moved)
    recs = read_records(moved, data_root=m3d_root)
    assert recs[0]["image"].startswith(str(m3d_root))


def test_m3d_cap_empty_report_raises_or_is_skipped(m3d_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (m3d_root / "M3D_Cap_npy/ct_case/000002/text.txt").write_text("discussion:   \n", encoding="utf-8")
    path = m3d_root / "M3D_Cap_npy" / "M3D_Cap.json"
    with pytest.raises(DataError, match=r"M3D_Cap\.json train\[1\].*empty"):
        read_records(path)
    with caplog.at_level(logging.WARNING):
        rep = read_records_report(path, skip_bad_records=True)
    assert rep.skipped == 1 and [r["id"] for r in rep.records] == ["train_0", "validation_0"]
    assert "train[1]" in rep.errors[0][0] and "empty" in caplog.text


# --------------------------------------------------------------------------------------------
# M3D-VQA


def test_m3d_vqa_closed_and_open(m3d_root: Path) -> None:
    path = m3d_root / "M3D-VQA" / "M3D_VQA_test.csv"
    closed = read_records(path)
    assert [r["question_type"] for r in closed] == ["Plane", "Abnormality", "Organ"]
    assert closed[0]["choices"] == ["Axial", "Sagittal", "Coronal", "Oblique"] and closed[0]["answer_choice"] == "A"
    assert closed[1]["question"] == "What is abnormal?" and closed[1]["answer"] == "Lesion"
    assert closed[2]["choices"] == ["Yes", "No"] and closed[2]["answer_choice"] == "A"
    assert closed[0]["image"] == str(m3d_root / "M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy")
    assert closed[0]["id"] == "M3D_VQA_test_2" and all(r["task"] == "vqa" for r in closed)
    opened = read_records(path, vqa_mode="open")
    assert all("choices" not in r and "answer_choice" not in r for r in opened)
    assert [r["answer"] for r in opened] == ["Axial", "Lesion", "Yes"]


def test_m3d_vqa_missing_columns(tmp_path: Path) -> None:
    path = _csv(tmp_path / "M3D-VQA" / "vqa.csv", VQA_HEADER[:4] + ["Answer"], [["a.npy", "t", "1", "Q", "A"]])
    with pytest.raises(DataError, match=r"vqa\.csv: missing column\(s\) \['Choice A'.*'Answer Choice'\]"):
        read_records(path, kind="m3d_vqa")
    with pytest.raises(DataError, match="supported kinds"):
        read_records(path)


@pytest.mark.parametrize(
    "change, expected",
    [({9: "E"}, r"line 2 .*answer_choice.*\['A', 'B', 'C', 'D'\]"),
     ({2: "9"}, r"line 2.*Question Type.*1-5"),
     ({8: " "}, r"line 2.*'Answer'"),
     ({0: "M3D_Cap_npy/nope.npy"}, r"line 2.*not found.*nope\.npy")],
)  # fmt: skip
def test_m3d_vqa_bad_rows(m3d_root: Path, change: dict[int, str], expected: str) -> None:
    row = ["M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy", "t", "1", "Q?", "a", "b", "c", "d", "a", "A"]
    for k, v in change.items():
        row[k] = v
    path = _csv(m3d_root / "M3D-VQA" / "M3D_VQA_val.csv", VQA_HEADER, [row])
    with pytest.raises(DataError, match=r"M3D_VQA_val\.csv " + expected):
        read_records(path)


# --------------------------------------------------------------------------------------------
# CT-RATE


def test_ct_rate_records(ct_root: Path) -> None:
    recs = read_records(ct_root)
    assert [r["id"] for r in recs] == ["train_1_a_1", "valid_1_a_1", "valid_1_a_2"]
    v = recs[1]
    assert v["image"] == str(ct_root / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz")
    assert v["answer"] == "Nodule in the right lung." and v["task"] == "report"
    assert list(v["labels"]) == list(CT_RATE_LABELS) and v["labels"]["Medical material"] == 0
    assert recs[2]["labels"]["Medical material"] == 1
    assert v["meta"] == {"split": "valid", "rescale_slope": 1.0, "rescale_intercept": -1024.0,
                         "xy_spacing": [0.7, 0.75], "z_spacing": 1.5}  # fmt: skip
    same = read_records(ct_root / "dataset", split="valid")
    assert same == recs[1:]


def test_ct_rate_findings_impressions(ct_root: Path) -> None:
    recs = read_records(ct_root, split="valid", ct_rate_target="findings_impressions")
    assert recs[0]["answer"] == "Nodule in the right lung.\nNodule."
    assert recs[1]["answer"] == "Effusion."  # impressions "Not given."
    with pytest.raises(ValueError, match="ct_rate_target"):
        read_records(ct_root, ct_rate_target="impressions")
    with pytest.raises(ValueError, match="valid"):
        read_records(ct_root, split="validation")


def test_ct_rate_bad_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = _ct_rate(tmp_path, {"valid": [["valid_1_a_1.nii.gz", "", "", "Not given.", "Impression only."],
                                       ["valid_2_a_1.nii.gz", "", "", "Fine.", "Fine."]]})  # fmt: skip
    with pytest.raises(DataError, match=r"validation_reports\.csv line 2 \(valid_1_a_1\.nii\.gz\).*Findings_EN"):
        read_records(tmp_path)
    assert read_records(tmp_path, ct_rate_target="findings_impressions")[0]["answer"] == "Impression only."
    with caplog.at_level(logging.WARNING):
        rep = read_records_report(ds, skip_bad_records=True)
    assert rep.skipped == 1 and [r["id"] for r in rep.records] == ["valid_2_a_1"] and "line 2" in caplog.text
    meta = ds / "metadata" / "validation_metadata.csv"
    good = meta.read_text(encoding="utf-8")
    meta.write_text(good.replace('"[0.7, 0.75]"', "bad", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"validation_metadata\.csv line 2 \(valid_1_a_1\.nii\.gz\): XYSpacing"):
        read_records(ds, ct_rate_target="findings_impressions")
    meta.write_text(good, encoding="utf-8")
    labels = ds / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    labels.write_text(labels.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 \(valid_1_a_1\.nii\.gz\).*has no .*row in .*valid_predicted_labels"):
        read_records(ds, split="valid", ct_rate_target="findings_impressions")


def test_ct_rate_without_metadata_and_labels(tmp_path: Path) -> None:
    _ct_rate(tmp_path, {"train": [["train_3_b_2.nii.gz", "", "", "Atelectasis.", "Not given."]]}, with_meta=False)
    (rec,) = read_records(tmp_path / "dataset")
    assert rec["id"] == "train_3_b_2" and "labels" not in rec and rec["meta"] == {"split": "train"}
    assert rec["image"] == str(tmp_path / "dataset/train/train_3/train_3_b/train_3_b_2.nii.gz")
    with pytest.raises(DataError, match=r"validation_reports\.csv"):
        read_records(tmp_path, split="valid")
    (tmp_path / "dataset/train/train_3/train_3_b/train_3_b_2.nii.gz").unlink()
    with pytest.raises(DataError, match=r"train_reports\.csv line 2 \(id 'train_3_b_2'\): image file not found"):
        read_records(tmp_path)


# --------------------------------------------------------------------------------------------
# detection


def test_detect_kind(m3d_root: Path, ct_root: Path, tmp_path: Path) -> None:
    assert detect_kind(m3d_root / "M3D_Cap_npy" / "M3D_Cap.json") == "m3d_cap"
    assert detect_kind(m3d_root / "M3D-VQA" / "M3D_VQA_test.csv") == "m3d_vqa"
    assert detect_kind(ct_root) == detect_kind(ct_root / "dataset") == "ct_rate"
    (tmp_path / "m.jsonl").write_text("", encoding="utf-8")
    assert detect_kind(tmp_path / "m.jsonl") == "manifest"
    fake = tmp_path / "fake" / "M3D_Cap.json"  # the name alone is not enough
    fake.parent.mkdir()
    fake.write_text(json.dumps({"train": [{"image": "a.npy"}]}), encoding="utf-8")
    for bad in (fake, tmp_path / "fake", m3d_root / "M3D_Cap_npy/ct_case/000001/text.txt"):
        with pytest.raises(DataError, match=r"supported kinds: manifest .*m3d_cap .*m3d_vqa .*ct_rate"):
            detect_kind(bad)
    with pytest.raises(DataError, match="CT-RATE root"):
        detect_kind(ct_root / "dataset/radiology_text_reports/validation_reports.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_records(fake, kind="m3d")
    with pytest.raises(DataError, match="not an M3D-Cap index"):
        read_records(fake, kind="m3d_cap")


# --------------------------------------------------------------------------------------------
# manifest


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _rec(**kw: object) -> str:
    base = {"id": "s1", "image": "vol/a.npy", "task": "vqa", "question": "Q?", "answer": "yes"}
    return json.dumps({k: v for k, v in {**base, **kw}.items() if v is not None})


@pytest.fixture()
def man_dir(tmp_path: Path) -> Path:
    d = tmp_path / "man"
    (d / "vol").mkdir(parents=True)
    for name in ("a.npy", "b.npy"):
        (d / "vol" / name).write_bytes(b"")
    return d


def test_manifest_reads_and_resolves_relative_paths(man_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative to the manifest's folder, not the working directory
    path = _write_lines(man_dir / "m.jsonl", [
        _rec(choices=["yes", "no"], answer_choice="a.", slice_labels=[3, 4], labels={"x": 1.0}, meta={"k": 1}),
        "",
        _rec(id="s2", image=["vol/a.npy", str(man_dir / "vol/b.npy")], task="report", slice_labels=[[1], [2]]),
    ])  # fmt: skip
    a, b = read_records(path)
    assert a["image"] == str(man_dir / "vol/a.npy") and a["answer_choice"] == "A" and a["labels"] == {"x": 1}
    assert b["image"] == [str(man_dir / "vol/a.npy"), str(man_dir / "vol/b.npy")] and b["slice_labels"] == [[1], [2]]
    assert list(a)[:5] == ["id", "image", "task", "question", "answer"] and a["meta"] == {"k": 1}


@pytest.mark.parametrize(
    "line, expected",
    [("{not json", "not a valid JSON"),
     (_rec(answer=None), r"missing required field\(s\) \['answer'\]"),
     (_rec(answer="  "), "'answer' must be a non-empty string"),
     (_rec(question=""), "'question' must be a non-empty string"),
     (_rec(task="caption"), r"unknown task 'caption'; expected one of \['report', 'vqa'\]"),
     (_rec(choices=["x", "y"], answer_choice="C"), r"answer_choice' must be one of the choice letters \['A', 'B'\]"),
     (_rec(answer_choice="A"), "without 'choices'"),
     (_rec(slice_labels=[1, "2"]), "slice_labels' must be a list of integer"),
     (_rec(slice_labels=[1.0]), "slice_labels' must be a list of integer"),
     (_rec(slice_labels=[[1], [2]]), "2 lists for 1 image"),
     (_rec(image="vol/missing.npy"), r"image file not found: .*vol/missing\.npy"),
     (_rec(id="s0"), "duplicate id 's0'"),
     (b'{"id": "s9", "answer": "caf\xe9"}', "not valid UTF-8"),
     ("[1, 2]", "must be a JSON object")],
)  # fmt: skip
def test_manifest_bad_line(man_dir: Path, line: str | bytes, expected: str) -> None:
    path = _write_lines(man_dir / "manifest.jsonl", [_rec(id="s0"), line])
    with pytest.raises(DataError, match=r"manifest\.jsonl line 2.*" + expected):
        read_records(path)


def test_manifest_skip_bad_records_counts_and_logs(man_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_lines(man_dir / "m.jsonl", [_rec(id="s0"), "{oops", _rec(id="s2", task="x"), _rec(id="s3")])
    with caplog.at_level(logging.WARNING, logger="medvlm3d.data.readers"):
        rep = read_records_report(path, skip_bad_records=True)
    assert [r["id"] for r in rep.records] == ["s0", "s3"] and rep.skipped == 2
    assert [w.rsplit(" ", 1)[-1] for w, _ in rep.errors] == ["2", "3"]
    assert "m.jsonl line 2" in caplog.text and "unknown task 'x'" in caplog.text and "skipped 2" in caplog.text
    assert [r["id"] for r in read_records(path, skip_bad_records=True)] == ["s0", "s3"]


def test_manifest_check_files_off_and_empty(man_dir: Path) -> None:
    path = _write_lines(man_dir / "m.jsonl", [_rec(image="nowhere.npy")])
    assert read_records(path, check_files=False)[0]["image"] == str(man_dir / "nowhere.npy")
    with pytest.raises(DataError, match="no usable records"):
        read_records(_write_lines(man_dir / "e.jsonl", [""]))
    with pytest.raises(ValueError, match="split applies"):
        read_records(path, split="train")
    with pytest.raises(ValueError, match="vqa_mode"):
        read_records(path, vqa_mode="multi")


# --------------------------------------------------------------------------------------------
# validate_record and write_manifest


def test_validate_record_is_pure() -> None:
    rec = {"id": 7, "image": Path("/x/a.npy"), "task": "vqa", "question": "Q", "answer": "A",
           "choices": ["a", "b", "c", "d"], "answer_choice": "d", "extra": 1}  # fmt: skip
    out = validate_record(rec, "here")
    assert out["id"] == "7" and out["image"] == "/x/a.npy" and out["answer_choice"] == "D" and out["extra"] == 1
    assert rec["answer_choice"] == "d" and rec["id"] == 7  # input untouched
    with pytest.raises(DataError, match=r"^here \(id '7'\): image file not found"):
        validate_record(rec, "here", check_files=True)
    with pytest.raises(DataError, match="here: a record must be"):
        validate_record(["x"], "here")


def test_write_manifest_roundtrip_and_atomic(man_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.npy"
    outside.write_bytes(b"")
    recs = [validate_record(json.loads(_rec()), "t") | {"image": str(man_dir / "vol/a.npy")},
            validate_record(json.loads(_rec(id="s2", answer="café")), "t") | {"image": [str(outside), "vol/b.npy"]}]
    path = write_manifest(recs, man_dir / "out.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["image"] == "vol/a.npy" and "café" in lines[1]
    assert json.loads(lines[1])["image"] == [str(outside), "vol/b.npy"]
    with pytest.raises(DataError, match=r"line 2 \(id 's2'\): image .*outside\.npy.* outside the data root"):
        read_records(path)  # an absolute path outside the manifest's folder: refused by default
    back = read_records(path, allow_outside_root=True)
    assert back[0]["image"] == str(man_dir / "vol/a.npy") and back[1]["image"][1] == str(man_dir / "vol/b.npy")
    assert back[1]["answer"] == "café"
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"record 1 .*'answer'"):
        write_manifest([recs[0], {**recs[1], "answer": ""}], path)
    assert path.read_bytes() == before and sorted(p.name for p in man_dir.iterdir()) == ["out.jsonl", "vol"]
