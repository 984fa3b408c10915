"""Text-Guided Inter-Slice scoring (TG-IS, Med-2E3, arXiv 2411.12783).

The question decides which 2D slices matter. For each slice j a descriptor z_j is the mean of
slice j's T tokens together with the 3D tokens of its *group*: the 3D tokens whose coordinate
along the slice's plane axis equals `floor(slice_pos_j * grid[axis])`. Then

    t        = text_proj(text)                         [B, D]
    logits_j = (z_j . t) / tau                         [B, S]
    s        = softmax over the real slices            [B, S]  (padded slices exactly 0)
    z2d      = sum_j s_j v_j                           [B, T, D]

With `cfg.pos_embed`, each slice's tokens first get a learned embedding of where the slice lies,
v_j <- v_j + P(sinusoid(slice_pos_j)) + E(plane_j), before the descriptors and the fusion: the
scores can then follow "the lesion in the upper part", and z2d says where the weighted slices
lie (a score-weighted sum of tokens otherwise forgets it). P starts at zero, so a new head
scores and fuses exactly as one without it.

The logits come from the slice scorer named by `cfg.scorer` (registry `SCORERS`; a scorer maps
z [B, S, D], t [B, D], mask [B, S] (and context [B, S, F] when the batch carries one) -> logits
[B, S] float32): "med2e3" (default) is the formula above; "context" adds a gated cross-slice term
that can follow the Vote-MI teacher (`ContextScorer`; with `cfg.context_features: intensity` it
reads `context`, the batch's data-side `slice_context`; model/slice_scorers.py, distillation.md).

With `cfg.top_k > 0` only the k highest-scoring real slices keep mass (a softmax renormalised
over those); the others are exactly 0, and gradients still flow through the kept logits.

Shapes (B images, S slices padded, T tokens per slice, D the projected width, grid (d, h, w)):
    x3d [B, d*h*w, D] in row-major (d, h, w) order; v [B, S, T, D]; text [B, text_dim];
    slice_pos [B, S] float in (0, 1); slice_plane [B, S] long (0 axial -> grid axis 0 = d,
    1 coronal -> axis 1 = h, 2 sagittal -> axis 2 = w); mask [B, S] bool (True = real slice).

Nothing here hard-codes a grid or a slice count: the groups come from `grid` and `slice_pos`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from medvlm3d.data.errors import ConfigError
from medvlm3d.model.inter_slice import sinusoid
from torch import nn

from medvlm3d.config_fields import PLANES, check_choice


@dataclass
class TGISConfig:
    """Text-guided inter-slice scoring (Med-2E3): scores [B, S] and fused z2d [B, T, Dl]."""

    tau: float = 5.0
    top_k: int = 0  # 0 = soft weighting over all slices
    text_source: str = "llm"  # llm | hf
    text_encoder: str = ""  # local HF folder when text_source == "hf"
    pos_embed: bool = False  # add a learned slice-position (and plane) embedding to each slice's tokens
    scorer: str = "med2e3"  # slice scorer (SCORERS below): med2e3 (z.t/tau) | context (+ gated cross-slice term)
    # what the `context` scorer's cross-slice term compares: "intensity" (the Vote-MI teacher's own
    # slice features: the batch's slice_context, computed on the data side) or "tokens" (the descriptors z)
    context_features: str = "tokens"
    # Dropout on the scores used for the fusion (Med-2E3: 0.1); `TGISOutput.scores` stay undropped
    score_dropout: float = 0.0
    text_pooling: str = "mean"  # text_source hf: mean | cls | pooler (BERT pooler_output, as Med-2E3)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"tgis.tau must be > 0, got {self.tau}")
        if self.top_k < 0:
            raise ConfigError(f"tgis.top_k must be >= 0, got {self.top_k}")
        check_choice("tgis.text_source", self.text_source, ("llm", "hf"))
        check_choice("tgis.text_pooling", self.text_pooling, ("mean", "cls", "pooler"))
        check_choice("tgis.context_features", self.context_features, ("intensity", "tokens"))
        if not 0.0 <= self.score_dropout < 1.0:
            raise ConfigError(f"tgis.score_dropout must be in [0, 1), got {self.score_dropout}")


log = logging.getLogger(__name__)

Grid = tuple[int, int, int]
# slice_pos in (0, 1) is scaled by this before the sinusoid, so its fastest frequency turns
# about once per 1/100 of the axis (a slice of a 100-slice series).
POS_SCALE = 100.0




@dataclass
class TGISOutput:
    scores: torch.Tensor  # [B, S] float32, sums to 1 over real slices, exactly 0 on padding
    z2d: torch.Tensor  # [B, T, D] score-weighted sum of the slice tokens
    logits: torch.Tensor  # [B, S] float32 (z . t) / tau; -inf nowhere (padding keeps its raw value)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of `logits` over the positions where `mask` is True; exactly 0 elsewhere.

    Computed in float32. A slice along `dim` with no True entry is an error (ValueError).
    """
    if logits.shape != mask.shape:
        raise ValueError(f"masked_softmax: logits {tuple(logits.shape)} and mask {tuple(mask.shape)} must match")
    mask = mask.bool()
    if not bool(mask.any(dim=dim).all()):
        raise ValueError("masked_softmax: every row needs at least one real (mask=True) entry")
    filled = logits.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(filled, dim=dim)


