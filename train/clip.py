"""Stage 0 (clip): contrastive volume <-> report pretraining of the encoders, M3D-CLIP style.

`ContrastiveModel(vlm, cfg)` wraps a `MedVLM` (whose 3D and slice encoders train, as
`cfg.model.trainable` says) and adds a `ContrastiveHead` that only exists for this stage:

    text:    targets (B report strings) -> vlm.tokenizer -> ids [B, Lt], mask [B, Lt]
             -> Embedding(len(tokenizer), Wt) + learned positions [Lt, Wt]
             -> 2-layer pre-norm TransformerEncoder -> LayerNorm -> masked mean -> Linear -> [B, E]
    volume:  encoder3d(volumes [N,1,D,H,W]) -> [N, N3, D3] -> pool over tokens -> Linear -> [N, E]
    slices:  slice_encoder(slices [N,S,1,h,w], slice_mask [N,S]) -> [N, S, T, D2]
             -> pool over T and over the real slices -> Linear -> [N, E]
    pool:    `train.contrastive_pool`: "mean", or "max" (per feature; a finding on a few slices
             or one patch is not averaged away by the rest of the volume)
    images -> samples: the mean of each sample's images (image_to_sample [N]) -> [B, E]
    loss = InfoNCE(volume, text) + InfoNCE(slices, text)   (symmetric, `train.losses.contrastive_loss`)

Decisions:
- Text: the report strings `batch["targets"]` are tokenised with `vlm.tokenizer` (no special
  tokens, right-padded, cut at `cfg.data.max_text_len`), so the text tower sees the clean
  report, independent of the chat template, image tokens and label masking of the LM stages.
- Widths: the text tower width Wt and the embedding width E both equal the 3D encoder's width
  `encoder3d.out_dim` (the slice encoder's `out_dim` for the 2d_only variant): the size of the
  vision tower it pretrains (768 for M3D-CLIP's ViT), not the LLM width (3072 for Phi-3 would
  make a needlessly big throwaway tower). Heads: the most of 8/4/2/1 that keeps >= 16 dims each.
- One learned temperature, `logit_scale` = log(1 / `train.contrastive_temperature`) at the
  start, shared by both terms (`contrastive_loss` clamps exp(logit_scale) at 100).
- The slice branch uses the slice encoder alone (no inter_slice / TG-IS, trained in stage 1).
- The text tower and heads are thrown away after this stage: a `MedVLM` checkpoint saves
  `self.vlm` only, while `accelerator.save_state` (resume) holds the whole module.
- Known simplifications: negatives are the other samples of the per-process batch (under DDP
  there is no all-gather across processes), so B >= 2 per process is required; identical
  reports in one batch (e.g. two normal studies) count as negatives of each other.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import torch
from einops import reduce
from torch import nn

from medvlm3d.config import RunConfig
from medvlm3d.model.medvlm import MedVLM
from medvlm3d.train.losses import contrastive_loss

log = logging.getLogger(__name__)

TEXT_LAYERS = 2


def _num_heads(width: int) -> int:
    return next((h for h in (8, 4, 2) if width % h == 0 and width // h >= 16), 1)


def _sample_mean(x: torch.Tensor, image_to_sample: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Mean of each sample's rows: x [N, E], image_to_sample [N] -> [n_samples, E]."""
    sums = x.new_zeros(n_samples, x.shape[-1]).index_add(0, image_to_sample, x)
    counts = torch.bincount(image_to_sample, minlength=n_samples).clamp(min=1).to(x.dtype)
    return sums / counts.unsqueeze(-1)


class TextTower(nn.Module):
    """ids [B, L] long, mask [B, L] (1 = real) -> [B, width] (masked mean of the last layer)."""

    def __init__(self, vocab_size: int, width: int, max_len: int, num_layers: int = TEXT_LAYERS) -> None:
        super().__init__()
        if vocab_size < 1 or width < 1 or max_len < 1:
            raise ValueError(f"TextTower needs positive vocab_size, width, max_len; got {vocab_size}, {width}, {max_len}")
        self.max_len = int(max_len)
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(self.max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, _num_heads(width), dim_feedforward=4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"TextTower takes at most {self.max_len} tokens (data.max_text_len), got {ids.shape[1]}")
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask.bool()))
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class ContrastiveHead(nn.Module):
    """The stage-only parameters: text tower, volume / slice projections, `logit_scale`."""

    def __init__(self, vocab_size: int, width: int, max_len: int, dim3d: int | None, dim2d: int | None,
                 temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"train.contrastive_temperature must be > 0, got {temperature}")
        self.text = TextTower(vocab_size, width, max_len)
        self.text_proj = nn.Linear(width, width)
        self.volume_proj = nn.Linear(dim3d, width) if dim3d else None
        self.slice_proj = nn.Linear(dim2d, width) if dim2d else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))


