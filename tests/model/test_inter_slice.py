"""InterSlice: identity at init, masking of padded slices, dependence on other slices, checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvlm3d.config import InterSliceConfig
from medvlm3d.model.inter_slice import InterSlice, joint_over_images, sinusoid

D, T = 16, 4


def _inputs(b: int = 2, s: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, s, T, D, generator=g)
    pos = (torch.arange(s).float() + 0.5).div(s).expand(b, s).clone()
    plane = torch.zeros(b, s, dtype=torch.long)
    mask = torch.ones(b, s, dtype=torch.bool)
    return tokens, pos, plane, mask


def _live(module: InterSlice, seed: int = 1) -> InterSlice:
    """A variant whose output Linear is not zero, so slices visibly interact."""
    torch.manual_seed(seed)
    nn.init.normal_(module.out.weight, std=0.5)
    nn.init.normal_(module.out.bias, std=0.5)
    return module.eval()


def test_identity_at_init_and_shape():
    mod = InterSlice(InterSliceConfig(num_heads=2), D)
    tokens, pos, plane, mask = _inputs()
    mask[1, 3:] = False
    tokens[~mask] = 0
    out = mod(tokens, pos, plane, mask)
    assert out.shape == tokens.shape
    torch.testing.assert_close(out, tokens)


def test_appended_padding_does_not_change_real_slices():
    mod = _live(InterSlice(InterSliceConfig(num_heads=2, num_layers=2), D))
    tokens, pos, plane, mask = _inputs(s=4)
    with torch.no_grad():
        ref = mod(tokens, pos, plane, mask)
        pad = 3
        tokens_p = torch.cat([tokens, torch.randn(2, pad, T, D)], dim=1)  # garbage in padded slots
        pos_p = torch.cat([pos, torch.rand(2, pad)], dim=1)
        plane_p = torch.cat([plane, torch.full((2, pad), 7)], dim=1)  # out-of-range, but padded
        mask_p = torch.cat([mask, torch.zeros(2, pad, dtype=torch.bool)], dim=1)
        out = mod(tokens_p, pos_p, plane_p, mask_p)
    torch.testing.assert_close(out[:, :4], ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out[:, 4:] == 0)


def test_outputs_depend_on_other_slices_and_position():
    mod = _live(InterSlice(InterSliceConfig(num_heads=2), D))
    tokens, pos, plane, mask = _inputs()
    with torch.no_grad():
        base = mod(tokens, pos, plane, mask)
        changed = tokens.clone()
        changed[:, 3] += torch.randn(T, D)  # change slice 3 only (not a constant: LayerNorm removes it)
        other = mod(changed, pos, plane, mask)
        moved = mod(tokens, pos.flip(1), plane, mask)
        coronal = mod(tokens, pos, torch.ones_like(plane), mask)
    assert (other[:, 0] - base[:, 0]).abs().max() > 1e-4  # slice 0 sees slice 3
    assert (moved[:, 0] - base[:, 0]).abs().max() > 1e-4
    assert (coronal - base).abs().max() > 1e-4


def test_training_step_makes_slices_interact():
    mod = InterSlice(InterSliceConfig(num_heads=2), D)
    tokens, pos, plane, mask = _inputs()
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    target = torch.randn_like(tokens)
    nn.functional.mse_loss(mod(tokens, pos, plane, mask), target).backward()
    assert mod.out.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert (mod(tokens, pos, plane, mask) - tokens).abs().max() > 1e-4


def test_series_embedding_and_all_padded_study():
    mod = _live(InterSlice(InterSliceConfig(num_heads=2, num_series=2), D))
    tokens, pos, plane, mask = _inputs()
    mask[1] = False
    tokens[1] = 0
    series = torch.zeros(2, 5, dtype=torch.long)
    series[0, 2:] = 1
    with torch.no_grad():
        a = mod(tokens, pos, plane, mask)
        b = mod(tokens, pos, plane, mask, series=series)
    assert torch.isfinite(a).all() and torch.all(a[1] == 0)
    assert (a[0] - b[0]).abs().max() > 1e-4


def test_sinusoid_any_length():
    emb = sinusoid(torch.rand(3, 7), 15)
    assert emb.shape == (3, 7, 15) and torch.all(emb[..., -1] == 0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible by inter_slice.num_heads"):
        InterSlice(InterSliceConfig(num_heads=3), D)
    with pytest.raises(ValueError, match="num_layers, num_planes and max_slices must be >= 1"):
        InterSlice(InterSliceConfig(num_heads=2, num_layers=0), D)
    mod = InterSlice(InterSliceConfig(num_heads=2), D)
    tokens, pos, plane, mask = _inputs()
    with pytest.raises(ValueError, match=r"expected tokens \[2, 5, T, 16\]"):
        mod(tokens[..., :8], pos, plane, mask)
    with pytest.raises(ValueError, match=r"expected slice_pos \[2, 5\]"):
        mod(tokens, pos[:, :3], plane, mask)
    with pytest.raises(ValueError, match="expected a bool mask"):
        mod(tokens, pos, plane, mask.long())
    with pytest.raises(ValueError, match=r"slice_plane must lie in \[0, 2\]"):
        mod(tokens, pos, plane + 3, mask)


def test_joint_over_images_is_one_sequence_per_sample():
    mod = _live(InterSlice(InterSliceConfig(num_heads=2, num_series=3), D))
    nn.init.normal_(mod.series_embed.weight)
    tokens, pos, plane, mask = _inputs(b=3, s=4, seed=2)
    mask[2, 3] = False
    owner = torch.tensor([0, 0, 1])  # sample 0 has two images (series 0 and 1), sample 1 one
    out = joint_over_images(mod, tokens, pos, plane, mask, None, owner)
    series = torch.tensor([[0] * 4 + [1] * 4])
    cat = lambda x: x[:2].reshape(1, 8, *x.shape[2:])  # noqa: E731
    first = mod(cat(tokens), cat(pos), cat(plane), cat(mask), series)
    torch.testing.assert_close(out[:2], first.reshape(2, 4, T, D))
    torch.testing.assert_close(out[2:], mod(tokens[2:], pos[2:], plane[2:], mask[2:], torch.zeros(1, 4, dtype=torch.long)))
    given = torch.tensor([[0] * 4, [2] * 4, [0] * 4])  # explicit series ids are used as given
    assert not torch.allclose(joint_over_images(mod, tokens, pos, plane, mask, given, owner)[1], out[1])
    with pytest.raises(ValueError, match="image_to_sample"):
        joint_over_images(mod, tokens, pos, plane, mask, None, owner[:2])
