"""Malformed datasets (issue 6), in process: JSONL manifests, M3D-VQA CSV, M3D-Cap and CT-RATE
folders. Each case must raise a DataError naming the file and line / index; a bad record (not a
bad file) is also listed by `read_records_report(skip_bad_records=True)`. Last, the size of the
whole matrix (the RISKY, volume and dataset tables of the test_malformed_* modules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS, METADATA_COLUMNS, REPORT_COLUMNS
from medvlm3d.data.formats.m3d_vqa import VQA_COLUMNS
from medvlm3d.data.readers import read_records, read_records_report

from malformed_cases import GOOD, GOOD_NPY, Expect, check_error, manifest, rec, touch
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)
from test_malformed_dicom import VOLUME as dicom_cases
from test_malformed_nifti import VOLUME as nifti_cases
from test_malformed_npy import VOLUME as npy_cases
from test_malformed_risky import RISKY

# ---------------------------------------------------------------------- in-process dataset cases

DATASET: dict[str, Callable[[Path], Expect]] = {}


def _man(second: str | bytes, match: str, record_level: bool = True) -> Callable[[Path], Expect]:
    return lambda d: Expect(manifest(d, second), ["manifest.jsonl line 2"], match, record_level=record_level)


DATASET.update({
    "jsonl-broken-line": _man('{"id": "r2", "image": ', "not a valid JSON"),
    "jsonl-deep-nesting": _man("[" * 100_000 + "]" * 100_000, "RecursionError"),
    "jsonl-5000-digit-integer": _man('{"id": ' + "9" * 5000 + "}", "not a valid JSON"),
    "jsonl-nan-constant": _man(rec().replace('"yes"', "NaN"), "NaN"),
    "jsonl-not-utf8": _man(rec(answer="caf").encode().replace(b"caf", b"caf\xe9"), "UTF-8"),
    "jsonl-nul-bytes": _man(b"\0\0\0\0", "not a valid JSON"),
    "jsonl-array-not-object": _man("[1, 2, 3]", "JSON object"),
    "jsonl-empty-answer": _man(rec(answer=" "), "'answer' must be a non-empty"),
    "jsonl-unknown-task": _man(rec(task="segmentation"), "unknown task 'segmentation'"),
    "jsonl-missing-field": _man(json.dumps({"id": "r2", "image": "v.npy", "task": "vqa"}), "missing required"),
    "jsonl-missing-image-file": _man(rec(image="gone.nii.gz"), "image file not found.*gone.nii.gz"),
    "jsonl-duplicate-id": _man(rec(id="ok"), "duplicate id 'ok'"),
    "jsonl-negative-slice-labels": _man(rec(slice_labels=[-1]), "slice_labels"),
    "jsonl-utf16-file": lambda d: Expect(touch(d / "u16.jsonl", json.dumps(GOOD).encode("utf-16")),
                                         ["u16.jsonl line 1"], "UTF-8", record_level=True),
    "jsonl-empty-file": lambda d: Expect(touch(d / "empty.jsonl", b"\n\n"), ["empty.jsonl"], "no usable records"),
})  # fmt: skip


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    out = [",".join(header)] + [",".join(f'"{c}"' for c in r) for r in rows]
    return ("\n".join(out) + "\n").encode()


_VQA_ROW = ["M3D_Cap_npy/ct/a.npy", "caption", "3", "Which organ?", "Liver", "Lung", "Heart", "Brain", "Liver", "A"]


def vqa_csv(d: Path, header: list[str] = list(VQA_COLUMNS), rows: list[list[str]] | None = None,
            raw: bytes | None = None) -> Path:
    (d / "M3D_Cap_npy" / "ct").mkdir(parents=True)
    np.save(d / "M3D_Cap_npy" / "ct" / "a.npy", GOOD_NPY)
    p = d / "M3D-VQA" / "vqa.csv"
    p.parent.mkdir()
    p.write_bytes(raw if raw is not None else _csv_bytes(header, [_VQA_ROW] + (rows or [])))
    return p


def _vqa(rows: list[list[str]], match: str, names: tuple[str, ...] = ("vqa.csv line 3",)) -> Callable[[Path], Expect]:
    return lambda d: Expect(vqa_csv(d, rows=rows), list(names), match, record_level=True)


def _row(**change: str) -> list[str]:
    row = list(_VQA_ROW)
    for k, v in change.items():
        row[VQA_COLUMNS.index(k.replace("_", " "))] = v
    return row


DATASET.update({
    "vqa-csv-missing-columns": lambda d: Expect(vqa_csv(d, header=list(VQA_COLUMNS[:4]) + ["Answer"]), ["vqa.csv"],
                                                "missing column", kind="m3d_vqa"),
    "vqa-csv-not-utf8": lambda d: Expect(vqa_csv(d, raw=_csv_bytes(list(VQA_COLUMNS), [_VQA_ROW]).replace(
        b"Liver", b"Li\xe9ver")), ["vqa.csv"], "UTF-8"),
    "vqa-csv-short-row": _vqa([_VQA_ROW[:6]], "6 fields"),
    "vqa-csv-empty-answer": _vqa([_row(Answer="")], "empty 'Question' or 'Answer'"),
    "vqa-csv-bad-question-type": _vqa([_row(Question_Type="banana")], "Question Type"),
    "vqa-csv-missing-image": _vqa([_row(Image_Path="M3D_Cap_npy/ct/none.npy")], "image file not found"),
    "vqa-csv-field-over-limit": lambda d: Expect(vqa_csv(d, rows=[_row(Text="x" * 200_000)]), ["vqa.csv"],
                                                 "malformed CSV"),
})  # fmt: skip


def cap_root(d: Path, text: bytes | None = b"study_findings: a nodule.", index: str | None = None,
             image: str = "M3D_Cap_npy/ct/a.npy") -> Path:
    (d / "M3D_Cap_npy" / "ct").mkdir(parents=True)
    np.save(d / "M3D_Cap_npy" / "ct" / "a.npy", GOOD_NPY)
    if text is not None:
        (d / "M3D_Cap_npy" / "ct" / "text.txt").write_bytes(text)
    p = d / "M3D_Cap_npy" / "M3D_Cap.json"
    p.write_text(index if index is not None else json.dumps(
        {"train": [{"image": image, "text": "M3D_Cap_npy/ct/text.txt"}]}))
    return p


_CAP = ["M3D_Cap.json train[0]"]
DATASET.update({
    "cap-report-not-utf8": lambda d: Expect(cap_root(d, b"study_findings: caf\xe9"), _CAP + ["text.txt"], "UTF-8",
                                            record_level=True),
    "cap-report-missing": lambda d: Expect(cap_root(d, None), _CAP + ["text.txt"], "report file not found",
                                           record_level=True),
    "cap-report-empty": lambda d: Expect(cap_root(d, b"study_findings:   "), _CAP, "empty", record_level=True),
    "cap-image-missing": lambda d: Expect(cap_root(d, image="M3D_Cap_npy/ct/none.npy"), _CAP, "image file not found",
                                          record_level=True),
    "cap-index-broken-json": lambda d: Expect(cap_root(d, index='{"train": [{"image": '), ["M3D_Cap.json"],
                                              "not valid JSON", kind="m3d_cap"),
})  # fmt: skip

_VOL = "valid_1_a_1.nii.gz"


def ct_root(d: Path, reports: bytes | None = None, meta: list[str] | None = None,
            labels: list[str] | None = None) -> Path:
    ds = d / "dataset"
    (ds / "radiology_text_reports").mkdir(parents=True)
    vol = ds / "valid" / "valid_1" / "valid_1_a" / _VOL
    vol.parent.mkdir(parents=True)
    vol.write_bytes(b"")
    rep = reports if reports is not None else _csv_bytes(list(REPORT_COLUMNS), [[_VOL, "x", "y", "Findings.", "Imp."]])
    (ds / "radiology_text_reports" / "validation_reports.csv").write_bytes(rep)
    if meta is not None:
        (ds / "metadata").mkdir()
        (ds / "metadata" / "validation_metadata.csv").write_bytes(_csv_bytes(list(METADATA_COLUMNS), [meta]))
    if labels is not None:
        (ds / "multi_abnormality_labels").mkdir()
        (ds / "multi_abnormality_labels" / "valid_predicted_labels.csv").write_bytes(
            _csv_bytes(["VolumeName", *CT_RATE_LABELS], [labels]))
    return d


_REP = ["validation_reports.csv line 2"]
DATASET.update({
    "ctrate-reports-missing-columns": lambda d: Expect(
        ct_root(d, _csv_bytes(["VolumeName", "Findings_EN"], [[_VOL, "x"]])), ["validation_reports.csv"],
        "missing column"),
    "ctrate-reports-not-utf8": lambda d: Expect(ct_root(d, _csv_bytes(list(REPORT_COLUMNS), [
        [_VOL, "x", "y", "Findings.", "Imp."]]).replace(b"Findings.", b"Find\xefngs.")), ["validation_reports.csv"],
        "UTF-8"),
    "ctrate-findings-not-given": lambda d: Expect(ct_root(d, _csv_bytes(list(REPORT_COLUMNS), [
        [_VOL, "x", "y", "Not given.", "Imp."]])), _REP, "empty report", record_level=True),
    "ctrate-bad-volume-name": lambda d: Expect(ct_root(d, _csv_bytes(list(REPORT_COLUMNS), [
        ["scan.nii.gz", "x", "y", "F.", "I."]])), _REP, "VolumeName", record_level=True),
    "ctrate-metadata-slope-not-a-number": lambda d: Expect(ct_root(d, meta=[_VOL, "abc", "-1024", "[0.7, 0.7]", "1.5"]),
                                                           ["validation_metadata.csv line 2"], "RescaleSlope",
                                                           record_level=True),
    "ctrate-label-not-binary": lambda d: Expect(ct_root(d, labels=[_VOL] + ["2"] * len(CT_RATE_LABELS)),
                                                ["valid_predicted_labels.csv line 2"], "must be 0 or 1",
                                                record_level=True),
    "dataset-source-missing": lambda d: Expect(d / "nothing.jsonl", ["nothing.jsonl"], "does not exist"),
})  # fmt: skip


@pytest.mark.parametrize("cid", list(DATASET))
def test_malformed_dataset(tmp_path: Path, cid: str) -> None:
    e = DATASET[cid](tmp_path)
    check_error(lambda: read_records(e.target, e.kind), e)
    if e.record_level:  # a bad record, not a bad file: skip_bad_records lists it and reads on
        report = read_records_report(e.target, e.kind, skip_bad_records=True, allow_empty=True)
        assert any(all(n in msg for n in e.names) for _, msg in report.errors), report.errors


VOLUME = {**nifti_cases, **npy_cases, **dicom_cases}


def test_matrix_is_large_enough() -> None:
    assert len(RISKY) + len(VOLUME) + len(DATASET) >= 50 and len(RISKY) >= 20