class ContrastiveModel(nn.Module):
    """MedVLM encoders + a small text tower, trained with symmetric InfoNCE (see module docstring).

    forward(**batch) takes a collated batch of report records (data/collate.py; only `volumes`,
    `image_to_sample`, `slices`, `slice_mask` and `targets` are read) and returns tensors:
    {"loss", "loss_volume" (variants with a 3D encoder), "loss_slices" (with a slice encoder),
    "logit_scale"}. Raises ValueError for fewer than 2 samples (no in-batch negative).
    """

    def __init__(self, vlm: MedVLM, cfg: RunConfig) -> None:
        super().__init__()
        if not isinstance(vlm, MedVLM):
            raise ValueError(f"ContrastiveModel expects a MedVLM, got {type(vlm).__name__}")
        if not isinstance(cfg, RunConfig):
            raise ValueError(f"ContrastiveModel expects a RunConfig, got {type(cfg).__name__}")
        self.vlm = vlm
        self.cfg = cfg
        self.tokenizer = vlm.tokenizer
        dim3d = vlm.encoder3d.out_dim if vlm.encoder3d is not None else None
        dim2d = vlm.slice_encoder.out_dim if vlm.slice_encoder is not None else None
        self.embed_dim = int(dim3d or dim2d)
        self.clip_head = ContrastiveHead(
            len(vlm.tokenizer), self.embed_dim, cfg.data.max_text_len, dim3d, dim2d, cfg.train.contrastive_temperature
        )
        if not any(p.requires_grad for m in (vlm.encoder3d, vlm.slice_encoder) if m is not None for p in m.parameters()):
            log.warning("stage0_clip: both encoders are frozen (model.trainable); only the text tower will train")

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip_head.logit_scale

    def components(self) -> dict[str, nn.Module | None]:
        """The MedVLM's components plus "clip_head" (for per-component learning rates)."""
        return {**self.vlm.components(), "clip_head": self.clip_head}

    # ----------------------------------------------------------------------------------------
    # embeddings (unnormalised; the loss normalises)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B report strings -> [B, E]."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode_text expects a list of report strings (batch['targets'])")
        enc = self.tokenizer(
            list(texts), add_special_tokens=False, padding=True, truncation=True,
            max_length=self.clip_head.text.max_len, return_tensors="pt", padding_side="right",
        )
        device = self.logit_scale.device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        empty = [i for i in range(len(texts)) if int(mask[i].sum()) == 0]
        if empty:
            raise ValueError(f"report texts at batch rows {empty} are empty; stage0_clip needs a report per sample")
        return self.clip_head.text_proj(self.clip_head.text(ids, mask))

    def encode_volumes(self, volumes: torch.Tensor, image_to_sample: torch.Tensor, n_samples: int) -> torch.Tensor:
        """volumes [N,1,D,H,W] -> [n_samples, E] (mean of each sample's images)."""
        pooled = reduce(self.vlm.encoder3d(volumes), "n t d -> n d", self.cfg.train.contrastive_pool)
        return _sample_mean(self.clip_head.volume_proj(pooled), image_to_sample, n_samples)

    def encode_slices(self, slices: torch.Tensor, slice_mask: torch.Tensor, image_to_sample: torch.Tensor,
                      n_samples: int) -> torch.Tensor:
        """slices [N,S,1,h,w], slice_mask [N,S] -> [n_samples, E] (pooled over tokens and real
        slices, then the mean of each sample's images)."""
        pool = self.cfg.train.contrastive_pool
        per_slice = reduce(self.vlm.slice_encoder(slices, slice_mask), "n s t d -> n s d", pool)
        if pool == "max":
            pooled = per_slice.masked_fill(~slice_mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        else:
            m = slice_mask.to(per_slice.dtype).unsqueeze(-1)
            pooled = (per_slice * m).sum(1) / m.sum(1).clamp(min=1.0)
        return _sample_mean(self.clip_head.slice_proj(pooled), image_to_sample, n_samples)

    def embed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A collated batch -> {"text": [B,E], "volume": [B,E] (if 3D), "slices": [B,E] (if 2D)}."""
        missing = [k for k in ("targets", "volumes", "image_to_sample", "slices", "slice_mask") if k not in batch]
        if missing:
            raise ValueError(f"stage0_clip batch lacks keys {missing} (use data.collate.Collator)")
        targets = list(batch["targets"])
        n = len(targets)
        owner = batch["image_to_sample"].long()
        if owner.numel() == 0 or int(owner.min()) < 0 or int(owner.max()) >= n or torch.unique(owner).numel() != n:
            raise ValueError(f"image_to_sample {owner.tolist()} must give every one of the {n} samples an image")
        out = {"text": self.encode_text(targets)}
        if self.vlm.encoder3d is not None:
            out["volume"] = self.encode_volumes(batch["volumes"], owner, n)
        if self.vlm.slice_encoder is not None:
            out["slices"] = self.encode_slices(batch["slices"], batch["slice_mask"].bool(), owner, n)
        return out

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        n = len(batch.get("targets") or [])
        if n < 2:
            raise ValueError(
                f"stage0_clip needs at least 2 samples per batch (per process) for in-batch negatives, got {n}; "
                "raise train.batch_size"
            )
        emb = self.embed(batch)
        out: dict[str, torch.Tensor] = {}
        if "volume" in emb:
            out["loss_volume"] = contrastive_loss(emb["volume"], emb["text"], self.logit_scale)
        if "slices" in emb:
            out["loss_slices"] = contrastive_loss(emb["slices"], emb["text"], self.logit_scale)
        out["loss"] = sum(out.values())
        out["logit_scale"] = self.logit_scale.detach()
        return out


# --------------------------------------------------------------------------------------------
# evaluation


def _top1(sim: torch.Tensor, texts: Sequence[str]) -> tuple[float, float]:
    """(image->text, text->image) top-1 accuracy of sim [B_img, B_txt]; a hit is a retrieved
    item whose report text equals the true one (identical reports are indistinguishable)."""
    index: dict[str, int] = {}
    text_id = torch.tensor([index.setdefault(t, len(index)) for t in texts])
    i2t = (text_id[sim.argmax(dim=1).cpu()] == text_id).float().mean().item()
    t2i = (text_id[sim.argmax(dim=0).cpu()] == text_id).float().mean().item()
    return i2t, t2i


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Top-1 retrieval over all samples of `batches` (collated report batches).

    Returns {"volume_to_text", "text_to_volume"} (variants with a 3D encoder), {"slices_to_text",
    "text_to_slices"} (with a slice encoder), "chance" (the expected accuracy of a random pick,
    1/n when all reports differ) and "n". A hit is any retrieved study whose report text equals
    the true one. `model` is a ContrastiveModel (or a wrapper with `.module`, as DDP gives).
    """
    core = model if isinstance(model, ContrastiveModel) else getattr(model, "module", model)
    if not isinstance(core, ContrastiveModel):
        raise ValueError(f"retrieval_accuracy expects a ContrastiveModel, got {type(model).__name__}")
    device = core.logit_scale.device
    was_training = core.training
    core.eval()
    feats: dict[str, list[torch.Tensor]] = {}
    texts: list[str] = []
    try:
        for batch in batches:
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for key, value in core.embed(moved).items():
                feats.setdefault(key, []).append(nn.functional.normalize(value.float(), dim=-1))
            texts.extend(batch["targets"])
    finally:
        core.train(was_training)
    if len(texts) < 2:
        raise ValueError(f"retrieval_accuracy needs at least 2 samples, got {len(texts)}")
    text = torch.cat(feats.pop("text"))
    out: dict[str, float] = {}
    for key, name in (("volume", "volume"), ("slices", "slices")):
        if key in feats:
            i2t, t2i = _top1(torch.cat(feats[key]) @ text.t(), texts)
            out[f"{name}_to_text"], out[f"text_to_{name}"] = i2t, t2i
    out["chance"] = sum(texts.count(t) for t in texts) / len(texts) ** 2
    out["n"] = float(len(texts))
    return out
