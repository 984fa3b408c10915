"""Generation on the training path: studies + prompts -> left-padded batch -> visual tokens
spliced into inputs_embeds -> `llm.generate` -> texts and per-slice scores.

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

from medvlm3d.data.collate import Collator
from medvlm3d.data.errors import DataError
from medvlm3d.data.prompts import encode_prompt
from medvlm3d.data.volume import Study, load_study, slice_views


@dataclass
class Generation:
    """What the model said, and where it looked. For a batched call every field is a list."""

    text: str | list[str]
    scores: torch.Tensor | None | list[torch.Tensor | None]  # [S] TG-IS scores over real slices
    slice_index: torch.Tensor | list[torch.Tensor]  # [S] slice index within its plane
    slice_plane: torch.Tensor | list[torch.Tensor]  # [S] plane id (0 axial, 1 coronal, 2 sagittal)
    teacher: torch.Tensor | None | list[torch.Tensor | None]  # [S] Vote-MI teacher


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


def _sample(model: Any, study: Study, prompt: str) -> dict[str, Any]:
    tok = model.tokenizer
    n_img = int(study.volume.shape[0])
    ids = encode_prompt(tok, prompt, model.num_visual_tokens, n_images=n_img)
    q_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    s = int(study.slices.shape[1])
    return {
        "id": "",
        "volume": study.volume,
        "slices": study.slices,
        "slice_plane": study.slice_plane,
        "slice_index": study.slice_index,
        "slice_pos": study.slice_pos,
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.full((len(ids),), -100, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "question_ids": torch.tensor(q_ids or [tok.pad_token_id], dtype=torch.long),
        "question": prompt,
        "target": "",
        "slice_target": torch.zeros(n_img, s),
        "has_slice_target": torch.zeros(n_img, dtype=torch.bool),
        "record": {},
    }


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
    ecfg = model.cfg.eval
    batched = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if batched else [prompt]
    volumes = list(volume) if batched else [volume]
    if len(prompts) != len(volumes):
        raise ValueError(f"got {len(volumes)} volumes for {len(prompts)} prompts")
    if any(not str(p).strip() for p in prompts):
        raise DataError("prompt is empty: ask a question or give a report instruction")
    was_training = model.training
    model.eval()
    dev = model.device
    studies = [_as_study(v, model.cfg.data) for v in volumes]
    batch = Collator(pad_token_id=model.tokenizer.pad_token_id, padding_side="left")(
        [_sample(model, st, p) for st, p in zip(studies, prompts)]
    )
    batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    text = None
    if model.tgis is not None:
        text = model.text_features(batch["question_ids"], batch["question_mask"], batch["questions"], batch["image_to_sample"])
    # Inputs follow the encoders' dtype (bf16 on GPU after load_pretrained(dtype=...)).
    enc_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    vis = model.encode_images(
        batch["volumes"].to(enc_dtype), batch["slices"].to(enc_dtype),
        batch["slice_mask"], batch["slice_pos"], batch["slice_plane"], text,
    )
    embeds = model.splice(batch["input_ids"], vis.tokens)
    tok = model.tokenizer
    out_ids = model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens or ecfg.max_new_tokens,
        do_sample=ecfg.do_sample if do_sample is None else do_sample,
        temperature=(temperature or ecfg.temperature) if (do_sample or ecfg.do_sample) else None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    texts = [t.strip() for t in tok.batch_decode(out_ids, skip_special_tokens=True)]
    if was_training:
        model.train()

    first = batch["image_to_sample"]
    per: dict[str, list[Any]] = {"scores": [], "slice_index": [], "slice_plane": [], "teacher": []}
    for b in range(len(prompts)):
        i = int((first == b).nonzero()[0])  # the sample's first image
        real = batch["slice_mask"][i]
        per["scores"].append(None if vis.scores is None else vis.scores[i][real].float().cpu())
        per["teacher"].append(None if vis.teacher is None else vis.teacher[i][real].float().cpu())
        per["slice_index"].append(batch["slice_index"][i][real].cpu())
        per["slice_plane"].append(batch["slice_plane"][i][real].cpu())
    if batched:
        return Generation(text=texts, **per)
    return Generation(text=texts[0], **{k: v[0] for k, v in per.items()})