def topk_mask(logits: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S] bool: the min(k, real count) highest real logits of each row (ties -> lowest index)."""
    if k < 1:
        raise ValueError(f"topk_mask: k must be >= 1, got {k}")
    filled = logits.detach().float().masked_fill(~mask.bool(), float("-inf"))
    order = torch.sort(filled, dim=-1, descending=True, stable=True).indices[..., : min(k, logits.shape[-1])]
    keep = torch.zeros_like(mask, dtype=torch.bool).scatter(-1, order, True)
    return keep & mask.bool()


def slice_groups(slice_pos: torch.Tensor, slice_plane: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Group index of each slice along its plane's grid axis: floor(pos * grid[plane]), clamped.

    slice_pos [B, S] float in (0, 1), slice_plane [B, S] long in {0, 1, 2} -> [B, S] long in
    [0, grid[plane] - 1]. E.g. grid (4, 2, 3): an axial slice at pos 0.3 -> 1; coronal 0.6 -> 1;
    sagittal 0.9 -> 2.
    """
    sizes = torch.tensor(grid, device=slice_pos.device, dtype=torch.long)[slice_plane.long()]
    idx = torch.floor(slice_pos.double() * sizes.double()).long()
    return torch.minimum(idx.clamp_min(0), sizes - 1)


