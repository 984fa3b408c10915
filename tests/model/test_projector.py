"""Projectors: pooled grids, token order, MLP depth, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvlm3d.config import ProjectorConfig
from medvlm3d.model.projector import Projector2D, Projector3D, build_mlp, projected_grid


def test_projected_grid():
    assert projected_grid((8, 16, 16), (2, 2, 2)) == (4, 8, 8)  # Med-2E3: 2,048 -> 256 tokens
    assert projected_grid((4, 2, 2), (1, 1, 1)) == (4, 2, 2)
    with pytest.raises(ValueError, match=r"grid \(4, 3, 2\) must be divisible by projector.pool3d \(1, 2, 2\)"):
        projected_grid((4, 3, 2), (1, 2, 2))
    with pytest.raises(ValueError, match="3 positive integers"):
        projected_grid((4, 2), (1, 1, 1))


def test_projector3d_shapes_and_pooling_order():
    cfg = ProjectorConfig(pool3d=(1, 2, 2), depth=1)
    proj = Projector3D(cfg, in_dim=3, grid=(2, 4, 4), out_dim=5)
    assert proj.out_grid == (2, 2, 2) and proj.num_tokens == 8
    with torch.no_grad():  # identity-like weights to check the pooling itself
        proj.mlp[0].weight.zero_()
        proj.mlp[0].weight[:3, :3] = torch.eye(3)
        proj.mlp[0].bias.zero_()
    grid = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)  # value = row-major index
    tokens = grid.reshape(1, 32, 1).expand(1, 32, 3)
    out = proj(tokens)
    assert out.shape == (1, 8, 5)
    expected = grid.reshape(2, 2, 2, 2, 2).mean(dim=(2, 4)).reshape(8)  # 2x2 blocks of each depth row
    torch.testing.assert_close(out[0, :, 0], expected)


def test_projector3d_rejects_bad_args():
    with pytest.raises(ValueError, match="must be divisible by projector.pool3d"):
        Projector3D(ProjectorConfig(pool3d=(2, 2, 2)), 8, (3, 4, 4), 16)
    with pytest.raises(ValueError, match="depth >= 1"):
        Projector3D(ProjectorConfig(depth=0), 8, (2, 4, 4), 16)
    proj = Projector3D(ProjectorConfig(), 8, (2, 4, 4), 16)
    with pytest.raises(ValueError, match=r"expected tokens \[B, 32, 8\]"):
        proj(torch.rand(1, 30, 8))


@pytest.mark.parametrize("depth,hidden,widths", [(1, 0, [(8, 16)]), (2, 0, [(8, 16), (16, 16)]),
                                                  (3, 32, [(8, 32), (32, 32), (32, 16)])])
def test_mlp_depth_and_hidden(depth, hidden, widths):
    mlp = build_mlp(8, 16, depth, hidden)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == widths
    assert sum(isinstance(m, nn.GELU) for m in mlp) == depth - 1


def test_projector2d_any_leading_dims():
    proj = Projector2D(ProjectorConfig(depth=2), 8, 16)
    assert set(proj.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}  # LLaVA names
    assert proj(torch.rand(2, 3, 4, 8)).shape == (2, 3, 4, 16)
    with pytest.raises(ValueError, match="expected last dim 8"):
        proj(torch.rand(2, 3, 4, 7))
    with pytest.raises(ValueError, match="hidden_size >= 0"):
        Projector2D(ProjectorConfig(hidden_size=-1), 8, 16)


@pytest.mark.parametrize("cls_args", [(Projector3D, ((2, 4, 4),)), (Projector2D, ())])
def test_out_norm_starts_tokens_at_the_given_scale(cls_args):
    cls, extra = cls_args
    cfg = ProjectorConfig(out_norm=True)
    proj = cls(cfg, 8, *extra, 16, out_scale=0.03)
    x = torch.randn(2, 32, 8) * 50  # raw encoder features far from the text scale
    rms = proj(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.03), rtol=1e-3, atol=1e-5)
    assert {"norm.weight", "norm.bias"} <= set(proj.state_dict())
    plain = cls(ProjectorConfig(), 8, *extra, 16, out_scale=0.03)
    assert not any(k.startswith("norm.") for k in plain.state_dict())  # off: no parameters, old checkpoints load
    with pytest.raises(ValueError, match="positive out_scale"):
        cls(cfg, 8, *extra, 16, out_scale=0.0)
