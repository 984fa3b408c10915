"""`random` selector: each plane's share drawn without replacement from a generator seeded by
(cfg seed, sample index): the same picks for a sample in every epoch and worker, and the global
RNG is never touched. Teacher: (1 - eps) uniform on the picks + eps uniform over the real slices.
"""

from __future__ import annotations

import torch

from .base import SELECTORS, SimpleSelector, SliceSelection, per_plane_keep, real_mask, teacher_on


@SELECTORS.register("random")
class RandomSelector(SimpleSelector):
    def __call__(self, slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor | None = None,
                 index: int = 0, slice_target: torch.Tensor | None = None) -> SliceSelection:
        m = real_mask(plane, mask)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))

        def pick(ids: torch.Tensor, n: int) -> list[int]:
            return ids[torch.randperm(ids.numel(), generator=gen)[:n]].tolist()

        keep = per_plane_keep(plane, m, self.num_picks, pick)
        return SliceSelection(teacher=teacher_on(keep, m) if self.teacher_on else None, keep=keep)
