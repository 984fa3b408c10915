"""Extension points used as a researcher would: a toy dataset format and a toy metric, each
registered from inside this file (no `plugins:` entry, no other file touched), then run through
a real one-step training (run_training) and through eval (evaluate with `eval.metrics`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from medvlm3d import load_pretrained
from medvlm3d.config import load_config, to_dict
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.data.formats import DATASETS, DatasetFormat, detection_order
from medvlm3d.data.formats.base import Candidate, csv_header, csv_rows
from medvlm3d.data.readers import detect_kind, read_records
from medvlm3d.eval.metrics import METRICS
from medvlm3d.eval.runner import TASK_METRICS, evaluate, score_task

TOY_COLUMNS = ("id", "image", "question", "answer")
TOY_READS: list[Path] = []  # sources the toy format read (spy)
TOY_SEEN: list[list[str]] = []  # record ids each toy-metric call received (spy)


@DATASETS.register("toy_csv")
class ToyCsv(DatasetFormat):
    """A CSV with columns id,image,question,answer: open VQA, image paths relative to the CSV."""

    name = "toy_csv"
    help = "a .csv with columns id,image,question,answer"

    def detect(self, source: Path) -> bool:
        return source.is_file() and source.suffix == ".csv" and tuple(csv_header(source)) == TOY_COLUMNS

    def candidates(self, source: Path, *, split: str | None, data_root: Path | None,
                   options: Mapping[str, Any]) -> Iterator[Candidate]:
        TOY_READS.append(source)
        for line, row in csv_rows(source, TOY_COLUMNS):
            def build(row: Any = row, where: str = f"{source} line {line}") -> dict[str, Any]:
                if isinstance(row, str):
                    raise DataError(f"{where}: {row}")
                return {**row, "task": "vqa"}

            yield f"{source} line {line}", build


@METRICS.register("toy_exact_match")
def toy_exact_match(preds: list[str], refs: list[str], records: list[dict], **options: Any) -> dict[str, float]:
    TOY_SEEN.append([r["id"] for r in records])
    return {"toy_exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(preds),
            "toy_pred_chars": sum(len(p) for p in preds) / len(preds)}


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def toy_csv(tmp_path: Path) -> Path:
    """4 open VQA phantom questions as a toy CSV next to their volumes (relative image paths)."""
    from medvlm3d.data.synthetic import make_dataset

    manifest = make_dataset(tmp_path / "ph", 2, seed=3, shape=(16, 32, 32))
    recs = [r for r in read_records(manifest) if r["task"] == "vqa" and not r.get("choices")][:4]
    path = manifest.parent / "toy.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TOY_COLUMNS)
        for r in recs:
            w.writerow([r["id"], Path(r["image"]).relative_to(manifest.parent).as_posix(), r["question"], r["answer"]])
    return path


def _cfg(tok: Path, csv_path: Path, out: Path, *overrides: str) -> Any:
    return load_config("tiny", [f"model.llm.tokenizer={tok}", "data.kind=toy_csv", f"data.train={csv_path}",
                                f"train.output_dir={out}", "train.max_steps=1", *overrides],
                       layers=["stage2_finetune"])


def test_toy_format_reads_validated_records_and_is_detected(toy_csv: Path) -> None:
    recs = read_records(toy_csv, kind="toy_csv")
    assert len(recs) == 4 and all(r["task"] == "vqa" and "choices" not in r for r in recs)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in recs)
    assert Path(recs[0]["image"]).parent == toy_csv.parent / "volumes"  # resolved against the CSV's folder
    assert detect_kind(toy_csv) == "toy_csv" and read_records(toy_csv) == recs
    assert detection_order()[:4] == ["manifest", "m3d_cap", "m3d_vqa", "ct_rate"] and "toy_csv" in detection_order()
    assert DatasetFormat.read(DATASETS.build("toy_csv"), toy_csv) == recs
    # the generic validation applies to the toy format too: a bad row names its line
    toy_csv.write_text(toy_csv.read_text() + "x,volumes/none.nii.gz,Q?,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"toy\.csv line 6.*'answer'"):
        read_records(toy_csv, kind="toy_csv")
    assert len(read_records(toy_csv, kind="toy_csv", skip_bad_records=True)) == 4
    with pytest.raises(ValueError, match="split applies"):
        read_records(toy_csv, kind="toy_csv", split="train")


def test_in_test_registration_needs_no_plugins_entry(toy_csv: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from medvlm3d.train.data import read_train_records

    cfg = _cfg(tiny_tokenizer_dir, toy_csv, tmp_path / "run")
    assert not to_dict(cfg).get("plugins")  # nothing names the module that registered toy_csv
    TOY_READS.clear()
    assert [r["id"] for r in read_train_records(cfg)] == [r["id"] for r in read_records(toy_csv)]
    assert TOY_READS and TOY_READS[0] == toy_csv


def test_toy_format_trains_and_toy_metric_evaluates(toy_csv: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from medvlm3d.train.recipe import run_training

    TOY_READS.clear()
    cfg = _cfg(tiny_tokenizer_dir, toy_csv, tmp_path / "run", "train.batch_size=2", "eval.max_new_tokens=4",
               "eval.metrics={vqa_open: [toy_exact_match]}")
    final = run_training(cfg)
    assert TOY_READS == [toy_csv]  # training read its data through the toy format
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in s for s in steps)

    model = load_pretrained(final)
    assert model.cfg.eval.metrics == {"vqa_open": ["toy_exact_match"]}  # saved with the checkpoint
    recs = read_records(toy_csv, kind="toy_csv")
    TOY_SEEN.clear()
    res = evaluate(model, recs, "vqa_open", batch_size=2, out_dir=tmp_path / "eval", progress=False, meteor=False)
    assert set(res["metrics"]) == {"toy_exact_match", "toy_pred_chars"}  # eval.metrics replaced the default list
    assert res["protocol"]["protocol"] == "m3d_vqa_open"  # beside the task's protocol
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert TOY_SEEN == [[r["id"] for r in rows]] == [[r["id"] for r in recs]]
    exact = sum(r["prediction"].strip() == r["reference"].strip() for r in rows) / len(rows)
    assert res["metrics"]["toy_exact_match"] == pytest.approx(exact)
    assert res["metrics"]["toy_pred_chars"] == pytest.approx(sum(len(r["prediction"]) for r in rows) / len(rows))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == res["metrics"]


def test_toy_metric_values_and_merge_with_builtin() -> None:
    recs = [{"id": "a", "question_type": "Organ"}, {"id": "b"}, {"id": "c"}]
    out = score_task("vqa_closed", [" A. liver ", "B. heart", "C"], ["A. liver", "B. lung", "C. yes"], recs,
                     metrics={"vqa_closed": ["closed_vqa_accuracy", "toy_exact_match"]})
    assert out["toy_exact_match"] == pytest.approx(1 / 3) and out["toy_pred_chars"] == pytest.approx((10 + 8 + 1) / 3)
    assert out["accuracy"] == pytest.approx(2 / 3)  # "A." and "B." are in their predictions, "C." is not
    assert out["by_type"]["Organ"]["accuracy"] == 1.0
    assert TASK_METRICS["vqa_closed"] == ()  # the default is untouched (the protocol scores closed VQA)


def test_unknown_kind_and_metric_are_clear_errors(toy_csv: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from medvlm3d.train.data import read_train_records

    for call in (lambda: read_records(toy_csv, kind="toy_cvs"),
                 lambda: read_train_records(_cfg(tiny_tokenizer_dir, toy_csv, tmp_path, "data.kind=toy_cvs"))):
        with pytest.raises(ConfigError, match=r"data\.kind must be one of \['auto', .*'ct_rate'.*'manifest'.*"
                                              r"'toy_csv'\], got 'toy_cvs'"):
            call()
    other = toy_csv.with_name("other.csv")
    other.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"other\.csv is; supported kinds: manifest .*ct_rate .*toy_csv"):
        read_records(other)
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) \['exact'\]; registered: \[.*'m3d'.*'toy_exact_match'"):
        score_task("vqa_open", ["a"], ["a"], [{"id": "x"}], metrics={"vqa_open": ["exact"]})
    with pytest.raises(ConfigError, match=r"eval\.metrics: unknown task\(s\) \['vqa'\]"):
        score_task("vqa_open", ["a"], ["a"], [{"id": "x"}], metrics={"vqa": ["toy_exact_match"]})
    with pytest.raises(ConfigError, match="both report 'toy_exact_match'"):
        score_task("vqa_open", ["a"], ["a"], [{"id": "x"}], metrics={"vqa_open": ["toy_exact_match"] * 2})
    with pytest.raises(ValueError, match="already registered"):
        METRICS.register("toy_exact_match")(toy_exact_match)
