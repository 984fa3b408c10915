"""`uniform` selector: evenly spaced picks per plane; teacher uniform over the real slices.

    keep: plane p's share n of its n_p slices at positions floor((j + 0.5) * n_p / n), j < n.
"""

from __future__ import annotations

import torch

from .base import SELECTORS, SimpleSelector, SliceSelection, per_plane_keep, real_mask


@SELECTORS.register("uniform")
class UniformSelector(SimpleSelector):
    slices_only = True  # a function of the slices alone: `preprocess` may store its output

    def __call__(self, slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor | None = None,
                 index: int = 0, slice_target: torch.Tensor | None = None) -> SliceSelection:
        m = real_mask(plane, mask)

        def pick(ids: torch.Tensor, n: int) -> list[int]:
            at = ((torch.arange(n, dtype=torch.float64) + 0.5) * ids.numel() / n).long()
            return ids[at].tolist()

        teacher = (m.float() / m.sum()) if self.teacher_on else None
        return SliceSelection(teacher=teacher, keep=per_plane_keep(plane, m, self.num_picks, pick))
