"""Per-slice context features of the `context` TG-IS scorer on intensity features
(`model.tgis.scorer: context`, `model.tgis.context_features: intensity`), computed on the data
side by `study_tensors` (data/select/step.py) like the selectors: parameter-free, no gradient.

    slice_context(slices [n, S, 1, h, w], plane [n, S] long, vote_mi, mask [n, S] | None)
        -> [n, S, F] float32, F = CONTEXT_FEATURES = 2 * len(INTENSITY_TEMPS) + 2, 0 on padding:
        [soft in-votes, soft density] at each of INTENSITY_TEMPS on the volume-normalised
        intensity features (Vote-MI's own, `votek.intensity_features`), then vote-k's in-votes /
        their max (summed over the planes) and 1 on its picks (vote_mi.k, vote_mi.num_picks).

The features of a slice depend on the other slices of its image: they are computed over the
slices the model sees (after pre-selection) and again whenever a sample is cut (`restrict`).
`volume_normalised` and `soft_relations` are shared with the scorer (model/slice_scorers.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import VoteMIConfig
from .votek import VoteMI, intensity_features

INTENSITY_TEMPS = (0.03, 0.1, 0.3)  # the cosine temperatures of the soft in-votes and density
CONTEXT_FEATURES = 2 * len(INTENSITY_TEMPS) + 2


def needs_slice_context(model_cfg: Any) -> bool:
    """True when `cfg.model` builds a TG-IS head whose scorer reads the data-side slice_context."""
    tg = model_cfg.tgis
    return (model_cfg.variant in ("2e3", "2e3_interslice") and tg.scorer == "context"
            and tg.context_features == "intensity")


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


def soft_relations(hn: torch.Tensor, mask: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors hn [B, S, H] -> (soft in-votes [B, S], soft density [B, S]) at `temp`: a
    softmax over each slice's cosine similarities to the other real slices, summed over the voters,
    and temp * logsumexp of them; 0 on padding and for a single-slice volume."""
    sim = torch.einsum("bjh,bkh->bjk", hn, hn) / temp
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    pair = mask.unsqueeze(1) & mask.unsqueeze(2) & ~eye
    sim = sim.masked_fill(~pair, float("-inf"))
    has_other = pair.any(-1, keepdim=True)  # a single-slice volume has no neighbours
    vote = torch.where(has_other, torch.softmax(sim, dim=-1), torch.zeros_like(sim))  # [B, voter k, j]
    votes = vote.sum(1) * mask  # [B, S]: soft count of the slices that vote for j
    density = torch.where(has_other.squeeze(-1), torch.logsumexp(sim, dim=-1), torch.zeros_like(votes)) * temp
    return votes, density * mask


@torch.no_grad()
def slice_context(slices: torch.Tensor, plane: torch.Tensor, vote_mi: VoteMIConfig,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. float32 on the slices' device (vote-k itself runs on the CPU)."""
    if slices.ndim != 5 or slices.shape[2] != 1 or tuple(plane.shape) != tuple(slices.shape[:2]):
        raise ValueError(f"slice_context: slices must be [n, S, 1, h, w] and plane [n, S], got "
                         f"{tuple(slices.shape)} and {tuple(plane.shape)}")
    mask = torch.ones(plane.shape, dtype=torch.bool, device=slices.device) if mask is None else mask.bool()
    plane = torch.where(mask, plane.long(), torch.zeros_like(plane, dtype=torch.long))
    feats = intensity_features(slices.float(), size=vote_mi.feature_size, mask=mask)  # [n, S, F']
    hn = torch.nn.functional.normalize(volume_normalised(feats, mask), dim=-1)
    rel = [x.unsqueeze(-1) for temp in INTENSITY_TEMPS for x in soft_relations(hn, mask, temp)]
    vk = torch.zeros(*mask.shape, 2)
    for i, planes in enumerate(VoteMI(vote_mi).select(feats, mask, plane)):
        for r in planes.values():
            vk[i, :, 0] += (r.votes / r.votes.max().clamp_min(1.0)).float()
            vk[i, r.picks, 1] = 1.0
    return torch.cat(rel + [vk.to(feats.device)], dim=-1).contiguous()
