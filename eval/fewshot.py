"""Zero-/few-shot classification under BrainMD's Vote-MI protocol (NeurIPS 2024).

The VLM answers a label question (closed; the sorted label set as choices, `runner.classify_record`)
seeing only selected slices, at 0 and a few in-context shots; the rows sit side by side as in the
paper's table:

    row         slices the model sees                 in-context examples ("annotated" once)
    random      k random slices per plane             a seeded random sample of the support set
    vote_mi     the k Vote-MI slices per plane        vote-k's picks over the support set
    tgis        all slices, weighted by TG-IS         vote-k's picks (only for a model with TG-IS)
  with cross=True also random slices + vote-k examples and Vote-MI slices + random examples, which
  separate what slice selection and example selection each add.

    fewshot_table(model, records, support=None, k_slices=None, shots=(0, 2), seed=0, cross=False, ...) -> rows
        row = {"selection", "slices", "examples": "random" | "vote_k", "annotated": [support ids],
               "n", "kept_slices": [slices seen per record (None = all)],
               "accuracy": {"<s>-shot": float}, "balanced_accuracy": {...}, "unparsed": {...}}
    format_fewshot_table(rows) -> str  (the gain over random in points, and PAPER_NOTE)
    `medvlm3d eval --task classify --protocol voteMI [--k-slices K] [--shots 0 2] [--support SRC]`

Only the selected slices (random / Vote-MI rows). `keep_slices` asks a registered selector
(data/select/: "random" seeded per (seed, sample index), or "votek" with the model's `vote_mi.k`
neighbours) for k picks per plane, and `restrict_sample` cuts the sample to them on the data side:
  - the slice branch sees only them (their own positions and planes);
  - a 2d_only model (`brainmd_votemi`) takes all of them as its picks: k x planes must equal
    `vote_mi.num_picks` (k_slices=None derives k from it);
  - a model with a 3D branch (2e3, 3d_only) gets the volume with every voxel outside the kept
    slices set to 0 (`volume_mask`: the voxel plane at each kept slice's position), so the 3D
    tokens carry nothing of the other slices: the row isolates slice selection.
A plane with fewer than k slices repeats its picks.

Few-shot. Vote-k chooses ONCE which support studies to annotate (`annotate_support`: vote-k's
greedy picks over study embeddings, "encoder": mean 3D-encoder token, or mean pooled slice
feature without a 3D encoder; "intensity": Vote-MI intensity statistics); the random row annotates
a seeded random sample instead. Every query takes the first `shots` annotated studies (in pick
order), skipping one that shares its image (leave-one-out when the support is `records`). Each
example carries its image, restricted like the query's (same row, same k), and its label: the
prompt holds the examples' images then the query's (data/prompts.py puts n_images placeholders
first), and its text names them in order: "Images 1-n are examples; image n+1 is the question's.
/ Image 1: <question> Answer: <letter>. <label> / ... / Image n+1: <question>".
"""

from __future__ import annotations

import dataclasses
import logging
import random
import warnings
from typing import Any, Sequence

import torch

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.data.select import build_selector
from medvlm3d.data.select.step import SelectionPlan, restrict, series_ids
from medvlm3d.data.select.votek import intensity_features, vote_k

from .runner import (LABEL_QUESTION, NO_LABEL, classify_record, eval_dataset, format_table, generate_samples,
                     image_key, label_set, parse_choice, task_records)

log = logging.getLogger(__name__)

ROWS = (("random", "random"), ("vote_mi", "vote_k"), ("tgis", "vote_k"))  # (slices, how the support is annotated)
CROSS = (("random", "vote_k"), ("vote_mi", "random"))
_SELECTORS = {"random": "random", "vote_mi": "votek"}  # registered selectors (data/select/)
EMBEDDINGS = ("encoder", "intensity")
_IMAGE_KEYS = ("volume", "slices", "slice_plane", "slice_index", "slice_pos", "slice_target", "teacher",
               "slice_keep", "slice_context", "has_slice_target")
PAPER_NOTE = ("differs from BrainMD: the VLM is this checkpoint, trained by this package (the paper prompts "
              "existing 2D VLMs); the protocol (slice selection, vote-k annotation once, examples with their "
              "slices and labels) is the paper's")


