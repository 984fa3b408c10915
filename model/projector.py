"""Projectors from encoder widths into the LLM width.

    Projector3D: tokens [B, d*h*w, in_dim] on grid (d, h, w)
                 -> avg-pool with kernel `pool3d` (stride = kernel) -> MLP -> [B, d'*h'*w', out_dim]
    Projector2D: [..., in_dim] -> MLP -> [..., out_dim]

The MLP is `depth` Linear layers with GELU between them (hidden width `hidden_size`, or
`out_dim` when 0); with depth 2 it is LLaVA's `mlp2x_gelu` (same `0.` / `2.` parameter names).
With `out_norm` a LayerNorm follows the MLP; its gain starts at `out_scale` (MedVLM passes the RMS
of the LLM's input embeddings), so visual tokens enter the LLM at the scale of its text tokens.
Tokens stay in row-major (d, h, w) order. `projected_grid(grid, pool)` gives the pooled grid,
so token counts can be computed without building a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange
from torch import nn


@dataclass
class ProjectorConfig:
    """3D pooling + MLP and 2D MLP into the LLM width."""

    pool3d: tuple[int, int, int] = (1, 2, 2)  # kernel on the 3D token grid
    depth: int = 2  # MLP layers
    hidden_size: int = 0  # 0 = the LLM width
    # LayerNorm on the projected tokens, its gain started at the RMS of the LLM's input embeddings,
    # so visual tokens enter the LLM at the scale of its text tokens
    out_norm: bool = False


def projected_grid(grid: Sequence[int], pool: Sequence[int]) -> tuple[int, int, int]:
    """(d, h, w) pooled by kernel (kd, kh, kw) -> (d/kd, h/kh, w/kw); each must divide exactly."""
    grid, pool = tuple(int(g) for g in grid), tuple(int(p) for p in pool)
    if len(grid) != 3 or len(pool) != 3 or min(grid + pool) < 1:
        raise ValueError(f"grid and projector.pool3d must be 3 positive integers each, got {grid} and {pool}")
    if any(g % p for g, p in zip(grid, pool)):
        raise ValueError(f"3D token grid {grid} must be divisible by projector.pool3d {pool}")
    return tuple(g // p for g, p in zip(grid, pool))  # type: ignore[return-value]


def build_mlp(in_dim: int, out_dim: int, depth: int, hidden: int = 0) -> nn.Sequential:
    """`depth` Linear layers with GELU between: in_dim -> hidden -> ... -> out_dim."""
    if depth < 1 or in_dim < 1 or out_dim < 1 or hidden < 0:
        raise ValueError(f"projector needs depth >= 1, in_dim/out_dim >= 1 and hidden_size >= 0, "
                         f"got depth={depth}, in_dim={in_dim}, out_dim={out_dim}, hidden_size={hidden}")
    hidden = hidden or out_dim
    widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


def build_out_norm(enabled: bool, dim: int, scale: float) -> nn.Module:
    """LayerNorm(dim) with its gain filled with `scale` when `enabled`, else Identity."""
    if not enabled:
        return nn.Identity()
    if not scale > 0:
        raise ValueError(f"projector out_norm needs a positive out_scale, got {scale}")
    norm = nn.LayerNorm(dim)
    with torch.no_grad():
        norm.weight.fill_(float(scale))
    return norm


class Projector3D(nn.Module):
    """3D tokens [B, d*h*w, in_dim] -> pooled, projected tokens [B, num_tokens, out_dim].

    Attributes: `grid` (input), `out_grid` (after pooling), `num_tokens` (= prod(out_grid)).
    """

    def __init__(self, cfg: ProjectorConfig, in_dim: int, grid: tuple[int, int, int], out_dim: int,
                 out_scale: float = 1.0) -> None:
        super().__init__()
        self.out_grid = projected_grid(grid, cfg.pool3d)
        self.grid = tuple(int(g) for g in grid)
        self.pool3d = tuple(int(p) for p in cfg.pool3d)
        self.num_tokens = self.out_grid[0] * self.out_grid[1] * self.out_grid[2]
        self.pool = nn.AvgPool3d(self.pool3d) if self.pool3d != (1, 1, 1) else None
        self.mlp = build_mlp(in_dim, out_dim, cfg.depth, cfg.hidden_size)
        self.norm = build_out_norm(cfg.out_norm, out_dim, out_scale)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, d*h*w, in_dim] -> [B, d'*h'*w', out_dim]."""
        d, h, w = self.grid
        if tokens.ndim != 3 or tokens.shape[1] != d * h * w or tokens.shape[2] != self.in_dim:
            raise ValueError(f"Projector3D expected tokens [B, {d * h * w}, {self.in_dim}] (grid {self.grid}), "
                             f"got {list(tokens.shape)}")
        if self.pool is not None:
            x = rearrange(tokens, "b (d h w) c -> b c d h w", d=d, h=h, w=w)
            tokens = rearrange(self.pool(x), "b c d h w -> b (d h w) c")
        return self.norm(self.mlp(tokens))


class Projector2D(nn.Module):
    """Slice tokens [..., in_dim] -> [..., out_dim] (e.g. [B, S, T, D2] -> [B, S, T, Dl])."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, out_scale: float = 1.0) -> None:
        super().__init__()
        self.mlp = build_mlp(in_dim, out_dim, cfg.depth, cfg.hidden_size)
        self.norm = build_out_norm(cfg.out_norm, out_dim, out_scale)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> [..., out_dim]."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"Projector2D expected last dim {self.in_dim}, got {list(x.shape)}")
        return self.norm(self.mlp(x))