def slab_means(x3d: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis slab means of the 3D tokens.

    x3d [B, d*h*w, D] -> (means [B, d+h+w, D], counts [3] long, offsets [3] long): rows
    offsets[a] .. offsets[a]+grid[a]-1 hold the means over the slabs perpendicular to axis a,
    and counts[a] is the number of tokens in one such slab (the product of the other two sizes).
    """
    d, h, w = grid
    x = rearrange(x3d, "b (d h w) c -> b d h w c", d=d, h=h, w=w)
    means = torch.cat(
        [
            reduce(x, "b d h w c -> b d c", "mean"),
            reduce(x, "b d h w c -> b h c", "mean"),
            reduce(x, "b d h w c -> b w c", "mean"),
        ],
        dim=1,
    )
    counts = torch.tensor([h * w, d * w, d * h], device=x3d.device, dtype=torch.long)
    offsets = torch.tensor([0, d, d + h], device=x3d.device, dtype=torch.long)
    return means, counts, offsets


def slice_descriptors(
    x3d: torch.Tensor, grid: Grid, v: torch.Tensor, slice_pos: torch.Tensor, slice_plane: torch.Tensor
) -> torch.Tensor:
    """z [B, S, D]: mean over the concatenation of slice j's T tokens and its group's 3D tokens,
    i.e. (sum_T v_j + n_g * slab_mean) / (T + n_g)."""
    means, counts, offsets = slab_means(x3d, grid)
    plane = slice_plane.long()
    rows = offsets[plane] + slice_groups(slice_pos, plane, grid)  # [B, S]
    slab = torch.gather(means, 1, rows.unsqueeze(-1).expand(-1, -1, means.shape[-1]))  # [B, S, D]
    n = counts[plane].unsqueeze(-1).to(v.dtype)  # [B, S, 1]
    return (v.sum(dim=2) + n * slab.to(v.dtype)) / (v.shape[2] + n)


class TGIS(nn.Module):
    """Text-guided inter-slice scores and fusion. Parameters: `text_proj`, and with
    `cfg.pos_embed` the slice-position map `pos_proj` (zero-initialised) and `plane_embed`."""

    def __init__(self, cfg: TGISConfig, dim: int, text_dim: int) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim > 0 and isinstance(text_dim, int) and text_dim > 0):
            raise ValueError(f"TGIS: dim and text_dim must be positive integers, got {dim!r}, {text_dim!r}")
        if not (cfg.tau > 0 and math.isfinite(cfg.tau)):
            raise ValueError(f"TGIS: tgis.tau must be a finite number > 0, got {cfg.tau}")
        if cfg.top_k < 0:
            raise ValueError(f"TGIS: tgis.top_k must be >= 0, got {cfg.top_k}")
        self.cfg = cfg
        self.dim = dim
        self.text_dim = text_dim
        self.tau = float(cfg.tau)
        self.top_k = int(cfg.top_k)
        self.text_proj = nn.Linear(text_dim, dim)
        self.pos_proj: nn.Linear | None = None
        self.plane_embed: nn.Embedding | None = None
        if cfg.pos_embed:
            self.pos_proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
            self.plane_embed = nn.Embedding(len(PLANES), dim)
            nn.init.zeros_(self.plane_embed.weight)
        self.scorer = SCORERS.build(cfg.scorer, cfg, dim)  # built last: the layers above keep their init
        self.score_dropout = nn.Dropout(cfg.score_dropout) if cfg.score_dropout > 0 else None

    def position_embedding(self, slice_pos: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """slice_pos [B, S] in (0, 1), plane [B, S] long -> [B, S, D]; only with `cfg.pos_embed`."""
        if self.pos_proj is None or self.plane_embed is None:
            raise ValueError("TGIS.position_embedding needs tgis.pos_embed: true")
        pe = sinusoid(slice_pos * POS_SCALE, self.dim).to(self.pos_proj.weight.dtype)
        return self.pos_proj(pe) + self.plane_embed(plane)

    def _check(
        self,
        x3d: torch.Tensor,
        grid: Grid,
        v: torch.Tensor,
        text: torch.Tensor,
        slice_pos: torch.Tensor,
        slice_plane: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        if len(grid) != 3 or any(int(g) < 1 for g in grid):
            raise ValueError(f"TGIS: grid must be three positive sizes (d, h, w), got {grid!r}")
        n3 = math.prod(grid)
        if x3d.ndim != 3 or x3d.shape[1] != n3 or x3d.shape[2] != self.dim:
            raise ValueError(f"TGIS: x3d must be [B, {n3}, {self.dim}] for grid {tuple(grid)}, got {tuple(x3d.shape)}")
        if v.ndim != 4 or v.shape[-1] != self.dim or v.shape[0] != x3d.shape[0]:
            raise ValueError(f"TGIS: v must be [B={x3d.shape[0]}, S, T, {self.dim}], got {tuple(v.shape)}")
        b, s = v.shape[:2]
        if text.ndim != 2 or tuple(text.shape) != (b, self.text_dim):
            raise ValueError(f"TGIS: text must be [{b}, {self.text_dim}], got {tuple(text.shape)}")
        for name, t in (("slice_pos", slice_pos), ("slice_plane", slice_plane), ("mask", mask)):
            if tuple(t.shape) != (b, s):
                raise ValueError(f"TGIS: {name} must be [{b}, {s}], got {tuple(t.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"TGIS: mask must be a bool tensor, got {mask.dtype}")
        if not bool(mask.any(dim=1).all()):
            bad = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"TGIS: rows {bad} have no real slices (mask all False)")
        real_planes = slice_plane[mask]
        if bool(((real_planes < 0) | (real_planes >= len(PLANES))).any()):
            raise ValueError(f"TGIS: slice_plane must be in 0..{len(PLANES) - 1} on real slices")

    def forward(
        self,
        x3d: torch.Tensor,
        grid: Grid,
        v: torch.Tensor,
        text: torch.Tensor,
        slice_pos: torch.Tensor,
        slice_plane: torch.Tensor,
        mask: torch.Tensor,
        slice_context: torch.Tensor | None = None,
    ) -> TGISOutput:
        """See the module docstring for shapes; `slice_context` [B, S, F] (the batch's data-side
        per-slice features) goes to the scorer, which may need it (`context` on intensity)."""
        grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
        self._check(x3d, grid, v, text, slice_pos, slice_plane, mask)
        plane = torch.where(mask, slice_plane.long(), torch.zeros_like(slice_plane, dtype=torch.long))
        if self.pos_proj is not None:
            pe = self.position_embedding(slice_pos, plane) * mask.unsqueeze(-1)  # [B, S, D], 0 on padding
            v = v + pe.unsqueeze(2).to(v.dtype)
        z = slice_descriptors(x3d, grid, v, slice_pos, plane)  # [B, S, D]
        t = self.text_proj(text.to(self.text_proj.weight.dtype))  # [B, D]
        context = () if slice_context is None else (slice_context,)  # a (z, t, mask) scorer still fits
        logits = self.scorer(z, t, mask, *context)  # [B, S] float32
        keep = mask if self.top_k == 0 else topk_mask(logits, mask, self.top_k)
        scores = masked_softmax(logits, keep)
        fused = scores if self.score_dropout is None else self.score_dropout(scores)
        z2d = torch.einsum("bs,bstd->btd", fused.to(v.dtype), v)
        return TGISOutput(scores=scores, z2d=z2d, logits=logits)


# the scorers live in model/slice_scorers.py; imported last (they need TGISConfig only for typing)
from medvlm3d.model.slice_scorers import (  # noqa: F401
    SCORERS,
    ContextScorer,
    Med2E3Scorer,
    volume_normalised,
)
