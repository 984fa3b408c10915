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
z [B, S, D], t [B, D], mask [B, S] -> logits [B, S] float32): "med2e3" (default) is the formula
above; "context" adds a gated cross-slice term that can follow the Vote-MI teacher
(`ContextScorer`, docs/distillation.md).

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
from typing import Any

import torch
from einops import rearrange, reduce
from torch import nn

from medvlm3d.config_fields import PLANES, check_choice
from medvlm3d.data.errors import ConfigError
from medvlm3d.data.select.base import VoteMIConfig
from medvlm3d.data.select.votek import VoteMI, intensity_features
from medvlm3d.model.inter_slice import sinusoid
from medvlm3d.registry import Registry


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
    # slice features, computed from the slices, no gradient) or "tokens" (the descriptors z)
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


SCORERS = Registry("slice scorer")
INTENSITY_TEMPS = (0.03, 0.1, 0.3)  # the context scorer's cosine temperatures on intensity features


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

    def __init__(self, cfg: TGISConfig, dim: int, text_dim: int, vote_mi: VoteMIConfig | None = None) -> None:
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
        # built last: the layers above keep their init; `vote_mi` sets the intensity context's vote-k
        self.scorer = SCORERS.build(cfg.scorer, cfg, dim, vote_mi=vote_mi or VoteMIConfig())
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
        slices: torch.Tensor | None = None,
    ) -> TGISOutput:
        """See the module docstring for shapes; `slices` [B, S, 1, h, w] go to a scorer that reads
        them (`reads_slices`, e.g. `context` on intensity features)."""
        grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
        self._check(x3d, grid, v, text, slice_pos, slice_plane, mask)
        plane = torch.where(mask, slice_plane.long(), torch.zeros_like(slice_plane, dtype=torch.long))
        if self.pos_proj is not None:
            pe = self.position_embedding(slice_pos, plane) * mask.unsqueeze(-1)  # [B, S, D], 0 on padding
            v = v + pe.unsqueeze(2).to(v.dtype)
        z = slice_descriptors(x3d, grid, v, slice_pos, plane)  # [B, S, D]
        t = self.text_proj(text.to(self.text_proj.weight.dtype))  # [B, D]
        if getattr(self.scorer, "reads_slices", False):
            logits = self.scorer(z, t, mask, slices=slices, slice_plane=plane)  # [B, S] float32
        else:
            logits = self.scorer(z, t, mask)
        keep = mask if self.top_k == 0 else topk_mask(logits, mask, self.top_k)
        scores = masked_softmax(logits, keep)
        fused = scores if self.score_dropout is None else self.score_dropout(scores)
        z2d = torch.einsum("bs,bstd->btd", fused.to(v.dtype), v)
        return TGISOutput(scores=scores, z2d=z2d, logits=logits)


# --------------------------------------------------------------------------------------------
# slice scorers: (z [B, S, D], t [B, D], mask [B, S] bool) -> logits [B, S] float32


