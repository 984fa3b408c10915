"""Unit tests of train/losses.py (every term: value, sign, scale, masking, λ schedule, zero when
off) and of the image stages' loss (train/stages/vlm.py): its terms sum to the backpropagated
loss, and its gradient on the TG-IS logits is the analytic one of lm + λ·KL + w·slice.

Shapes: scores / teacher / mask / target [N, S]; has_target [N]; contrastive a, b [B, E].
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvlm3d import load_config
from medvlm3d.model.medvlm import MedVLMOutput
from medvlm3d.train.losses import EPS, contrastive_loss, distill_weight, distillation_loss, slice_loss
from medvlm3d.train.stages import LossContext, get_stage

# ------------------------------------------------------------------------------------------------
# distillation_loss: KL(q || s) over real slices, mean over images


def _kl(q: list[float], s: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(q, s) if a > 0)


def test_distillation_known_value_and_mean_over_images() -> None:
    q = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    s = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    want = (_kl([0.5, 0.5], [0.25, 0.75]) + _kl([0.2, 0.3, 0.5], [0.5, 0.25, 0.25])) / 2
    got = distillation_loss(q, s, mask)
    assert got.dim() == 0 and got.item() == pytest.approx(want, rel=1e-5)
    assert want > 0.1  # the hand value is far from 0: a dropped or flipped term shows


def test_distillation_is_nonnegative_and_zero_iff_equal() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    for _ in range(5):
        q = torch.rand(4, 6, generator=g) * mask
        s = torch.rand(4, 6, generator=g) * mask
        q, s = q / q.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True)
        assert distillation_loss(q, s, mask).item() > 1e-4
        assert distillation_loss(q, q.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_ignores_padded_slices_whatever_their_values() -> None:
    mask = torch.tensor([[True, True, False, False]])
    q = torch.tensor([[0.4, 0.6, 0.0, 0.0]])
    s = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    base = distillation_loss(q, s, mask).item()
    assert base == pytest.approx(_kl([0.4, 0.6], [0.5, 0.5]), rel=1e-5)
    s_pad = torch.tensor([[0.5, 0.5, 0.9, 1e-12]])
    q_pad = torch.tensor([[0.4, 0.6, 0.7, 0.3]])  # a teacher with mass on padding: masked out
    assert distillation_loss(q_pad, s_pad, mask).item() == pytest.approx(base, rel=1e-5)
    assert distillation_loss(q, s_pad, mask).item() == pytest.approx(base, rel=1e-5)


def test_distillation_zero_teacher_entries_and_zero_scores_stay_finite() -> None:
    mask = torch.ones(1, 3, dtype=torch.bool)
    q = torch.tensor([[1.0, 0.0, 0.0]])
    assert distillation_loss(q, torch.tensor([[1.0, 0.0, 0.0]]), mask).item() == pytest.approx(0.0, abs=1e-6)
    # s = 0 where q > 0: clamped at EPS, a large finite value
    got = distillation_loss(q, torch.tensor([[0.0, 0.5, 0.5]]), mask).item()
    assert got == pytest.approx(-math.log(EPS), rel=1e-5)
    assert EPS == 1e-8


def test_distillation_gradient_moves_scores_to_teacher_and_not_the_teacher() -> None:
    mask = torch.ones(2, 4, dtype=torch.bool)
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    z = torch.zeros(2, 4, requires_grad=True)
    kl = distillation_loss(q, z.softmax(-1), mask)
    kl.backward()
    assert q.grad is None or bool((q.grad == 0).all())  # the teacher is a fixed target
    # d KL(q || softmax z) / dz = (softmax z - q) / N
    assert torch.allclose(z.grad, (z.softmax(-1) - q.detach()) / 2, atol=1e-6)
    with torch.no_grad():
        z2 = z - 1.0 * z.grad
        before = (z.softmax(-1) - q).abs().sum()
        after = (z2.softmax(-1) - q).abs().sum()
    assert after < before
    assert distillation_loss(q, z2.softmax(-1), mask) < kl


def test_distillation_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must match"):
        distillation_loss(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match"):
        distillation_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# slice_loss: -log(mass on the true slices), mean over images with targets


def test_slice_loss_known_value_and_mean() -> None:
    s = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    target = torch.tensor([[0, 1, 1], [1, 0, 0]])
    has = torch.tensor([True, True])
    want = (-math.log(0.9) - math.log(0.5)) / 2
    assert slice_loss(s, target, has).item() == pytest.approx(want, rel=1e-5)


def test_slice_loss_sign_more_mass_on_true_slices_is_lower() -> None:
    target = torch.tensor([[0, 1, 0]])
    has = torch.tensor([True])
    low = slice_loss(torch.tensor([[0.1, 0.8, 0.1]]), target, has)
    high = slice_loss(torch.tensor([[0.4, 0.2, 0.4]]), target, has)
    assert 0 < low < high
    assert slice_loss(torch.tensor([[0.0, 1.0, 0.0]]), target, has).item() == pytest.approx(0.0, abs=1e-6)
    # no mass at all: clamped at EPS, finite
    assert slice_loss(torch.tensor([[0.5, 0.0, 0.5]]), target, has).item() == pytest.approx(-math.log(EPS), rel=1e-5)


def test_slice_loss_ignores_images_without_targets() -> None:
    s = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]])
    target = torch.tensor([[0, 1], [0, 1], [0, 0]])
    # image 1 has no labels (has_target False); image 2 has an empty target
    has = torch.tensor([True, False, True])
    assert slice_loss(s, target, has).item() == pytest.approx(-math.log(0.9), rel=1e-5)
    s2 = s.clone()
    s2[1:] = torch.tensor([[0.01, 0.99], [0.99, 0.01]])
    assert slice_loss(s2, target, has).item() == pytest.approx(-math.log(0.9), rel=1e-5)


def test_slice_loss_is_zero_and_differentiable_when_no_image_has_targets() -> None:
    s = torch.tensor([[0.3, 0.7]], requires_grad=True)
    for target, has in ((torch.tensor([[0, 1]]), torch.tensor([False])), (torch.tensor([[0, 0]]), torch.tensor([True]))):
        out = slice_loss(s, target, has)
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert bool((s.grad == 0).all())


# ------------------------------------------------------------------------------------------------
# contrastive_loss: symmetric InfoNCE


def _info_nce(a: list[list[float]], b: list[list[float]], scale: float) -> float:
    def norm(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    a, b = [norm(v) for v in a], [norm(v) for v in b]
    sim = [[scale * sum(x * y for x, y in zip(u, v)) for v in b] for u in a]

    def ce(rows: list[list[float]]) -> float:
        return sum(math.log(sum(math.exp(x) for x in r)) - r[i] for i, r in enumerate(rows)) / len(rows)

    return 0.5 * (ce(sim) + ce([list(c) for c in zip(*sim)]))


def test_contrastive_known_value_2x2() -> None:
    a = [[1.0, 0.0], [0.0, 2.0]]
    b = [[3.0, 1.0], [1.0, 1.0]]  # not symmetric: row and column cross-entropies differ
    got = contrastive_loss(torch.tensor(a), torch.tensor(b), torch.tensor(math.log(2.0)))
    assert got.item() == pytest.approx(_info_nce(a, b, 2.0), rel=1e-5)
    # the identity pair at temperature 1: log(1 + e^-1)
    eye = torch.eye(2)
    assert contrastive_loss(eye, eye, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)


def test_contrastive_logit_scale_is_capped_at_100() -> None:
    c = 0.99
    a = [[1.0, 0.0], [c, math.sqrt(1 - c * c)]]
    got = contrastive_loss(torch.tensor(a), torch.tensor(a), torch.tensor(math.log(1000.0)))
    assert got.item() == pytest.approx(_info_nce(a, a, 100.0), rel=1e-4)


def test_contrastive_is_symmetric_and_lower_for_matched_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 8, generator=g)
    b = a + 0.1 * torch.randn(4, 8, generator=g)
    scale = torch.tensor(math.log(10.0))
    assert contrastive_loss(a, b, scale).item() == pytest.approx(contrastive_loss(b, a, scale).item(), rel=1e-5)
    matched = contrastive_loss(a, b, scale)
    shuffled = contrastive_loss(a, b[[1, 2, 3, 0]], scale)
    assert matched < shuffled


def test_contrastive_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        contrastive_loss(torch.ones(2, 3), torch.ones(2, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        contrastive_loss(torch.ones(2, 3, 1), torch.ones(2, 3, 1), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------
# distill_weight: the λ schedule


def test_distill_weight_constant() -> None:
    assert [distill_weight(s, 10, 0.3, "constant") for s in (0, 5, 10, 20)] == [0.3] * 4


def test_distill_weight_linear_decay() -> None:
    assert distill_weight(0, 10, 0.4, "linear_decay") == pytest.approx(0.4)
    assert distill_weight(5, 10, 0.4, "linear_decay") == pytest.approx(0.2)
    assert distill_weight(9, 10, 0.4, "linear_decay") == pytest.approx(0.04)
    assert distill_weight(10, 10, 0.4, "linear_decay") == 0.0
    assert distill_weight(15, 10, 0.4, "linear_decay") == 0.0  # past the end: 0, never negative
    assert distill_weight(0, 0, 0.4, "linear_decay") == pytest.approx(0.4)  # max_steps 0: no division by 0
    assert distill_weight(1, 0, 0.4, "linear_decay") == 0.0


def test_distill_weight_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="unknown distill schedule 'cosine'"):
        distill_weight(0, 10, 0.4, "cosine")


# ------------------------------------------------------------------------------------------------
# the image stages' loss (stage1_align / stage2_finetune)


class _FakeVLM(nn.Module):
    """A MedVLM stand-in: TG-IS logits z [N,S] as a parameter, scores = softmax(z) over real slices,
    LM logits [B,L,V] from a parameter; returns MedVLMOutput like MedVLM.forward."""

    def __init__(self, teacher: torch.Tensor | None, mask: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.z = nn.Parameter(torch.randn(mask.shape, generator=g))
        self.lm_logits = nn.Parameter(torch.randn(2, 5, 7, generator=g))
        self.teacher, self.mask = teacher, mask

    def forward(self, **batch: Any) -> MedVLMOutput:
        assert "labels" not in batch
        scores = self.z.masked_fill(~self.mask, float("-inf")).softmax(-1)
        return MedVLMOutput(loss=None, logits=self.lm_logits, scores=scores, teacher=self.teacher,
                            slice_mask=self.mask)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum") / num_items_in_batch


def _setup(*overrides: str, teacher: bool = True) -> tuple[Any, _FakeVLM, dict[str, Any], LossContext]:
    cfg = load_config("tiny", ["train.max_steps=10", *overrides])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    q = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.1, 0.7]]) if teacher else None
    model = _FakeVLM(q, mask)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = -100
    batch = {"labels": labels, "slice_target": torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1]]),
             "has_slice_target": torch.tensor([True, True])}
    ctx = LossContext(cfg, step=4, lm_loss=_lm_loss, n_tokens=torch.tensor(6), scale=2.0)
    return cfg, model, batch, ctx


def test_vlm_stage_terms_sum_exactly_to_the_backpropagated_loss() -> None:
    cfg, model, batch, ctx = _setup("train.distill_weight=0.5", "train.distill_schedule=linear_decay",
                                    "train.slice_loss_weight=0.25")
    stage = get_stage("stage2_finetune")
    loss, terms = stage.loss(model, batch, ctx)
    assert set(terms) == {"lm", "distill", "kl", "slice", "slice_nll"}
    parts = stage.contributions(terms)
    assert set(parts) == {"lm", "distill", "slice"}
    assert torch.equal(loss, parts["lm"] + parts["distill"] + parts["slice"])
    lam = 0.5 * (1 - 4 / 10)
    assert terms["distill"].item() == pytest.approx(lam * terms["kl"].item(), rel=1e-5)
    assert terms["slice"].item() == pytest.approx(0.25 * terms["slice_nll"].item(), rel=1e-5)
    assert terms["kl"].item() > 0.05 and terms["slice_nll"].item() > 0.05
    assert not terms["kl"].requires_grad and not terms["slice_nll"].requires_grad
    out = model()
    assert terms["lm"].item() == pytest.approx(2.0 * _lm_loss(out.logits, batch["labels"], 7, ctx.n_tokens).item())
    assert get_stage("stage1_align").diagnostics == stage.diagnostics


def test_vlm_stage_without_distillation_needs_no_teacher() -> None:
    _, model, batch, ctx = _setup("train.distill_weight=0", "train.slice_loss_weight=0", teacher=False)
    loss, terms = get_stage("stage1_align").loss(model, batch, ctx)
    assert set(terms) == {"lm"} and torch.equal(loss, terms["lm"])
    # a teacher present but λ = 0 still adds nothing
    _, model, batch, ctx = _setup("train.distill_weight=0", "train.slice_loss_weight=0")
    _, terms = get_stage("stage1_align").loss(model, batch, ctx)
    assert set(terms) == {"lm"}


@pytest.mark.parametrize("lam,w", [(0.5, 0.25), (1.0, 0.0), (0.0, 2.0)])
def test_vlm_stage_gradient_on_tgis_logits_is_the_analytic_one(lam: float, w: float) -> None:
    # d/dz [λ·KL(q || softmax z) + w·(-log Σ_T softmax z)], per image, mean over images:
    #   λ (s − q) / N  +  w (s − 1_T · s / m) / N,  m = Σ_T s;  0 on padded slices; lm has no z.
    _, model, batch, ctx = _setup(f"train.distill_weight={lam}", "train.distill_schedule=constant",
                                  f"train.slice_loss_weight={w}")
    loss, _ = get_stage("stage2_finetune").loss(model, batch, ctx)
    loss.backward()
    with torch.no_grad():
        s = model.z.masked_fill(~model.mask, float("-inf")).softmax(-1)
        t = batch["slice_target"].float()
        m = (s * t).sum(-1, keepdim=True)
        want = lam * (s - model.teacher) / 2 + w * (s - t * s / m) / 2
    assert torch.allclose(model.z.grad, want, atol=1e-6), (model.z.grad, want)
    assert model.z.grad.abs().sum() > 1e-3


def test_contrastive_labels_follow_the_inputs_device() -> None:
    # the meta device stands in for a GPU: labels made on the CPU would fail there
    a = torch.ones(2, 3, device="meta")
    out = contrastive_loss(a, a, torch.tensor(0.0, device="meta"))
    assert out.device.type == "meta" and out.dim() == 0
