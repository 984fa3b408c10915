"""Generation on the training path: studies -> the data-side step (`study_tensors`: slices,
pre-selection, teacher, picks) + left-padded prompts -> Batch -> `MedVLM.prepare_inputs` (the
one input-building method, as in forward) -> `llm.generate` -> texts and per-slice scores.

    generate(model, volume=path | [paths] | tensor [1,D,H,W] | [tensors], prompt=str | [str])
        -> Generation(text, scores [S] per study over its real slices, slice_index, slice_plane, teacher)

Preprocessing always comes from the model's own `cfg.data`, so inference matches training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from torch.nn.utils.rnn import pad_sequence

from medvlm3d.data.batch import Batch
from medvlm3d.data.collate import collate_images
from medvlm3d.data.errors import DataError
from medvlm3d.data.prompts import encode_prompt
from medvlm3d.data.select.step import SelectionPlan, study_tensors
from medvlm3d.data.volume import Study, load_study, slice_views


@dataclass
class Generation:
    """What the model said, and where it looked. For a batched call every field is a list."""

    text: str | list[str]
    scores: torch.Tensor | None | list[torch.Tensor | None]  # [S] TG-IS scores over real slices
    slice_index: torch.Tensor | list[torch.Tensor]  # [S] slice index within its plane
    slice_plane: torch.Tensor | list[torch.Tensor]  # [S] plane id (0 axial, 1 coronal, 2 sagittal)
    teacher: torch.Tensor | None | list[torch.Tensor | None]  # [S] the data-side selector's teacher


def study_from_tensor(volume: torch.Tensor, cfg: Any) -> Study:
    """A preprocessed volume [1,D,H,W] (or [D,H,W]) in [0,1] -> Study at the config's sizes."""
    if volume.dim() == 3:
        volume = volume.unsqueeze(0)
    if volume.dim() != 4 or volume.shape[0] != 1:
        raise DataError(f"volume tensor must be [1, D, H, W], got shape {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise DataError("volume tensor holds NaN or Inf values")
    volume = volume.float()
    if tuple(volume.shape[1:]) != tuple(cfg.size):
        volume = F.interpolate(volume[None], size=tuple(cfg.size), mode="trilinear", align_corners=False)[0]
    slices, plane, index, pos = slice_views(volume, tuple(cfg.slice_size), tuple(cfg.planes), cfg.num_slices)
    return Study(
        volume=volume[None],
        slices=slices[None],
        slice_plane=plane[None],
        slice_index=index[None],
        slice_pos=pos[None],
        native_depth=[int(volume.shape[1])],
    )


def _as_study(volume: Any, cfg: Any) -> Study:
    if isinstance(volume, torch.Tensor):
        return study_from_tensor(volume, cfg)
    if isinstance(volume, (str, Path)) or (isinstance(volume, (list, tuple)) and volume and isinstance(volume[0], (str, Path))):
        return load_study(volume, cfg, train=False)
    raise DataError(f"volume must be a path, a list of series paths, or a tensor [1,D,H,W]; got {type(volume).__name__}")


def prompt_batch(tok: Any, prompts: Sequence[str], n_images: Sequence[int], num_image_tokens: int) -> dict[str, Any]:
    """The text half of a generation batch: input_ids / attention_mask [B, L] left-padded,
    question_ids / question_mask [B, Lq] right-padded, questions."""
    ids = [torch.tensor(encode_prompt(tok, p, num_image_tokens, n_images=n), dtype=torch.long)
           for p, n in zip(prompts, n_images)]
    q_ids = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"] or [tok.pad_token_id], dtype=torch.long)
             for p in prompts]

    def pad(seqs: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
        return pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=side)

    return {
        "input_ids": pad(ids, tok.pad_token_id, "left"),
        "attention_mask": pad([torch.ones_like(x) for x in ids], 0, "left"),
        "question_ids": pad(q_ids, tok.pad_token_id, "right"),
        "question_mask": pad([torch.ones_like(x) for x in q_ids], 0, "right"),
        "questions": list(prompts),
    }


def generation_batch(model: Any, images: Sequence[dict[str, torch.Tensor]], prompts: Sequence[str]) -> Batch:
    """Per-study image tensors (`study_tensors`) + prompts -> a Batch on the model's device."""
    n_images = [int(x["volume"].shape[0]) for x in images]
    fields = prompt_batch(model.tokenizer, prompts, n_images, model.num_visual_tokens)
    fields.update(collate_images(images))
    return Batch.from_dict(fields).to(model.device)


@torch.no_grad()
def generate(
    model: Any,
    volume: Any,
    prompt: str | Sequence[str],
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
) -> Generation:
    """See the module docstring. Greedy by default (`cfg.eval`)."""
    batched = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if batched else [prompt]
    volumes = list(volume) if batched else [volume]
    if len(prompts) != len(volumes):
        raise ValueError(f"got {len(volumes)} volumes for {len(prompts)} prompts")
    if any(not str(p).strip() for p in prompts):
        raise DataError("prompt is empty: ask a question or give a report instruction")
    plan = SelectionPlan.from_config(model.cfg.model, teacher=True)
    images = [study_tensors(_as_study(v, model.cfg.data), plan) for v in volumes]
    return generate_batch(model, generation_batch(model, images, prompts), batched, max_new_tokens, do_sample,
                          temperature)


@torch.no_grad()
def generate_batch(
    model: Any,
    batch: Batch,
    batched: bool = True,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
) -> Generation:
    """Generation from a ready Batch (left-padded prompts): what `generate` and eval call."""
    ecfg = model.cfg.eval
    was_training = model.training
    model.eval()
    embeds, attention_mask, vis = model.prepare_inputs(batch)
    tok = model.tokenizer
    out_ids = model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens or ecfg.max_new_tokens,
        do_sample=ecfg.do_sample if do_sample is None else do_sample,
        temperature=(temperature or ecfg.temperature) if (do_sample or ecfg.do_sample) else None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    texts = [t.strip() for t in tok.batch_decode(out_ids, skip_special_tokens=True)]
    if was_training:
        model.train()

    first = batch.image_to_sample
    per: dict[str, list[Any]] = {"scores": [], "slice_index": [], "slice_plane": [], "teacher": []}
    for b in range(int(batch.input_ids.shape[0])):
        i = int((first == b).nonzero()[0])  # the sample's first image
        real = batch.slice_mask[i]
        per["scores"].append(None if vis.scores is None else vis.scores[i][real].float().cpu())
        per["teacher"].append(None if vis.teacher is None else vis.teacher[i][real].float().cpu())
        per["slice_index"].append(batch.slice_index[i][real].cpu())
        per["slice_plane"].append(batch.slice_plane[i][real].cpu())
    if batched:
        return Generation(text=texts, **per)
    return Generation(text=texts[0], **{k: v[0] for k, v in per.items()})
