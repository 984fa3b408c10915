"""TG-IS behaviours that mutation testing (bench/mutation.sh) found unpinned.

top-k with k=1, a k above the batch size, non-bool masks and padded high logits; the slab means
of every axis by hand; the error messages users read; position and plane embeddings in other
dtypes; the context scorer's votes and density against a loop by hand, its default architecture
(what a checkpoint holds) and its gate; `volume_normalised` at its edges.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medvlm3d.config import TGISConfig
from medvlm3d.model.tgis import (
    TGIS,
    ContextScorer,
    masked_softmax,
    slab_means,
    slice_descriptors,
    topk_mask,
    volume_normalised,
)

D, DT = 8, 6


# --------------------------------------------------------------------------------------------
# topk_mask


def test_topk_k1_keeps_the_argmax_and_k0_names_the_rule() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    assert topk_mask(logits, torch.ones(1, 4, dtype=torch.bool), 1).tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        topk_mask(logits, torch.ones(1, 4, dtype=torch.bool), 0)


def test_topk_k_above_batch_size_keeps_k_per_row() -> None:
    # one row (B=1) of 5 slices, k=3: the cut is min(k, S), never min(k, B)
    logits = torch.tensor([[0.3, 0.9, 0.1, 0.7, 0.5]])
    keep = topk_mask(logits, torch.ones(1, 5, dtype=torch.bool), 3)
    assert keep.tolist() == [[False, True, False, True, True]]


def test_topk_padded_high_logit_takes_no_slot() -> None:
    logits = torch.tensor([[9.0, 0.2, 0.1, 0.3], [0.0, 5.0, 1.0, 2.0]])
    mask = torch.tensor([[False, True, True, True], [True, False, True, True]])
    keep = topk_mask(logits, mask, 2)
    assert keep.tolist() == [[False, True, False, True], [False, False, True, True]]


def test_topk_integer_mask_gives_bool_and_ties_go_to_the_lowest_index() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1]], dtype=torch.uint8)
    keep = topk_mask(torch.zeros(1, 8), mask, 3)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [[True, True, True, False, False, False, False, False]]


def test_masked_softmax_empty_row_message() -> None:
    with pytest.raises(ValueError, match=r"^masked_softmax: every row needs at least one real \(mask=True\) entry$"):
        masked_softmax(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


# --------------------------------------------------------------------------------------------
# slab_means


def test_slab_means_by_hand_on_every_axis() -> None:
    d, h, w = 2, 3, 4
    x = torch.arange(2 * d * h * w * 2, dtype=torch.float32).reshape(2, d * h * w, 2)
    means, counts, offsets = slab_means(x, (d, h, w))
    assert means.shape == (2, d + h + w, 2)
    assert counts.tolist() == [h * w, d * w, d * h] and offsets.tolist() == [0, d, d + h]
    grid = x.reshape(2, d, h, w, 2)
    for a, size in enumerate((d, h, w)):
        for i in range(size):
            slab = grid.select(a + 1, i).reshape(2, -1, 2)  # the tokens with coordinate i on axis a
            assert slab.shape[1] == counts[a]
            torch.testing.assert_close(means[:, offsets[a] + i], slab.mean(1))


def test_descriptors_follow_the_slice_token_dtype() -> None:
    # a bfloat16 head with float32 3D tokens: z comes out in the slice tokens' dtype
    v = torch.randn(1, 2, 3, D).bfloat16()
    z = slice_descriptors(torch.randn(1, 24, D), (4, 2, 3), v, torch.tensor([[0.2, 0.7]]), torch.tensor([[0, 2]]))
    assert z.dtype == torch.bfloat16 and z.shape == (1, 2, D)


def tgis_inputs(b: int = 2, s: int = 3, t: int = 2) -> dict:
    return dict(x3d=torch.randn(b, 24, D), grid=(4, 2, 3), v=torch.randn(b, s, t, D), text=torch.randn(b, DT),
                slice_pos=torch.rand(b, s), slice_plane=torch.zeros(b, s, dtype=torch.long),
                mask=torch.ones(b, s, dtype=torch.bool))


@pytest.mark.parametrize("grid", [(4, 2, 0), (4, 6), (2, 2, 2, 3)])
def test_bad_grid_names_the_grid_rule(grid: tuple) -> None:
    with pytest.raises(ValueError, match=r"grid must be three positive sizes \(d, h, w\)"):
        TGIS(TGISConfig(), D, DT)(**{**tgis_inputs(), "grid": grid})


def test_bad_v_message_names_the_batch_size() -> None:
    inp = tgis_inputs(b=2)
    with pytest.raises(ValueError, match=r"v must be \[B=2, S, T, 8\]"):
        TGIS(TGISConfig(), D, DT)(**{**inp, "v": torch.randn(3, 3, 2, D)})


# --------------------------------------------------------------------------------------------
# position and plane embeddings


def test_position_embedding_without_pos_embed_says_how_to_switch_it_on() -> None:
    tg = TGIS(TGISConfig(), D, DT)
    with pytest.raises(ValueError, match=r"^TGIS\.position_embedding needs tgis\.pos_embed: true$"):
        tg.position_embedding(torch.rand(1, 3), torch.zeros(1, 3, dtype=torch.long))


def test_plane_embedding_is_added() -> None:
    torch.manual_seed(0)
    tg = TGIS(TGISConfig(pos_embed=True), D, DT)
    with torch.no_grad():
        tg.plane_embed.weight.copy_(torch.randn(3, D))
    plane = torch.tensor([[0, 2, 1]])
    pe = tg.position_embedding(torch.rand(1, 3), plane)  # pos_proj is still zero
    torch.testing.assert_close(pe, tg.plane_embed.weight[plane])


def test_position_embedding_follows_the_head_dtype() -> None:
    tg = TGIS(TGISConfig(pos_embed=True), D, DT).double()
    pe = tg.position_embedding(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert pe.dtype == torch.float64 and pe.shape == (2, 3, D)


# --------------------------------------------------------------------------------------------
# ContextScorer


class Capture(nn.Module):
    """Stands in for the context MLP: records its input, returns its first feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return x[..., :1]


