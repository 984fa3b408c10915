"""Training losses, as pure functions over tensors.

    distillation_loss(teacher q [N,S], scores s [N,S], mask [N,S])  KL(q || s) over real slices
    slice_loss(scores [N,S], target [N,S], has_target [N])          -log(mass of s on the true slices)
    contrastive_loss(a [B,E], b [B,E], logit_scale)                  symmetric InfoNCE (CLIP)
    distill_weight(step, max_steps, weight, schedule)                lambda schedule

The LM loss is the causal LM's own (labels -100 ignored), computed inside the HF model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def distillation_loss(teacher: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over images of KL(q || s) = Σ_j q_j (log q_j − log s_j), over real slices only.

    teacher, scores: [N, S] distributions over the real slices (0 on padding); mask [N, S] bool.
    """
    if teacher.shape != scores.shape or scores.shape != mask.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)}, scores {tuple(scores.shape)} and mask {tuple(mask.shape)} must match")
    q = teacher.detach().float() * mask
    log_q = torch.log(q.clamp_min(EPS))
    log_s = torch.log(scores.float().clamp_min(EPS))
    kl = (q * (log_q - log_s)).sum(dim=-1)
    return kl.mean()


def slice_loss(scores: torch.Tensor, target: torch.Tensor, has_target: torch.Tensor) -> torch.Tensor:
    """−log Σ_{j in target} s_j, averaged over images that have slice labels (0 when none do).

    scores [N, S], target [N, S] in {0,1}, has_target [N] bool.
    """
    keep = has_target & (target.sum(dim=-1) > 0)
    if not bool(keep.any()):
        return scores.sum() * 0.0
    mass = (scores[keep].float() * target[keep].float()).sum(dim=-1)
    return -torch.log(mass.clamp_min(EPS)).mean()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of a [B, E] and b [B, E]; logit_scale is log(1/T)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"contrastive_loss expects two [B, E] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def distill_weight(step: int, max_steps: int, weight: float, schedule: str) -> float:
    """λ at `step` (0-based): constant, or linear decay from `weight` to 0 at `max_steps`."""
    if schedule == "constant":
        return float(weight)
    if schedule == "linear_decay":
        return float(weight) * max(0.0, 1.0 - step / max(1, max_steps))
    raise ValueError(f"unknown distill schedule {schedule!r}; expected constant | linear_decay")
