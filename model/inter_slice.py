"""MS-VLM style inter-slice transformer: slices of a study attend to each other along S.

    tokens [B, S, T, D], slice_pos [B, S], slice_plane [B, S], mask [B, S] (, series [B, S])
        ->  tokens [B, S, T, D]

Per slice: the mean of its T tokens, plus a continuous position embedding (sinusoid of
`slice_pos * max_slices`, then a Linear; any S works, as in MS-VLM), plus a plane embedding
(`nn.Embedding(num_planes)`) and optionally a series / phase embedding
(`nn.Embedding(num_series)`, when `num_series > 0` and `series` is given). A
`nn.TransformerEncoder` runs along S with the padded slices masked out of attention; a Linear
maps its output to a per-slice offset added to every token of that slice. The Linear starts at
zero, so a fresh module is the identity. Padded slices come out as zeros.

`joint_over_images(module, tokens [N, S, T, D], ..., image_to_sample [N])` runs the module once
per *sample*: the slices of all images of a record (several series / phases, each with its
planes) form one sequence, the series embedding telling them apart (MS-VLM's "multiple images
acquired from different planes and phases"); the output is split back to [N, S, T, D].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import nn


@dataclass
class InterSliceConfig:
    """MS-VLM style transformer along the slice axis: [B, S, T, D2] -> [B, S, T, D2]."""

    num_layers: int = 1
    num_heads: int = 4
    max_slices: int = 512
    num_planes: int = 3
    num_series: int = 4
    dropout: float = 0.0


def sinusoid(pos: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoid of real-valued positions: pos [...] -> [..., dim] (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.float()[..., None] * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class InterSlice(nn.Module):
    """Transformer along the slice axis with a zero-initialised residual per slice.

    Args:
        cfg: the inter-slice section of the config (layers, heads, planes, series, dropout).
        dim: token width D (the slice encoder's `out_dim`); must be divisible by `cfg.num_heads`.
    """

    def __init__(self, cfg: InterSliceConfig, dim: int) -> None:
        super().__init__()
        if dim < 2 or cfg.num_heads < 1 or dim % cfg.num_heads:
            raise ValueError(f"InterSlice dim ({dim}) must be >= 2 and divisible by inter_slice.num_heads "
                             f"({cfg.num_heads})")
        if cfg.num_layers < 1 or cfg.num_planes < 1 or cfg.num_series < 0 or cfg.max_slices < 1:
            raise ValueError("inter_slice.num_layers, num_planes and max_slices must be >= 1 and num_series >= 0, "
                             f"got {cfg.num_layers}, {cfg.num_planes}, {cfg.max_slices}, {cfg.num_series}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"inter_slice.dropout must be in [0, 1), got {cfg.dropout}")
        self.dim = dim
        self.max_slices = cfg.max_slices
        self.num_planes = cfg.num_planes
        self.num_series = cfg.num_series
        self.pos_proj = nn.Linear(dim, dim)
        self.plane_embed = nn.Embedding(cfg.num_planes, dim)
        self.series_embed = nn.Embedding(cfg.num_series, dim) if cfg.num_series > 0 else None
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=cfg.num_heads, dim_feedforward=4 * dim, dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        slice_pos: torch.Tensor,
        slice_plane: torch.Tensor,
        mask: torch.Tensor,
        series: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, S, T, D], slice_pos [B, S] float in (0, 1), slice_plane [B, S] long,
        mask [B, S] bool (True = real), series [B, S] long or None -> [B, S, T, D]."""
        b, s = mask.shape
        if tokens.ndim != 4 or tuple(tokens.shape[:2]) != (b, s) or tokens.shape[-1] != self.dim:
            raise ValueError(f"InterSlice expected tokens [{b}, {s}, T, {self.dim}], got {list(tokens.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"InterSlice expected a bool mask, got {mask.dtype}")
        for name, t in (("slice_pos", slice_pos), ("slice_plane", slice_plane), ("series", series)):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"InterSlice expected {name} [{b}, {s}], got {list(t.shape)}")
        plane = self._index(slice_plane, mask, self.num_planes, "slice_plane")
        x = reduce(tokens, "b s t d -> b s d", "mean")
        x = x + self.pos_proj(sinusoid(slice_pos * self.max_slices, self.dim).to(x.dtype))
        x = x + self.plane_embed(plane)
        if series is not None and self.series_embed is not None:
            x = x + self.series_embed(self._index(series, mask, self.num_series, "series"))
        # A study with no real slice would make attention all -inf (NaN): let it attend, then zero it.
        pad = ~mask & mask.any(dim=1, keepdim=True)
        h = self.encoder(x, src_key_padding_mask=pad)
        delta = rearrange(self.out(h), "b s d -> b s 1 d")
        return (tokens + delta) * rearrange(mask, "b s -> b s 1 1").to(tokens.dtype)

    @staticmethod
    def _index(idx: torch.Tensor, mask: torch.Tensor, n: int, name: str) -> torch.Tensor:
        idx = idx.long().masked_fill(~mask, 0)  # padded positions may hold anything
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"InterSlice {name} must lie in [0, {n - 1}] on real slices, "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
        return idx


def joint_over_images(
    module: InterSlice,
    tokens: torch.Tensor,
    slice_pos: torch.Tensor,
    slice_plane: torch.Tensor,
    mask: torch.Tensor,
    series: torch.Tensor | None,
    image_to_sample: torch.Tensor,
) -> torch.Tensor:
    """tokens [N, S, T, D] of N images, image_to_sample [N] (non-decreasing) -> [N, S, T, D], each
    sample's images read as one sequence of (images x S) slices. `series` None = the image's
    position within its sample."""
    n, s = mask.shape
    owner = image_to_sample.to(mask.device).long()
    if tuple(owner.shape) != (n,):
        raise ValueError(f"joint_over_images: image_to_sample must be [{n}], got {list(owner.shape)}")
    b = int(owner.max()) + 1 if n else 0
    counts = torch.bincount(owner, minlength=b)
    rank = torch.arange(n, device=owner.device) - (counts.cumsum(0) - counts)[owner]  # image's place in its sample
    if series is None:
        series = rank[:, None].expand(n, s)
    m = int(counts.max()) if n else 0

    def group(x: torch.Tensor) -> torch.Tensor:  # [N, S, ...] -> [B, m * S, ...]
        out = x.new_zeros((b, m, *x.shape[1:]))
        out[owner, rank] = x
        return rearrange(out, "b m s ... -> b (m s) ...")

    joint = module(group(tokens), group(slice_pos), group(slice_plane), group(mask), group(series))
    return rearrange(joint, "b (m s) ... -> b m s ...", m=m)[owner, rank]
