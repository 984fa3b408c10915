"""Zero-/few-shot classification under the Vote-MI protocol (BrainMD, NeurIPS 2024).

The VLM answers a label question (closed; the sorted label set as choices, `runner.classify_record`)
while seeing (a) k random slices, (b) the k Vote-MI slices, (c) all slices weighted by TG-IS, at
0 and at a few in-context shots; the rows sit side by side as in the Vote-MI paper's table.

    fewshot_table(model, records, support=None, k_slices=3, shots=(0, 2), seed=0, ...) -> rows
        row = {"selection": "random" | "vote_mi" | "tgis", "slices": str, "n": int,
               "kept_slices": [kept slices per record (None = all)],
               "accuracy": {"<s>-shot": float}, "balanced_accuracy": {...}, "unparsed": {...}}
    format_fewshot_table(rows) -> str  (with the gain over random slices in points)
    `medvlm3d eval --task classify --protocol voteMI [--k-slices 3] [--shots 0 2] [--support SRC]`

Slice restriction with a 2E3 model, on the data side: `keep_slices` asks a registered selector
(data/select/: "random" seeded per (seed, sample index), or "votek" with the model's `vote_mi.k`
neighbours) for k picks per plane, and `restrict_sample` cuts the sample to those slices (with
their own positions and planes), so the slice encoder sees only them and TG-IS weighs only them.
The 3D branch still sees the whole volume, so (a)/(b) measure what slice choice adds on top of
the 3D tokens, not a 2D-only VLM. A plane with fewer than k slices repeats its picks. (c) is the normal model. A 3d_only model ignores slices: its three rows
are the same run three times (logged). A 2d_only model picks its Vote-MI slices among the kept ones.

Few-shot. For each query, `retrieve_examples` takes the labelled support studies nearest in an
embedding space (cosine; "encoder": the mean 3D-encoder token of the volume, or the mean pooled
slice-encoder feature without a 3D encoder; "intensity": mean |x| and std over slices of the
Vote-MI intensity features), never the query's own image, narrows them to 4 x shots, and picks
`shots` of them representative and diverse with vote-k (`model.vote_mi.vote_k`), ordered so the
most similar comes last. They enter the prompt as text only, one line each before the question:
"Example: <question> Answer: <answer>". The tiny LLM takes one image per prompt (and the 2E3
token budget is per image), so the examples' images are not shown; the examples carry the
answer format and the label prior of similar studies. TG-IS reads its text vector from the
whole prompt, examples included. Without a `support` set, the other studies of `records` are
the support (leave-one-out by image).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from medvlm3d.data.errors import DataError
from medvlm3d.data.select import build_selector
from medvlm3d.data.select.step import SelectionPlan, restrict
from medvlm3d.data.select.votek import intensity_features, vote_k

from .runner import (LABEL_QUESTION, NO_LABEL, classify_record, eval_dataset, format_table, generate_samples,
                     label_set, parse_choice, task_records, image_key)

log = logging.getLogger(__name__)

SELECTIONS = ("random", "vote_mi", "tgis")
_SELECTORS = {"random": "random", "vote_mi": "votek"}  # registered selectors (data/select/)
EMBEDDINGS = ("encoder", "intensity")


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


def restrict_sample(model: Any, sample: dict[str, Any], keep: torch.Tensor, index: int = 0) -> dict[str, Any]:
    """The sample cut to its kept slices on the data side (the 2d_only picks chosen among them)."""
    return restrict(sample, keep, SelectionPlan.from_config(model.cfg.model, teacher=False), index)


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


def retrieve_examples(
    query: torch.Tensor, support: torch.Tensor, shots: int, exclude: torch.Tensor | None = None
) -> list[int]:
    """Indices of `shots` support rows for query [F] among support [M, F] (exclude [M] bool):
    the 4 x shots nearest by cosine, narrowed by vote-k; most similar last."""
    if shots < 1:
        return []
    sim = F.normalize(support.float(), dim=1) @ F.normalize(query.float(), dim=0)
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    n_ok = int(torch.isfinite(sim).sum())
    if n_ok < shots:
        raise DataError(f"few-shot: {shots} examples asked for, only {n_ok} support studies available")
    cand = torch.sort(sim, descending=True, stable=True).indices[: min(n_ok, 4 * shots)]
    if cand.numel() > shots:
        picks = vote_k(support[cand], k=min(3, cand.numel() - 1), num_picks=shots).picks
        cand = cand[torch.tensor(picks)]
    return [int(i) for i in sorted(cand.tolist(), key=lambda i: float(sim[i]))]


def example_prefix(examples: Sequence[tuple[str, str]]) -> str:
    """"Example: <question> Answer: <answer>" lines (each ending in a newline)."""
    return "".join(f"Example: {q} Answer: {a}\n" for q, a in examples)


# -------------------------------------------------------------------------------------- table


def fewshot_table(
    model: Any,
    records: Sequence[dict[str, Any]],
    support: Sequence[dict[str, Any]] | None = None,
    k_slices: int = 3,
    shots: Sequence[int] = (0, 2),
    seed: int = 0,
    *,
    batch_size: int = 8,
    embedding: str = "encoder",
    max_new_tokens: int | None = None,
    label_question: str = LABEL_QUESTION,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rows for random / Vote-MI / TG-IS slices, accuracies at each shot count (module docstring)."""
    from .metrics import classification_metrics

    if k_slices < 1 or not shots or any(s < 0 for s in shots):
        raise ValueError(f"need k_slices >= 1 and shots >= 0, got k_slices={k_slices}, shots={shots}")
    recs = task_records(records, "classify")
    sup = task_records(support, "classify") if support is not None else recs
    if not recs:
        raise DataError("few-shot protocol: no records with a 'label'")
    labels = label_set(list(recs) + list(sup))
    samples = list(eval_dataset(model, [classify_record(r, labels, label_question) for r in recs], "vqa_closed"))
    prompts: dict[int, list[str]] = {}
    if any(shots):
        sup_samples = samples if support is None else list(
            eval_dataset(model, [classify_record(r, labels, label_question) for r in sup], "vqa_closed"))
        q_emb, s_emb = study_embeddings(model, samples, embedding), study_embeddings(model, sup_samples, embedding)
        sup_keys = [image_key(r) for r in sup]
        for n_shots in shots:
            prompts[n_shots] = []
            for s, q in zip(samples, q_emb):
                exclude = torch.tensor([k == image_key(s["record"]) for k in sup_keys])
                chosen = retrieve_examples(q, s_emb, n_shots, exclude)
                pairs = [(sup_samples[j]["question"], sup_samples[j]["target"]) for j in chosen]
                prompts[n_shots].append(example_prefix(pairs) + s["question"])
    if model.variant == "3d_only":
        log.warning("few-shot protocol: a 3d_only model ignores slices; the three rows are the same run")
    y_true = [s["record"]["answer"] for s in samples]
    rows = []
    for sel in SELECTIONS:
        keeps = None if sel == "tgis" else [keep_slices(model, s, sel, k_slices, i, seed) for i, s in enumerate(samples)]
        seen = samples if keeps is None else [restrict_sample(model, s, k, i) for i, (s, k) in enumerate(zip(samples, keeps))]
        row: dict[str, Any] = {
            "selection": sel, "slices": "all (TG-IS)" if sel == "tgis" else f"{k_slices} per plane", "n": len(samples),
            "kept_slices": [int(k[0].unique().numel()) for k in keeps] if keeps is not None else [None] * len(samples),
            "accuracy": {}, "balanced_accuracy": {}, "unparsed": {}}
        for n_shots in shots:
            preds = [""] * len(samples)
            for i, _, text, _ in generate_samples(model, seen, prompts=prompts.get(n_shots), batch_size=batch_size,
                                                  max_new_tokens=max_new_tokens, progress=progress,
                                                  desc=f"{sel} {n_shots}-shot"):
                preds[i] = text
            y_pred = [parse_choice(p, labels) or NO_LABEL for p in preds]
            with warnings.catch_warnings():  # NO_LABEL is not a true class; "unparsed" counts it
                warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
                m = classification_metrics(y_true, y_pred, labels=labels)
            key = f"{n_shots}-shot"
            row["accuracy"][key], row["balanced_accuracy"][key] = m["accuracy"], m["balanced_accuracy"]
            row["unparsed"][key] = sum(y == NO_LABEL for y in y_pred)
        rows.append(row)
    return rows


def format_fewshot_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table: accuracy and balanced accuracy per shot count, and the gain in
    accuracy points over random slices."""
    keys = list(rows[0]["accuracy"])
    base = next((r for r in rows if r["selection"] == "random"), rows[0])["accuracy"]
    headers = ["slices", "seen"] + [f"{k} {m}" for k in keys for m in ("acc", "bal.acc", "gain")]
    body = [[r["selection"], r["slices"]] + [x for k in keys for x in (
        r["accuracy"][k], r["balanced_accuracy"][k], f"{100 * (r['accuracy'][k] - base[k]):+.1f}")] for r in rows]
    return (f"Vote-MI protocol: label question on {rows[0]['n']} studies (gain: accuracy points over random)\n"
            + format_table(body, headers))
