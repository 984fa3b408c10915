"""Benchmark runner: records -> batched generation -> predictions.jsonl + metrics.json + a table.

    evaluate(model, records, task, batch_size=8, limit=None, out_dir=None, progress=True,
             meteor=True, *, blind=False, seed=0, max_new_tokens=None, ...) -> dict
        {"task", "n", "blind", "metrics": {...}, "tgis_slice_mass": {...} | None}
    `medvlm3d eval --checkpoint DIR --data SRC --task report|vqa_closed|vqa_open|classify
                   [--kind auto] [--split S] [--limit N] [--batch-size B] [--out DIR] [--no-meteor]
                   [--blind] [--protocol standard|voteMI ...] [--device-map auto]`

Records per task (`task_records`): report -> task "report"; vqa_closed -> VQA with choices;
vqa_open -> VQA records without choices when there are any (the phantoms hold each question in
both forms), else every VQA record asked open; classify -> records with a `label`, asked as a
closed question whose choices are the sorted label set of all the task's records
(`classify_record`); `limit` keeps the first N records of the task. Prompts and
references come from `data/prompts.format_record` through `data/dataset.StudyDataset` (the
training path: same prompt text, same volume loading with the record's CT rescale, same
`slice_targets`, same data-side slice selection). Generation is `generate_batch` (greedy,
`cfg.eval`) on the samples' own image tensors, the path `model.generate` takes too.

Protocol: each task's predictions are scored under a registered protocol (eval/protocols.py;
TASK_PROTOCOL: report -> m3d_cap, vqa_closed -> m3d_vqa_closed, vqa_open -> m3d_vqa_open,
classify -> none; `protocol=` picks another) by eval/score.py's `score_predictions`, the code
`medvlm3d score` runs on a predictions file: result["protocol"] is its summary, per_sample.jsonl
its per-sample rows, so `medvlm3d score` on this run's predictions.jsonl gives the same numbers.

Metrics: the registered metrics (eval/metrics/) named per task in TASK_METRICS, or in the run
config's `eval.metrics` ({task: [names]}, replacing that task's list), merged in order, for what
the protocol does not report. By default: report -> COCO-caption metrics ("coco"),
and clinical efficacy with the "phantom" extractor when every record carries phantom ground
truth (`labels.lesion` and `meta.n_lesions`) or "ct_rate" when every record carries the 18
CT-RATE `labels` ("clinical_efficacy": extracted from generated vs reference reports; for
CT-RATE also "labels_prf": extracted from generated reports vs the dataset's 18 labels);
vqa_closed and vqa_open -> none (the protocol has them); classify ->
`classification_metrics` (a prediction names the label whose "<letter>." appears first, else
whose text appears first; "unparsed" counts the rest; no scores, so no AUROC).

TG-IS slice mass: for records with `slice_labels` and a model with TG-IS scores, the score mass
on the true slices of the (first) image, labels mapped to the model's slices by
`data/dataset.slice_targets`; reported with the mass a uniform scorer would give and how often
the top-scored slice is a true one.

Image-blind control (`blind=True`): each record gets another study's volume through a
deterministic derangement of the distinct images (`blind_partners`: no record keeps its own
image); same prompts, same metrics; no slice mass (the labels belong to the other image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.io import atomic_write_text

from .metrics.base import run_metrics
from .metrics.classify import NO_LABEL, parse_choice, report_extractor  # noqa: F401  (eval/fewshot.py, tests)


@dataclass
class EvalConfig:
    """The `eval:` section: generation settings of the benchmark runner."""

    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    bertscore_model: str = ""  # a local model folder (roberta-large for evaluate's lang="en"); "" = skipped
    bertscore_layers: int = 0  # hidden layer; 0 = bert_score's table for the model (roberta-large: 17)
    bertscore_rescale: bool = False  # bert-score's baseline rescaling (off, as evaluate's default)
    ctrate_classifier: str = ""  # protocol ctrate_ce: a local CT-RATE label classifier folder; "" = keywords
    # {task: [metric names]} replacing TASK_METRICS for that task; names are registered in
    # eval/metrics/ (checked when scoring: plugins may add one)
    metrics: dict[str, list[str]] = field(default_factory=dict)


log = logging.getLogger(__name__)

TASKS = ("report", "vqa_closed", "vqa_open", "classify")
PROMPT_TASK = {"report": "report", "vqa_closed": "vqa_closed", "vqa_open": "vqa_open", "classify": "vqa_closed"}
# The registered metrics (eval/metrics/) each task reports, merged in this order; `eval.metrics`
# in the run config ({task: [names]}) replaces a task's list.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "report": ("coco", "clinical_efficacy", "labels_prf"),
    "vqa_closed": (),
    "vqa_open": (),
    "classify": ("classification",),
}
# The protocol (eval/protocols.py) each task is scored under, through eval/score.py.
TASK_PROTOCOL: dict[str, str | None] = {"report": "m3d_cap", "vqa_closed": "m3d_vqa_closed",
                                        "vqa_open": "m3d_vqa_open", "classify": None}
HEADLINE = {"report": ("protocol", "metrics", "bleu1"), "vqa_closed": ("protocol", "metrics", "closed_vqa_accuracy"),
            "vqa_open": ("protocol", "metrics", "bleu1"), "classify": ("metrics", "accuracy")}
LABEL_QUESTION = "Which label best describes this scan?"
LETTERS = "ABCDEFGHIJ"
_RESCALE_KEYS = ("rescale_slope", "rescale_intercept", "RescaleSlope", "RescaleIntercept", "slope", "intercept")


# ------------------------------------------------------------------------------ record choice


def task_records(records: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The records that `task` evaluates (see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "report":
        return [r for r in records if r.get("task") == "report"]
    if task == "classify":
        return [r for r in records if r.get("label") not in (None, "")]
    vqa = [r for r in records if r.get("task") == "vqa"]
    if task == "vqa_closed":
        return [r for r in vqa if r.get("choices")]
    open_form = [r for r in vqa if not r.get("choices")]
    return open_form or vqa


def label_set(records: Sequence[dict[str, Any]]) -> list[str]:
    """Sorted distinct `label` values: the choices of the classification question (2..10)."""
    labels = sorted({str(r["label"]) for r in records if r.get("label") not in (None, "")})
    if not 2 <= len(labels) <= len(LETTERS):
        raise DataError(f"classification needs 2 to {len(LETTERS)} distinct record labels, got {labels}")
    return labels


def classify_record(rec: dict[str, Any], labels: Sequence[str], question: str = LABEL_QUESTION) -> dict[str, Any]:
    """A closed VQA record asking for `rec["label"]` among `labels` (choices in that order)."""
    label = str(rec.get("label", ""))
    if label not in labels:
        raise DataError(f"record {rec.get('id')!r}: label {label!r} is not one of {list(labels)}")
    return {**rec, "task": "vqa", "question": question, "answer": label, "choices": list(labels),
            "answer_choice": LETTERS[list(labels).index(label)], "question_type": "label"}


def image_key(rec: dict[str, Any]) -> str:
    return json.dumps(rec["image"])


def blind_partners(records: Sequence[dict[str, Any]], seed: int = 0) -> list[int]:
    """For each record, the index of a record whose image it borrows: the distinct images are
    shuffled (seeded) and each maps to the next one in a cycle, so no record keeps its image."""
    keys = [image_key(r) for r in records]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) < 2:
        raise DataError(f"the image-blind control needs at least 2 distinct images, got {len(first)}")
    order = random.Random(seed).sample(sorted(first), len(first))
    nxt = {k: order[(j + 1) % len(order)] for j, k in enumerate(order)}
    return [first[nxt[k]] for k in keys]


def _blind_record(rec: dict[str, Any], donor: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (rec.get("meta") or {}).items() if k not in _RESCALE_KEYS}
    meta.update({k: v for k, v in (donor.get("meta") or {}).items() if k in _RESCALE_KEYS})
    out = {**rec, "image": donor["image"], "meta": meta, "blind_donor": donor["id"]}
    out.pop("slice_labels", None)
    return out


# ------------------------------------------------------------------------------- generation


def eval_dataset(model: Any, records: Sequence[dict[str, Any]], prompt_task: str) -> Any:
    """StudyDataset over `records` with the model's data config, prompts formatted for `prompt_task`."""
    from medvlm3d.data.dataset import StudyDataset
    from medvlm3d.data.select.step import SelectionPlan

    cfg = dataclasses.replace(model.cfg.data, task=prompt_task, augment=False)
    plan = SelectionPlan.from_config(model.cfg.model, teacher=False)  # pre-selection, 2d_only picks
    return StudyDataset(records, cfg, model.tokenizer, model.num_visual_tokens, train=False, selection=plan)