def context_by_hand(c: torch.Tensor, mask: torch.Tensor, temp: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """votes [B, S], density [B, S] with h = c (identity projection), one slice at a time."""
    b, s = mask.shape
    votes, density = torch.zeros(b, s), torch.zeros(b, s)
    for i in range(b):
        real = [j for j in range(s) if mask[i, j]]
        hn = {j: c[i, j] / c[i, j].norm() for j in real}
        for k in real:  # voter k spreads one vote over the other real slices
            others = [j for j in real if j != k]
            if not others:
                continue
            w = torch.softmax(torch.stack([hn[k] @ hn[j] / temp for j in others]), 0)
            for j, wj in zip(others, w):
                votes[i, j] += wj
            density[i, k] = temp * torch.logsumexp(torch.stack([hn[k] @ hn[j] / temp for j in others]), 0)
    return votes, density


def identity_scorer(**kwargs) -> ContextScorer:
    scorer = ContextScorer(TGISConfig(scorer="context"), D, hidden=D, **kwargs)
    with torch.no_grad():
        scorer.proj.weight.copy_(torch.eye(D))
        scorer.proj.bias.zero_()
    return scorer


def test_context_votes_and_density_by_hand() -> None:
    torch.manual_seed(1)
    scorer = identity_scorer()
    scorer.mlp = Capture()
    c = torch.randn(2, 5, D)
    mask = torch.tensor([[True, True, False, True, True], [True, False, True, False, False]])
    out = scorer.context(c, mask)
    votes, density = context_by_hand(c, mask)
    expected = nn.functional.gelu(torch.stack([votes, density * mask], -1))
    torch.testing.assert_close(scorer.mlp.x, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected[..., 0])
    torch.testing.assert_close(votes.sum(1), mask.sum(1).float())  # each real voter casts one vote


def test_context_single_slice_volume_has_no_neighbours() -> None:
    scorer = identity_scorer()
    scorer.mlp = Capture()
    scorer.context(torch.randn(1, 3, D), torch.tensor([[False, True, False]]))
    torch.testing.assert_close(scorer.mlp.x, torch.zeros(1, 3, 2))


def test_context_scorer_default_architecture() -> None:
    # what a saved context head holds: hidden 64, two input features, a GELU MLP; temp 0.1
    scorer = ContextScorer(TGISConfig(scorer="context"), D)
    assert scorer.proj.out_features == 64 and scorer.temp == 0.1 and not scorer.use_h
    assert [type(m) for m in scorer.mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert scorer.mlp[0].in_features == 2
    t = torch.randn(4, D)
    torch.testing.assert_close(nn.functional.softplus(scorer.gate(t)), torch.ones(4, 1))  # gate starts at 1


def test_context_scorer_adds_the_gated_context_term() -> None:
    torch.manual_seed(2)
    scorer = ContextScorer(TGISConfig(scorer="context"), D)
    with torch.no_grad():
        scorer.mlp[-1].weight.normal_()
        scorer.mlp[-1].bias.fill_(0.5)
        scorer.gate.weight.normal_()
    z, t, mask = torch.randn(2, 4, D), torch.randn(2, D), torch.ones(2, 4, dtype=torch.bool)
    c = volume_normalised(z, mask)
    text = torch.einsum("bsd,bd->bs", c, t) / scorer.tau
    gate = nn.functional.softplus(scorer.gate(t))
    context = scorer.context(c, mask)
    assert context.abs().min() > 0
    torch.testing.assert_close(scorer(z, t, mask), text + gate * context)


def test_context_scorer_raw_text_term() -> None:
    torch.manual_seed(3)
    scorer = ContextScorer(TGISConfig(scorer="context", tau=2.0), D, normalise_text=False)
    z, t, mask = torch.randn(1, 4, D), torch.randn(1, D), torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(scorer(z, t, mask), torch.einsum("bsd,bd->bs", z, t) / 2.0)


def test_context_scorer_in_double_takes_float_inputs() -> None:
    scorer = ContextScorer(TGISConfig(scorer="context"), D).double()
    out = scorer(torch.randn(1, 4, D), torch.randn(1, D), torch.ones(1, 4, dtype=torch.bool))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------------------------
# volume_normalised


def test_volume_normalised_unit_rms_per_volume() -> None:
    torch.manual_seed(4)
    z = torch.randn(2, 5, 3) * torch.tensor([1.0, 10.0])[:, None, None]
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    c = volume_normalised(z, mask)
    assert bool((c[~mask] == 0).all())
    for b in range(2):
        real = c[b][mask[b]]
        torch.testing.assert_close(real.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        assert real.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)  # over slices and width


def test_volume_normalised_single_slice_and_tiny_spread() -> None:
    z = torch.randn(1, 3, 4)
    assert bool((volume_normalised(z, torch.tensor([[False, True, False]])) == 0).all())
    # a spread of exactly eps: c / (rms + eps) has rms 1/2, never blows up
    z = torch.tensor([[[1e-6], [-1e-6]]], dtype=torch.float64)
    c = volume_normalised(z, torch.ones(1, 2, dtype=torch.bool))
    assert c.abs().max().item() == pytest.approx(0.5, rel=1e-6)
    assert math.isfinite(c.abs().max().item())


# --------------------------------------------------------------------------------------------
# TGIS: constructor edges, messages, score dropout, dtypes


def test_smallest_widths_and_top_k_message() -> None:
    TGIS(TGISConfig(), 1, 1)  # width 1 is a valid head
    cfg = TGISConfig()
    cfg.top_k = -1  # changed after the config's own check
    with pytest.raises(ValueError, match=r"^TGIS: tgis\.top_k must be >= 0, got -1$"):
        TGIS(cfg, D, DT)


@pytest.mark.parametrize("key", ["slice_pos", "slice_plane", "mask"])
def test_shape_messages_name_the_input(key: str) -> None:
    inp = tgis_inputs(b=2, s=3)
    inp[key] = inp[key][:, :2]
    with pytest.raises(ValueError, match=rf"^TGIS: {key} must be \[2, 3\], got \(2, 2\)$"):
        TGIS(TGISConfig(), D, DT)(**inp)


def test_plane_range_message() -> None:
    with pytest.raises(ValueError, match=r"^TGIS: slice_plane must be in 0\.\.2 on real slices$"):
        TGIS(TGISConfig(), D, DT)(**{**tgis_inputs(), "slice_plane": torch.full((2, 3), 3)})


def test_score_dropout_acts_on_the_fusion_in_training_only() -> None:
    torch.manual_seed(5)
    tg = TGIS(TGISConfig(score_dropout=0.5), D, DT)
    inp = tgis_inputs(b=2, s=6)
    ref = tg.eval()(**inp)
    tg.train()
    outs = [tg(**inp) for _ in range(4)]
    for out in outs:
        torch.testing.assert_close(out.scores, ref.scores)  # the scores stay undropped
    assert any(not torch.allclose(out.z2d, ref.z2d) for out in outs)


def test_head_dtypes_follow_the_layers_and_the_slice_tokens() -> None:
    inp = tgis_inputs()
    out = TGIS(TGISConfig(pos_embed=True), D, DT).double()(**inp)  # float32 inputs, a float64 head
    assert out.z2d.dtype == torch.float32 and out.scores.dtype == torch.float32
    out = TGIS(TGISConfig(), D, DT)(**{**inp, "v": inp["v"].bfloat16()})
    assert out.z2d.dtype == torch.bfloat16


def test_config_accepts_every_choice_and_names_the_key() -> None:
    for kw in ({"text_source": "hf"}, {"text_pooling": "cls"}, {"text_pooling": "pooler"}):
        TGISConfig(**kw)
    for kw, msg in (({"top_k": -1}, r"^tgis\.top_k must be >= 0, got -1$"),
                    ({"text_source": "x"}, r"^tgis\.text_source must be one of"),
                    ({"text_pooling": "x"}, r"^tgis\.text_pooling must be one of"),
                    ({"score_dropout": 1.0}, r"^tgis\.score_dropout must be in \[0, 1\), got 1\.0$"),
                    ({"score_dropout": 1.5}, r"^tgis\.score_dropout must be in")):
        with pytest.raises(ValueError, match=msg):
            TGISConfig(**kw)


def test_zero_text_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^TGIS: dim and text_dim must be positive integers, got 8, 0$"):
        TGIS(TGISConfig(), D, 0)


def test_tgis_with_the_context_scorer_passes_width_and_mask() -> None:
    torch.manual_seed(6)
    tg = TGIS(TGISConfig(scorer="context"), D, DT)
    assert isinstance(tg.scorer, ContextScorer) and tg.scorer.proj.in_features == D
    inp = tgis_inputs(b=2, s=4)
    inp["mask"][0, 3] = False
    out = tg(**inp)
    z = slice_descriptors(inp["x3d"], inp["grid"], inp["v"], inp["slice_pos"], inp["slice_plane"])
    torch.testing.assert_close(out.logits, tg.scorer(z, tg.text_proj(inp["text"]), inp["mask"]))
    assert out.scores[0, 3] == 0
