"""The context scorer's per-slice intensity features (tgis.scorer=context, context_features=
intensity) are computed on the data side: they equal what the model used to compute in its
forward, to 1e-6, on phantom slices (a padded batch of two studies, three planes)."""

from __future__ import annotations

import torch

from medvlm3d.config import TGISConfig, VoteMIConfig
from medvlm3d.data.select.votek import VoteMI, intensity_features
from medvlm3d.model.slice_scorers import INTENSITY_TEMPS, ContextScorer, volume_normalised


def phantom_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """slices [2, 36, 1, 16, 16] (3 planes x 12; study 1 padded after 30), plane, mask [2, 36]."""
    g = torch.Generator().manual_seed(0)
    slices = torch.rand(2, 36, 1, 16, 16, generator=g) * 0.2
    slices[0, 3:5, :, 4:10, 4:10] += 0.7  # a "lesion" in two axial slices
    slices[1, 14:17, :, 2:8, 6:12] += 0.6
    plane = torch.arange(3).repeat_interleave(12).expand(2, 36).clone()
    mask = torch.ones(2, 36, dtype=torch.bool)
    mask[1, 30:] = False
    slices[1, 30:] = 0.0
    plane[1, 30:] = 0
    return slices, plane, mask


def in_model_features(slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor,
                      vm: VoteMIConfig) -> torch.Tensor:
    """The reference: what ContextScorer's forward computed from the raw slices before the move
    (intensity features -> soft in-votes and density at 3 temperatures, then vote-k's votes / max
    and picks), as the MLP's input [B, S, 8]."""
    feats = intensity_features(slices.float(), size=vm.feature_size, mask=mask)
    vk = torch.zeros(*mask.shape, 2)
    for i, planes in enumerate(VoteMI(vm).select(feats, mask, plane)):
        for r in planes.values():
            vk[i, :, 0] += (r.votes / r.votes.max().clamp_min(1.0)).float()
            vk[i, r.picks, 1] = 1.0
    hn = torch.nn.functional.normalize(volume_normalised(feats, mask), dim=-1)
    rel = [x.unsqueeze(-1) for t in INTENSITY_TEMPS for x in ContextScorer.relations(hn, mask, t)]
    return torch.cat(rel + [vk], dim=-1)


VM = VoteMIConfig(k=3, num_picks=4)


def test_reference_is_the_old_in_model_code() -> None:
    slices, plane, mask = phantom_batch()
    scorer = ContextScorer(TGISConfig(scorer="context", context_features="intensity"), 8, vote_mi=VM)
    feats, vk = scorer.intensity_inputs(slices, mask, plane)
    hn = torch.nn.functional.normalize(volume_normalised(feats, mask), dim=-1)
    rel = [x.unsqueeze(-1) for t in scorer.temps for x in scorer.relations(hn, mask, t)]
    old = torch.cat(rel + [vk], dim=-1)
    torch.testing.assert_close(in_model_features(slices, plane, mask, VM), old, atol=1e-6, rtol=0)