def generate_samples(
    model: Any,
    samples: Sequence[dict[str, Any]],
    *,
    prompts: Sequence[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "eval",
    wrap: Callable[[list[int]], ContextManager[Any]] | None = None,
) -> Iterator[tuple[int, dict[str, Any], str, torch.Tensor | None]]:
    """(index, sample, generated text, TG-IS scores [S] or None) per sample, in batches; samples
    load lazily (a StudyDataset reads one batch at a time). `prompts` overrides the samples'
    questions; `wrap(batch indices)` gives a context entered around each batch's generation.
    The samples' own image tensors (sliced and selected on the data side) go to the model as
    they are: nothing is sliced twice."""
    from medvlm3d.model.generation import generate_batch, generation_batch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prompts is not None and len(prompts) != len(samples):
        raise ValueError(f"got {len(prompts)} prompts for {len(samples)} samples")
    with tqdm(total=len(samples), desc=desc, unit="study", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            idx = list(range(start, min(len(samples), start + batch_size)))
            batch = [samples[i] for i in idx]
            questions = [prompts[i] if prompts is not None else s["question"] for i, s in zip(idx, batch)]
            with wrap(idx) if wrap is not None else contextlib.nullcontext():
                gen = generate_batch(model, generation_batch(model, batch, questions), max_new_tokens=max_new_tokens)
            for j, i in enumerate(idx):
                yield i, batch[j], gen.text[j], gen.scores[j]
            bar.update(len(idx))


def true_slice_mass(scores: torch.Tensor, slice_target: torch.Tensor) -> dict[str, float] | None:
    """Mass of scores [S] on the slices where slice_target [S] is 1, the uniform scorer's mass,
    and whether the top-scored slice is a true one; None when the shapes differ or no target."""
    if scores is None or scores.shape != slice_target.shape or float(slice_target.sum()) <= 0:
        return None
    t = slice_target.float()
    return {"mass": float((scores.float() * t).sum()), "uniform": float(t.mean()),
            "top1_hit": float(t[int(torch.argmax(scores))] > 0)}


# ---------------------------------------------------------------------------------- metrics


def task_metric_names(task: str, overrides: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The metric names of `task`: `overrides[task]` (the config's `eval.metrics`) if given, else
    TASK_METRICS[task]; ConfigError naming the key for an unknown task or a malformed list."""
    overrides = overrides or {}
    unknown = [t for t in overrides if t not in TASKS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown task(s) {unknown}; expected a mapping of {list(TASKS)} "
                          "to metric names")
    names = overrides.get(task, TASK_METRICS[task])
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"eval.metrics.{task} must be a list of metric names, got {names!r}")
    return tuple(names)


def score_task(task: str, preds: list[str], refs: list[str], recs: list[dict[str, Any]], *, meteor: bool = True,
               coco_tokenizer: str = "ptb", bertscore_model: str | None = None,
               metrics: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """The registered metrics of `task` (`task_metric_names(task, metrics)`) for predictions vs
    references of records `recs`, merged into one dict."""
    return run_metrics(task_metric_names(task, metrics), preds, refs, list(recs), meteor=meteor,
                       coco_tokenizer=coco_tokenizer, bertscore_model=bertscore_model, **options)


def headline(result: dict[str, Any]) -> tuple[str, float]:
    """(name, value) of the task's main number, e.g. ("closed_vqa_accuracy", 0.62) for vqa_closed
    (from the default protocol's summary; ConfigError when the run used another protocol)."""
    value: Any = result
    path = HEADLINE[result["task"]]
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"eval result of task {result['task']!r} has no {'/'.join(path)} (protocol "
                              f"{(result.get('protocol') or {}).get('protocol')!r})")
        value = value[key]
    return path[-1], float(value)


# ---------------------------------------------------------------------------------- evaluate


def evaluate(
    model: Any,
    records: Sequence[dict[str, Any]],
    task: str,
    batch_size: int = 8,
    limit: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    meteor: bool = True,
    *,
    blind: bool = False,
    seed: int = 0,
    max_new_tokens: int | None = None,
    label_question: str = LABEL_QUESTION,
    coco_tokenizer: str = "ptb",
    protocol: str | None = "auto",
) -> dict[str, Any]:
    """Run `task` over `records` (see the module docstring); writes predictions.jsonl, metrics.json
    and (with a protocol) per_sample.jsonl into `out_dir` when given. `protocol`: "auto" =
    TASK_PROTOCOL[task], None = none, or a registered name. Returns {"task", "n", "blind",
    "metrics", "protocol" (summary or None), "tgis_slice_mass"}."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    every = task_records(records, task)
    recs = every[:limit]
    if not recs:
        raise DataError(f"no records for task {task!r} among {len(records)} records")
    items = [classify_record(r, label_set(every), label_question) for r in recs] if task == "classify" else list(recs)
    if blind:
        items = [_blind_record(it, items[d]) for it, d in zip(items, blind_partners(items, seed))]
    ds = eval_dataset(model, items, PROMPT_TASK[task])
    rows: list[dict[str, Any]] = []
    masses: list[dict[str, float]] = []
    for i, sample, text, scores in generate_samples(model, ds, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                    progress=progress, desc=f"eval {task}{' blind' if blind else ''}"):
        row = {"id": sample["id"], "prompt": sample["question"], "prediction": text, "reference": sample["target"],
               "slice_scores": None if scores is None else [round(float(s), 6) for s in scores],
               "question_type": items[i].get("question_type")}
        if blind:
            row["image_from"] = items[i]["blind_donor"]
        if task == "classify":
            row["label"], row["predicted_label"] = items[i]["answer"], parse_choice(text, items[i]["choices"])
        if not blind and bool(sample["has_slice_target"][0]):
            mass = true_slice_mass(scores, sample["slice_target"][0])
            if mass is not None:
                row["slice_mass"] = mass["mass"]
                masses.append(mass)
        rows.append(row)
    ecfg = model.cfg.eval
    options = dict(coco_tokenizer=coco_tokenizer, bertscore_model=ecfg.bertscore_model or None,
                   bertscore_layers=ecfg.bertscore_layers or None, bertscore_rescale=ecfg.bertscore_rescale, device=str(model.device))
    metrics = score_task(task, [r["prediction"] for r in rows], [r["reference"] for r in rows], items, meteor=meteor,
                         metrics=getattr(ecfg, "metrics", None), **options)
    name = TASK_PROTOCOL[task] if protocol == "auto" else protocol
    summary, per_sample = None, []
    if name:
        from .score import score_predictions  # eval/score.py imports this module

        summary, per_sample = score_predictions(name, {r["id"]: r["prediction"] for r in rows}, items,
                                                ctrate_classifier=ecfg.ctrate_classifier or None, **options)
    mass_summary = None
    if masses:
        mass_summary = {k: sum(m[k] for m in masses) / len(masses) for k in ("mass", "uniform", "top1_hit")}
        mass_summary["n"] = len(masses)
    result = {"task": task, "n": len(rows), "blind": blind, "metrics": metrics, "protocol": summary,
              "tgis_slice_mass": mass_summary}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        if summary is not None:
            from .score import write_per_sample

            write_per_sample(out / "per_sample.jsonl", per_sample)
        log.info("wrote %s and %s", out / "predictions.jsonl", out / "metrics.json")
    return result


# ------------------------------------------------------------------------------------ tables


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Plain-text table, columns left-aligned and padded to their widest cell; floats as 0.1234."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else ("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[j]) for r in cells)) for j, h in enumerate(headers)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if k in ("per_label", "labels") or isinstance(v, (list, tuple)):
            continue
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def metrics_table(result: dict[str, Any]) -> str:
    """The protocol's and the other metrics of an `evaluate` result as a two-column table
    (per-label details left out), then the protocol's notes."""
    summary = result.get("protocol")
    rows = list(_flatten(summary["metrics"])) if summary else []
    rows += list(_flatten(result["metrics"]))
    if result.get("tgis_slice_mass"):
        rows += [(f"tgis_slice_mass/{k}", v) for k, v in result["tgis_slice_mass"].items()]
    title = f"eval {result['task']}: {result['n']} records{' (image-blind control)' if result['blind'] else ''}"
    if summary:
        title += f"; protocol {summary['protocol']} ({summary['aggregation']})"
    notes = "".join(f"\nnote: {n}" for n in (summary or {}).get("notes", []))
    return title + "\n" + format_table(rows, ["metric", "value"]) + notes


# ------------------------------------------------------------------------------ command line


def read_eval_records(source: str, cfg: Any, task: str, kind: str = "auto", split: str | None = None) -> list[dict]:
    """read_records with the checkpoint's data config; VQA tasks fix `vqa_mode` (M3D-VQA)."""
    from medvlm3d.data.readers import read_records, resolve_source

    if split is None:  # data.eval_split, for a multi-split source only
        kind, split = resolve_source(source, kind, cfg.eval_split or None, train=False)
    vqa_mode = {"vqa_closed": "closed", "vqa_open": "open"}.get(task, cfg.vqa_mode)
    return read_records(source, kind, data_root=cfg.data_root or None, split=split, vqa_mode=vqa_mode,
                        ct_rate_target=cfg.ct_rate_target, skip_bad_records=cfg.skip_bad_records,
                        allow_outside_root=cfg.allow_outside_root)
