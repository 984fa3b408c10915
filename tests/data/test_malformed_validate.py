"""The validation pass over a dataset with malformed records and volumes (issue 6):
`validate_dataset` lists every bad record and loads each volume once, reports instead of
raising, and the `medvlm3d validate` CLI verb prints the table, writes JSON and sets its exit code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medvlm3d.cli import main as cli_main
from medvlm3d.config import DataConfig
from medvlm3d.data.validate import validate_dataset

from malformed_cases import GOOD_NPY, cut, rec, series, write_nifti
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)

# ------------------------------------------------------------------------- the validation pass


def _mixed_dataset(d: Path) -> Path:
    """11 records: 3 unreadable lines, 5 whose volume fails (4 bad volumes), 3 good (2 volumes)."""
    np.save(d / "good.npy", GOOD_NPY)
    write_nifti(d / "good.nii.gz")
    np.save(d / "nan.npy", np.where(GOOD_NPY > 0.9, np.nan, GOOD_NPY))
    cut(write_nifti(d / "cut.nii.gz"), 500)
    series(d / "gap", [0, 2.5, 5, 10])
    lines = [rec(id="g1", image="good.npy"), rec(id="g2", image="good.nii.gz"), rec(id="g3", image="good.npy"),
             rec(id="n1", image="nan.npy"), rec(id="n2", image="nan.npy"), rec(id="c1", image="cut.nii.gz"),
             rec(id="d1", image="gap"), '{"id": "broken", ', rec(id="e1", answer=""),
             rec(id="m1", image="missing.nii.gz"), rec(id="multi", image=["good.npy", "cut.nii.gz"])]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    return d / "data.jsonl"


def test_validate_dataset_lists_every_bad_record_and_loads_each_volume_once(tmp_path: Path, monkeypatch) -> None:
    import medvlm3d.data.volume as volume

    source = _mixed_dataset(tmp_path)
    calls: list[Any] = []
    real = volume.load_study
    monkeypatch.setattr(volume, "load_study", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = DataConfig(size=(4, 8, 8), cache_dir=str(tmp_path / "cache"))
    report = validate_dataset(source, cfg)
    assert not report.ok and report.kind == "manifest"
    assert report.n_records == 8 and report.n_volumes == len(calls) == 6  # g3 reuses g1's volume
    assert report.bad_records == 8 and report.bad_volumes == 4
    by_stage = {s: [p for p in report.problems if p.stage == s] for s in ("record", "volume")}
    assert [p.where.rsplit(" ", 1)[-1] for p in by_stage["record"]] == ["8", "9", "10"]
    assert sorted(p.record_id for p in by_stage["volume"]) == ["c1", "d1", "multi", "n1", "n2"]
    text = report.format()
    for s in ("BAD", "data.jsonl line 8", "'e1'", "missing.nii.gz", "'n2'", "NaN or Inf", "cut.nii.gz",
              "slices missing"):
        assert s in text, s
    assert "'g1'" not in text and "'g3'" not in text
    assert json.loads(json.dumps(report.to_dict()))["bad_records"] == 8
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the good volumes, ready for training
    quick = validate_dataset(source, cfg, load_volumes=False)
    assert quick.bad_records == 3 and quick.n_volumes == 0 and "not loaded" in quick.format()


def test_validate_reports_instead_of_raising(tmp_path: Path) -> None:
    report = validate_dataset(tmp_path / "none.jsonl")
    assert [p.stage for p in report.problems] == ["source"] and "none.jsonl" in report.format()
    (tmp_path / "all_bad.jsonl").write_text("{oops\n" + rec(task="caption") + "\n")
    report = validate_dataset(tmp_path / "all_bad.jsonl", load_volumes=False)
    assert report.bad_records == 2 and report.n_records == 0
    (tmp_path / "empty.jsonl").write_text("\n")
    report = validate_dataset(tmp_path / "empty.jsonl")
    assert not report.ok and "no records found" in report.format()
    with pytest.raises(ValueError, match="DataConfig"):
        validate_dataset(tmp_path / "none.jsonl", {"size": (4, 4, 4)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        validate_dataset(tmp_path / "none.jsonl", kind="dicom")


def test_validate_cli_exit_codes_table_and_json(tmp_path: Path, capsys) -> None:
    source = _mixed_dataset(tmp_path)
    out = tmp_path / "out" / "report.json"
    assert cli_main(["validate", "--data", str(source), "--json", str(out), "data.size=[4,8,8]"]) == 2
    text = capsys.readouterr().out
    assert "bad records" in text and "'n1'" in text and "data.jsonl line 8" in text
    saved = json.loads(out.read_text())
    assert saved["ok"] is False and saved["bad_records"] == 8 and len(saved["problems"]) == 8
    assert cli_main(["validate", "--data", str(source), "--no-volumes"]) == 2
    good = tmp_path / "good.jsonl"
    good.write_text(rec(id="g1", image="good.npy") + "\n")
    assert cli_main(["validate", "--data", str(good), "data.size=[4,8,8]"]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["validate", "--data", str(good), "--config", str(tmp_path / "no_such.yaml")]) == 2
    assert cli_main(["validate", "--data", str(good), "data.nonsense=1"]) == 2
