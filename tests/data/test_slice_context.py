"""The context scorer's per-slice intensity features (tgis.scorer=context, context_features=
intensity) are computed on the data side: they equal what the model used to compute in its
forward, to 1e-6, on phantom slices (a padded batch of two studies, three planes)."""

from __future__ import annotations

import torch

from medvlm3d.config import VoteMIConfig
from medvlm3d.data.select.votek import VoteMI, intensity_features
from medvlm3d.data.select.context import (CONTEXT_FEATURES, INTENSITY_TEMPS, slice_context, soft_relations,
                                          volume_normalised)


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
    """The reference: what ContextScorer's forward computed from the raw (padded) slices before the
    move (`intensity_inputs`, then `relations` on the volume-normalised features at 3 temperatures;
    pinned against that code in the commit that added this test), as the MLP's input [B, S, 8]."""
    feats = intensity_features(slices.float(), size=vm.feature_size, mask=mask)
    vk = torch.zeros(*mask.shape, 2)
    for i, planes in enumerate(VoteMI(vm).select(feats, mask, plane)):
        for r in planes.values():
            vk[i, :, 0] += (r.votes / r.votes.max().clamp_min(1.0)).float()
            vk[i, r.picks, 1] = 1.0
    hn = torch.nn.functional.normalize(volume_normalised(feats, mask), dim=-1)
    rel = [x.unsqueeze(-1) for t in INTENSITY_TEMPS for x in soft_relations(hn, mask, t)]
    return torch.cat(rel + [vk], dim=-1)


VM = VoteMIConfig(k=3, num_picks=4)


def test_data_side_features_equal_the_old_in_model_ones() -> None:
    """Per study on the data side (unpadded, as study_tensors computes them), then collated: the
    padded batch equals the old in-model features to 1e-6, and is exactly 0 on padding."""
    slices, plane, mask = phantom_batch()
    per_study = [slice_context(slices[i, mask[i]][None], plane[i, mask[i]][None], VM) for i in range(2)]
    assert [tuple(x.shape) for x in per_study] == [(1, 36, CONTEXT_FEATURES), (1, 30, CONTEXT_FEATURES)]
    assert all(x.dtype == torch.float32 for x in per_study)
    batched = torch.nn.utils.rnn.pad_sequence([x[0] for x in per_study], batch_first=True)
    torch.testing.assert_close(batched, in_model_features(slices, plane, mask, VM), atol=1e-6, rtol=0)
    assert torch.all(batched[1, 30:] == 0)
    torch.testing.assert_close(slice_context(slices, plane, VM, mask), batched, atol=1e-6, rtol=0)