class Med2E3Scorer(nn.Module):
    """Med-2E3's head: logits_j = (z_j . t) / tau. No parameters (t's map is TGIS.text_proj)."""

    def __init__(self, cfg: TGISConfig, dim: int) -> None:
        super().__init__()
        self.tau = float(cfg.tau)

    def forward(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsd,bd->bs", z.float(), t.float()) / self.tau


@SCORERS.register("med2e3")
def _med2e3(cfg: TGISConfig, dim: int, vote_mi: VoteMIConfig | None = None) -> nn.Module:
    return Med2E3Scorer(cfg, dim)


def volume_normalised(z: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """c [B, S, D]: (z_j - mean of the volume's real slices) / their rms spread; 0 on padding.

    Mean-pooled descriptors differ little from slice to slice (|z_j - mean z| ~ 1% of |z| on the
    phantoms, docs/distillation.md): this is what is left of them once the volume is taken out.
    """
    m = mask.unsqueeze(-1).to(z.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1.0)
    c = (z - (z * m).sum(1, keepdim=True) / n) * m
    rms = (c.pow(2).sum((1, 2), keepdim=True) / (n * z.shape[-1])).sqrt()
    return c / (rms + eps)


class ContextScorer(nn.Module):
    """logits_j = (c_j . t) / tau + g(t) * context_j, c = volume_normalised(z).

    - text term: Med-2E3's z_j . t / tau up to a per-volume shift (which the softmax ignores)
      and the per-volume scale 1 / rms, so the question's steer is not drowned by the slices'
      likeness (`normalise_text=False`: Med-2E3's term on z as it is);
    - context term: an MLP over [soft in-votes_j, soft density_j] of h = W c, where the in-votes
      (how many slices find j among their nearest: a softmax over the cosine similarities of the
      h) and the density (logsumexp of j's similarities) tell "representative of the rest", which
      no function of z_j alone can (`use_h=True`: the MLP also reads h_j; fitted the Vote-MI
      teacher worse on the demo, docs/distillation.md);
    - gate g(t) = softplus(a . t + b), the question decides how much the prior counts.
    The MLP's output layer starts at zero: a new head scores like its text term alone.
    """

    def __init__(self, cfg: TGISConfig, dim: int, hidden: int = 64, temp: float = 0.1,
                 normalise_text: bool = True, use_h: bool = False, vote_mi: VoteMIConfig | None = None) -> None:
        super().__init__()
        self.tau = float(cfg.tau)
        self.temp = temp
        self.normalise_text, self.use_h = normalise_text, use_h
        self.vote_mi = VoteMI(vote_mi or VoteMIConfig())
        self.on_intensity = self.reads_slices = cfg.context_features == "intensity"
        # tokens: a learned metric h = W c at one temperature; intensity: the teacher's own
        # cosine (no projection: 2*3 scalars per slice, nothing to over-fit) at three temperatures
        self.proj = None if self.on_intensity else nn.Linear(dim, hidden)
        self.temps = INTENSITY_TEMPS if self.on_intensity else (temp,)
        if use_h and self.proj is None:
            raise ConfigError("tgis.context_features=intensity has no learned h for use_h to read")
        self.mlp = nn.Sequential(nn.Linear(hidden * use_h + 2 * len(self.temps) + 2 * self.on_intensity, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(math.e - 1.0))  # softplus -> 1

    @staticmethod
    def relations(hn: torch.Tensor, mask: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit vectors hn [B, S, H] -> (soft in-votes [B, S], soft density [B, S]) at `temp`."""
        sim = torch.einsum("bjh,bkh->bjk", hn, hn) / temp
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        pair = mask.unsqueeze(1) & mask.unsqueeze(2) & ~eye
        sim = sim.masked_fill(~pair, float("-inf"))
        has_other = pair.any(-1, keepdim=True)  # a single-slice volume has no neighbours
        vote = torch.where(has_other, torch.softmax(sim, dim=-1), torch.zeros_like(sim))  # [B, voter k, j]
        votes = vote.sum(1) * mask  # [B, S]: soft count of the slices that vote for j
        density = torch.where(has_other.squeeze(-1), torch.logsumexp(sim, dim=-1), torch.zeros_like(votes)) * temp
        return votes, density * mask

    def context(self, c: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] float32 context logits from the normalised descriptors c [B, S, D] (and per-slice
        inputs `extra` [B, S, E] for the MLP)."""
        dtype = self.gate.weight.dtype  # the head may be bf16
        h = c.float() if self.proj is None else self.proj(c.to(dtype)).float()  # [B, S, H]
        hn = nn.functional.normalize(h, dim=-1)
        rel = [x.unsqueeze(-1) for temp in self.temps for x in self.relations(hn, mask, temp)]
        x = torch.cat([h] * self.use_h + rel + ([] if extra is None else [extra.float()]), dim=-1)
        return self.mlp(nn.functional.gelu(x).to(dtype)).squeeze(-1).float()

    @torch.no_grad()
    def intensity_inputs(self, slices: torch.Tensor, mask: torch.Tensor,
                         plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slices [B, S, 1, h, w] -> (the teacher's intensity features [B, S, F], vote-k on them
        [B, S, 2]: in-votes / their max, and 1 on the picks), both without gradient."""
        feats = intensity_features(slices.float(), size=self.vote_mi.cfg.feature_size, mask=mask)
        vk = torch.zeros(*mask.shape, 2)
        for i, planes in enumerate(self.vote_mi.select(feats, mask, plane)):
            for r in planes.values():
                vk[i, :, 0] += (r.votes / r.votes.max().clamp_min(1.0)).float()
                vk[i, r.picks, 1] = 1.0
        return feats, vk.to(feats.device)

    def forward(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, slices: torch.Tensor | None = None,
                slice_plane: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, S, D], t [B, D], mask [B, S]; slices [B, S, 1, h, w] in [0, 1] (and slice_plane
        [B, S], default all axial), needed when the context term reads the intensity features."""
        if not self.on_intensity:
            return self.scores_from(z, t, mask)
        if slices is None:
            raise ValueError("ContextScorer: tgis.context_features=intensity needs the slices [B, S, 1, h, w]")
        plane = torch.zeros_like(mask, dtype=torch.long) if slice_plane is None else slice_plane
        return self.scores_from(z, t, mask, *self.intensity_inputs(slices, mask, plane))

    def scores_from(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                    feats: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The logits with the context term on `feats` [B, S, F] (None: on the descriptors z)."""
        c = volume_normalised(z.float(), mask)
        text = torch.einsum("bsd,bd->bs", c if self.normalise_text else z.float(), t.float()) / self.tau
        gate = nn.functional.softplus(self.gate(t.to(self.gate.weight.dtype)).float())  # [B, 1]
        ctx = c if feats is None else volume_normalised(feats.float(), mask)
        return text + gate * self.context(ctx, mask, extra)


@SCORERS.register("context")
def _context(cfg: TGISConfig, dim: int, **kwargs: Any) -> nn.Module:
    return ContextScorer(cfg, dim, **kwargs)