# ------------------------------------------------------------------------------- slice subsets


def keep_slices(model: Any, sample: dict[str, Any], selection: str, k: int, index: int, seed: int = 0) -> torch.Tensor:
    """keep [n_img, k * planes] long: the registered selector's k picks per plane of each image
    ("random": seeded by (seed, index), never the global RNG; "vote_mi": the `votek` selector)."""
    if k < 1:
        raise ValueError(f"k must be >= 1 slice per plane, got {k}")
    cfg = dataclasses.replace(model.cfg.model.vote_mi, seed=seed, teacher="off")
    rows = []
    for i in range(sample["slices"].shape[0]):
        plane = sample["slice_plane"][i]
        sel = build_selector(_SELECTORS[selection], cfg, k * len(set(plane.tolist())))
        rows.append(sel(sample["slices"][i], plane, None, index).keep)
    return torch.stack(rows)


def volume_mask(sample: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """[n_img, 1, D, H, W] bool: the voxel plane of each kept slice (plane 0/1/2 = axis D/H/W, at
    floor(slice_pos x axis length))."""
    vol = sample["volume"]
    mask = torch.zeros(vol.shape, dtype=torch.bool)
    for i in range(vol.shape[0]):
        for j in keep[i].tolist():
            axis = 2 + int(sample["slice_plane"][i, j])
            length = vol.shape[axis]
            at: list[Any] = [i, 0, slice(None), slice(None), slice(None)]
            at[axis] = min(length - 1, int(float(sample["slice_pos"][i, j]) * length))
            mask[tuple(at)] = True
    return mask


def slices_per_plane(model: Any, k_slices: int | None) -> int:
    """k: given, or for a 2d_only model vote_mi.num_picks / planes (ConfigError when they disagree)."""
    planes = len(model.cfg.data.planes)
    picks = model.cfg.model.vote_mi.num_picks
    if model.variant == "2d_only":
        if k_slices is None and picks % planes == 0:
            return picks // planes
        if k_slices is None or k_slices * planes != picks:
            raise ConfigError(f"--k-slices: a 2d_only model sees model.vote_mi.num_picks={picks} slices, so k per "
                              f"plane x {planes} plane(s) must equal it; got k={k_slices}")
    return 3 if k_slices is None else int(k_slices)


def restrict_sample(model: Any, sample: dict[str, Any], keep: torch.Tensor, index: int = 0) -> dict[str, Any]:
    """The sample cut to its kept slices, seen only through them (module docstring)."""
    out = restrict(sample, keep, SelectionPlan.from_config(model.cfg.model, teacher=False), index)
    if model.variant == "2d_only":
        n = int(keep.shape[1])
        if n != model.cfg.model.vote_mi.num_picks:
            raise ConfigError(f"a 2d_only model sees vote_mi.num_picks={model.cfg.model.vote_mi.num_picks} "
                              f"slices; {n} were kept")
        out["slice_keep"] = torch.arange(n).expand(keep.shape[0], n).clone()
    if model.encoder3d is not None:
        out["volume"] = sample["volume"] * volume_mask(sample, keep)
    return out


# ----------------------------------------------------------------------------------- few-shot


@torch.no_grad()
def study_embeddings(model: Any, samples: Sequence[dict[str, Any]], kind: str = "encoder") -> torch.Tensor:
    """[N, F] float32 embedding of each sample's first image (see the module docstring)."""
    if kind not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {kind!r}")
    out = []
    dev = model.device
    dtype = model.width_dtype if dev.type != "cpu" else torch.float32
    for s in samples:
        if kind == "intensity":
            f = intensity_features(s["slices"][0])
            out.append(torch.cat([f.abs().mean(0), f.std(0)]))
        elif model.encoder3d is not None:
            out.append(model.encoder3d(s["volume"][:1].to(dev, dtype)).float().mean(dim=(0, 1)).cpu())
        else:
            sl = s["slices"][:1].to(dev)
            out.append(model.slice_encoder.pooled(sl, torch.ones(sl.shape[:2], dtype=torch.bool, device=dev))
                       .float().mean(dim=(0, 1)).cpu())
    return torch.stack(out).float()


def annotate_support(emb: torch.Tensor, budget: int, how: str = "vote_k", seed: int = 0, k: int = 3) -> list[int]:
    """Indices of the `budget` support studies to annotate, chosen once from emb [M, F]: "vote_k"
    = vote-k's greedy picks (representative and diverse, in pick order), "random" = seeded sample."""
    m = int(emb.shape[0])
    if not 1 <= budget <= m:
        raise DataError(f"few-shot: {budget} support studies to annotate, the support set has {m}")
    if how == "random":
        return random.Random(seed).sample(range(m), budget)
    if how != "vote_k":
        raise ValueError(f"how must be 'vote_k' or 'random', got {how!r}")
    return vote_k(emb, k=max(1, min(k, m - 1)), num_picks=budget).picks if m > 1 else [0]


def examples_for(query_image: str, annotated: Sequence[int], support_images: Sequence[str], shots: int) -> list[int]:
    """The first `shots` annotated support studies whose image is not the query's."""
    out = [j for j in annotated if support_images[j] != query_image][:shots]
    if len(out) < shots:
        raise DataError(f"few-shot: {shots} examples asked for, only {len(out)} annotated studies available")
    return out


def fewshot_prompt(examples: Sequence[tuple[str, str]], question: str) -> str:
    """The question after its examples, each named by its image (module docstring); no examples:
    the question alone."""
    n = len(examples)
    if not n:
        return question
    lines = [f"Images 1-{n} are examples; image {n + 1} is the question's." if n > 1 else
             "Image 1 is an example; image 2 is the question's."]
    lines += [f"Image {i + 1}: {q} Answer: {a}" for i, (q, a) in enumerate(examples)]
    return "\n".join(lines + [f"Image {n + 1}: {question}"])


def with_examples(query: dict[str, Any], examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The query sample with the examples' images before its own (image tensors concatenated)."""
    if not examples:
        return query
    parts = [*examples, query]
    out = dict(query)
    for key in _IMAGE_KEYS:
        if not all(key in p for p in parts):
            out.pop(key, None)
            continue
        if key not in ("volume", "has_slice_target") and len({p[key].shape[1:] for p in parts}) > 1:
            raise DataError(f"few-shot: record {query.get('id')!r} and its examples differ in slice count "
                            f"({[tuple(p[key].shape) for p in parts]}); use data.num_slices > 0")
        out[key] = torch.cat([p[key] for p in parts])
    if "slices" in out:  # each image is its own series: its position in the combined record
        out["slice_series"] = series_ids(*out["slices"].shape[:2])
    return out


# -------------------------------------------------------------------------------------- table


def fewshot_table(
    model: Any,
    records: Sequence[dict[str, Any]],
    support: Sequence[dict[str, Any]] | None = None,
    k_slices: int | None = None,
    shots: Sequence[int] = (0, 2),
    seed: int = 0,
    *,
    batch_size: int = 8,
    embedding: str = "encoder",
    max_new_tokens: int | None = None,
    label_question: str = LABEL_QUESTION,
    progress: bool = False,
    cross: bool = False,
) -> list[dict[str, Any]]:
    """Rows for random / Vote-MI / TG-IS slices, accuracies at each shot count (module docstring)."""
    from .metrics import classification_metrics

    if (k_slices is not None and k_slices < 1) or not shots or any(s < 0 for s in shots):
        raise ValueError(f"need k_slices >= 1 and shots >= 0, got k_slices={k_slices}, shots={shots}")
    k = slices_per_plane(model, k_slices)
    recs = task_records(records, "classify")
    sup = task_records(support, "classify") if support is not None else recs
    if not recs:
        raise DataError("few-shot protocol: no records with a 'label'")
    labels = label_set(list(recs) + list(sup))
    samples = list(eval_dataset(model, [classify_record(r, labels, label_question) for r in recs], "vqa_closed"))
    sup_samples = samples if support is None else list(
        eval_dataset(model, [classify_record(r, labels, label_question) for r in sup], "vqa_closed"))
    sup_images = [image_key(s["record"]) for s in sup_samples]
    annotated: dict[str, list[int]] = {"random": [], "vote_k": []}
    if max(shots):
        budget = min(len(sup_samples), max(shots) + (1 if support is None else 0))  # one spare: leave-one-out
        emb = study_embeddings(model, sup_samples, embedding)
        annotated = {h: annotate_support(emb, budget, h, seed, model.cfg.model.vote_mi.k) for h in annotated}
    rows = [_row(model, sel, how, samples, sup_samples, sup_images, annotated[how], k, shots, seed, labels,
                 batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, metrics=classification_metrics)
            for sel, how in ROWS + (CROSS if cross else ()) if sel != "tgis" or model.tgis is not None]
    if model.tgis is None:
        log.info("few-shot protocol: no TG-IS in a %s model, no tgis row", model.variant)
    return rows


def _row(model: Any, sel: str, how: str, samples: list[dict], sup_samples: list[dict], sup_images: list[str],
         annotated: list[int], k: int, shots: Sequence[int], seed: int, labels: list[str], *, batch_size: int,
         max_new_tokens: int | None, progress: bool, metrics: Any) -> dict[str, Any]:
    """One row: the queries and their examples seen through `sel`'s slices, at each shot count."""
    def seen(sample: dict[str, Any], index: int) -> tuple[dict[str, Any], int | None]:
        if sel == "tgis":
            return sample, None
        keep = keep_slices(model, sample, sel, k, index, seed)
        return restrict_sample(model, sample, keep, index), int(keep[0].unique().numel())

    queries = [seen(s, i) for i, s in enumerate(samples)]
    offset = 0 if sup_samples is samples else len(samples)  # a separate support set: its own random seeds
    ex_seen = {j: queries[j][0] if offset == 0 else seen(sup_samples[j], offset + j)[0] for j in annotated}
    row: dict[str, Any] = {
        "selection": sel, "slices": "all (TG-IS)" if sel == "tgis" else f"{k} per plane",
        "examples": how, "annotated": [sup_samples[j]["id"] for j in annotated], "n": len(samples),
        "kept_slices": [q[1] for q in queries], "accuracy": {}, "balanced_accuracy": {}, "unparsed": {}}
    y_true = [s["record"]["answer"] for s in samples]
    for n_shots in shots:
        inputs, prompts = [], []
        for s, (q, _) in zip(samples, queries):
            ex = examples_for(image_key(s["record"]), annotated, sup_images, n_shots) if n_shots else []
            inputs.append(with_examples(q, [ex_seen[j] for j in ex]))
            prompts.append(fewshot_prompt([(sup_samples[j]["question"], sup_samples[j]["target"]) for j in ex],
                                          s["question"]))
        preds = [""] * len(samples)
        for i, _, text, _ in generate_samples(model, inputs, prompts=prompts, batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, progress=progress,
                                              desc=f"{sel} {n_shots}-shot"):
            preds[i] = text
        y_pred = [parse_choice(p, labels) or NO_LABEL for p in preds]
        with warnings.catch_warnings():  # NO_LABEL is not a true class; "unparsed" counts it
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            m = metrics(y_true, y_pred, labels=labels)
        key = f"{n_shots}-shot"
        row["accuracy"][key], row["balanced_accuracy"][key] = m["accuracy"], m["balanced_accuracy"]
        row["unparsed"][key] = sum(y == NO_LABEL for y in y_pred)
    return row


def format_fewshot_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table: accuracy and balanced accuracy per shot count, and the gain in
    accuracy points over the random row; then what differs from the paper."""
    keys = list(rows[0]["accuracy"])
    base = next((r for r in rows if (r["selection"], r["examples"]) == ROWS[0]), rows[0])["accuracy"]
    headers = ["slices", "seen", "examples"] + [f"{k} {m}" for k in keys for m in ("acc", "bal.acc", "gain")]
    body = [[r["selection"], r["slices"], r["examples"]] + [x for k in keys for x in (
        r["accuracy"][k], r["balanced_accuracy"][k], f"{100 * (r['accuracy'][k] - base[k]):+.1f}")] for r in rows]
    return (f"Vote-MI protocol: label question on {rows[0]['n']} studies (gain: accuracy points over random)\n"
            + format_table(body, headers) + f"\nnote: {PAPER_NOTE}")
