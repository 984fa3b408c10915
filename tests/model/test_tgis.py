"""TG-IS: shapes, masked scores, depth groups by hand, fusion, tau, top-k, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from medvlm3d.config import TGISConfig
from medvlm3d.model.tgis import TGIS, TGISOutput, masked_softmax, slice_descriptors, slice_groups

GRID = (4, 2, 3)  # d, h, w -> 24 tokens
B, S, T, D, DT = 3, 5, 2, 8, 6


def make_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    v = torch.randn(B, S, T, D, generator=g) * mask[..., None, None]
    return dict(
        x3d=torch.randn(B, 24, D, generator=g),
        grid=GRID,
        v=v,
        text=torch.randn(B, DT, generator=g),
        slice_pos=torch.rand(B, S, generator=g) * 0.98 + 0.01,
        slice_plane=torch.tensor([[0, 0, 1, 2, 0], [2, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        mask=mask,
    )


def make_tgis(**cfg) -> TGIS:
    torch.manual_seed(0)
    return TGIS(TGISConfig(**cfg), D, DT)


def test_shapes_and_masked_scores() -> None:
    inp = make_inputs()
    out = make_tgis()(**inp)
    assert isinstance(out, TGISOutput)
    assert out.scores.shape == (B, S) and out.logits.shape == (B, S) and out.z2d.shape == (B, T, D)
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(B))
    assert bool((out.scores[~inp["mask"]] == 0).all())  # exactly 0 on padding
    assert bool((out.scores[inp["mask"]] > 0).all())
    assert out.scores[2, 0].item() == pytest.approx(1.0)  # a single real slice gets everything


def test_slice_groups_by_hand() -> None:
    # grid (4, 2, 3): axial -> axis d (4), coronal -> h (2), sagittal -> w (3)
    pos = torch.tensor([[0.10, 0.30, 0.99, 0.49, 0.51, 0.34, 0.90, 0.20, 1.0]])
    plane = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0]])
    got = slice_groups(pos, plane, GRID)
    # floor(.1*4)=0, floor(.3*4)=1, floor(.99*4)=3, floor(.49*2)=0, floor(.51*2)=1,
    # floor(.34*3)=1, floor(.9*3)=2, floor(.2*3)=0, pos 1.0 clamps to the last group 3
    assert got.tolist() == [[0, 1, 3, 0, 1, 1, 2, 0, 3]]


def test_descriptor_is_mean_of_slice_and_group_tokens() -> None:
    inp = make_inputs(1)
    z = slice_descriptors(inp["x3d"], GRID, inp["v"], inp["slice_pos"], inp["slice_plane"])
    d, h, w = GRID
    for b in range(B):
        for j in range(S):
            p = int(inp["slice_plane"][b, j])
            g = int(inp["slice_pos"][b, j] * GRID[p])
            tokens = []
            for i in range(d):
                for k in range(h):
                    for m in range(w):
                        if (i, k, m)[p] == g:
                            tokens.append(inp["x3d"][b, (i * h + k) * w + m])
            assert len(tokens) == 24 // GRID[p]
            want = torch.cat([inp["v"][b, j], torch.stack(tokens)]).mean(0)
            torch.testing.assert_close(z[b, j], want)


def test_logits_and_z2d_match_manual() -> None:
    inp = make_inputs(2)
    tg = make_tgis(tau=5.0)
    out = tg(**inp)
    z = slice_descriptors(inp["x3d"], GRID, inp["v"], inp["slice_pos"], inp["slice_plane"])
    t = tg.text_proj(inp["text"])
    torch.testing.assert_close(out.logits, (z * t[:, None]).sum(-1) / 5.0)
    want = torch.stack([sum(out.scores[b, j] * inp["v"][b, j] for j in range(S)) for b in range(B)])
    torch.testing.assert_close(out.z2d, want)


def test_tau_controls_sharpness() -> None:
    inp = make_inputs(3)

    def entropy(tau: float) -> torch.Tensor:
        s = make_tgis(tau=tau)(**inp).scores[0].detach()
        return float(-(s * s.clamp_min(1e-12).log()).sum())

    e_sharp, e_mid, e_flat = entropy(0.05), entropy(1.0), entropy(100.0)
    assert e_sharp < e_mid < e_flat
    assert e_flat == pytest.approx(float(torch.log(torch.tensor(5.0))), abs=0.05)


def test_top_k_keeps_exactly_k() -> None:
    inp = make_inputs(4)
    soft = make_tgis()(**inp)
    hard = make_tgis(top_k=2)(**inp)
    nonzero = (hard.scores > 0).sum(-1).tolist()
    assert nonzero == [2, 2, 1]  # min(k, real slices)
    torch.testing.assert_close(hard.scores.sum(-1), torch.ones(B))
    top = soft.logits[0].topk(2).indices
    assert set(hard.scores[0].nonzero().flatten().tolist()) == set(top.tolist())
    torch.testing.assert_close(hard.scores[0, top], torch.softmax(soft.logits[0, top], -1))


def test_top_k_differentiable_through_kept_logits() -> None:
    inp = make_inputs(5)
    inp["v"].requires_grad_(True)
    tg = make_tgis(top_k=2)
    out = tg(**inp)
    (out.z2d * torch.randn_like(out.z2d)).sum().backward()
    assert tg.text_proj.weight.grad is not None and tg.text_proj.weight.grad.abs().sum() > 0


def test_gradients_flow_to_text_proj_and_v() -> None:
    inp = make_inputs(6)
    inp["v"].requires_grad_(True)
    inp["x3d"].requires_grad_(True)
    tg = make_tgis()
    out = tg(**inp)
    (out.z2d * torch.randn_like(out.z2d)).sum().backward()
    assert tg.text_proj.weight.grad.abs().sum() > 0
    assert tg.text_proj.bias.grad.abs().sum() > 0
    assert inp["v"].grad.abs().sum() > 0 and inp["x3d"].grad.abs().sum() > 0
    assert bool((inp["v"].grad[~inp["mask"]] == 0).all())  # padded slices get no gradient


def test_masked_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, -1.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    s = masked_softmax(logits, mask)
    torch.testing.assert_close(s[0], torch.tensor([torch.e**1, 0, torch.e**3]) / (torch.e**1 + torch.e**3))
    assert s[1].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="at least one real"):
        masked_softmax(logits, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="must match"):
        masked_softmax(logits, mask[:, :2])


def test_bad_config_and_constructor() -> None:
    with pytest.raises(ValueError, match="tau"):
        TGISConfig(tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        TGISConfig(tau=-1.0)
    cfg = TGISConfig()
    cfg.tau = 0.0  # mutated after validation
    with pytest.raises(ValueError, match="tau"):
        TGIS(cfg, D, DT)
    with pytest.raises(ValueError, match="dim"):
        TGIS(TGISConfig(), 0, DT)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("x3d", torch.zeros(B, 23, D), "x3d"),
        ("x3d", torch.zeros(B, 24, D + 1), "x3d"),
        ("v", torch.zeros(B, S, T, D + 1), "v must be"),
        ("text", torch.zeros(B, DT + 1), "text"),
        ("slice_pos", torch.zeros(B, S + 1), "slice_pos"),
        ("mask", torch.ones(B, S, dtype=torch.long), "bool"),
        ("grid", (4, 2, 2), "x3d"),
        ("slice_plane", torch.full((B, S), 3), "slice_plane"),
    ],
)
def test_bad_inputs_raise(key: str, value, match: str) -> None:
    inp = make_inputs()
    inp[key] = value
    with pytest.raises(ValueError, match=match):
        make_tgis()(**inp)


def test_all_padded_row_raises() -> None:
    inp = make_inputs()
    inp["mask"] = inp["mask"].clone()
    inp["mask"][1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have no real slices"):
        make_tgis()(**inp)


def test_padded_plane_values_are_ignored() -> None:
    inp = make_inputs(7)
    out = make_tgis()(**inp)
    plane = inp["slice_plane"].clone()
    plane[~inp["mask"]] = 7  # garbage on padding only
    out2 = make_tgis()(**{**inp, "slice_plane": plane})
    torch.testing.assert_close(out.scores, out2.scores)


def test_pos_embed_starts_as_identity() -> None:
    # pos_proj and plane_embed start at zero: the same scores and z2d as a head without them
    inp = make_inputs(3)
    plain, with_pos = make_tgis(), make_tgis(pos_embed=True)
    assert with_pos.pos_proj is not None and plain.pos_proj is None
    a, b = plain(**inp), with_pos(**inp)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.z2d, b.z2d)


def test_pos_embed_adds_score_weighted_position() -> None:
    # identical slices: without a position embedding z2d cannot say where the mass lies; with one,
    # z2d = v + sum_j s_j pe_j, and moving the slices moves z2d (padding gets no embedding)
    inp = make_inputs(4)
    inp["v"] = inp["v"][:, :1].expand(-1, S, -1, -1) * inp["mask"][..., None, None]
    tg = make_tgis(pos_embed=True)
    with torch.no_grad():
        torch.nn.init.normal_(tg.pos_proj.weight)
        torch.nn.init.normal_(tg.plane_embed.weight)
    out = tg(**inp)
    plane = torch.where(inp["mask"], inp["slice_plane"], torch.zeros_like(inp["slice_plane"]))
    pe = tg.position_embedding(inp["slice_pos"], plane) * inp["mask"][..., None]
    want = inp["v"][:, 0] + torch.einsum("bs,bsd->bd", out.scores, pe)[:, None, :]
    torch.testing.assert_close(out.z2d, want)
    moved = dict(inp, slice_pos=(inp["slice_pos"] + 0.3) % 1.0)
    assert not torch.allclose(tg(**moved).z2d, out.z2d)
    padded_pos = dict(inp, slice_pos=torch.where(inp["mask"], inp["slice_pos"], torch.rand(B, S)))
    torch.testing.assert_close(tg(**padded_pos).z2d, out.z2d)


def test_pos_embed_learns_to_score_by_position() -> None:
    # slices that differ only in position: a few steps teach the head to put its mass on the last
    # one, which it cannot do without the embedding (all logits equal -> uniform)
    inp = make_inputs(5)
    inp["v"] = torch.ones(B, S, T, D) * inp["mask"][..., None, None]
    inp["x3d"] = torch.zeros(B, 24, D)
    inp["slice_plane"] = torch.zeros(B, S, dtype=torch.long)
    inp["slice_pos"] = torch.linspace(0.1, 0.9, S).expand(B, S).clone()
    inp["mask"] = torch.ones(B, S, dtype=torch.bool)
    for pos_embed, want_high in ((False, False), (True, True)):
        tg = make_tgis(pos_embed=pos_embed)
        opt = torch.optim.Adam(tg.parameters(), lr=0.05)
        for _ in range(60):
            loss = -torch.log(tg(**inp).scores[:, -1]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        mass = float(tg(**inp).scores[:, -1].mean().detach())
        assert (mass > 0.9) == want_high, (pos_embed, mass)
