"""`labels` selector: supervised, from the record's slice_labels (`slice_target` [S], 1 on a
labelled slice). Teacher: (1 - eps) uniform on the labelled slices + eps uniform over the real
ones (uniform when nothing is labelled); keep: each plane's labelled slices first (in slice
order), then evenly spaced unlabelled ones to fill its share.
"""

from __future__ import annotations

import torch

from .base import SELECTORS, SimpleSelector, SliceSelection, per_plane_keep, real_mask, teacher_on


@SELECTORS.register("labels")
class LabelsSelector(SimpleSelector):
    def __call__(self, slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor | None = None,
                 index: int = 0, slice_target: torch.Tensor | None = None) -> SliceSelection:
        m = real_mask(plane, mask)
        target = torch.zeros(m.shape[0]) if slice_target is None else slice_target.detach().cpu().float()
        labelled = (target > 0) & m

        def pick(ids: torch.Tensor, n: int) -> list[int]:
            pos = ids[labelled[ids]].tolist()[:n]
            rest = ids[~labelled[ids]]
            k = n - len(pos)
            if k > 0 and rest.numel():
                pos += rest[((torch.arange(k, dtype=torch.float64) + 0.5) * rest.numel() / k).long()].tolist()
            return pos

        teacher = None
        if self.teacher_on:
            teacher = teacher_on(labelled.nonzero().flatten(), m) if bool(labelled.any()) else m.float() / m.sum()
        return SliceSelection(teacher=teacher, keep=per_plane_keep(plane, m, self.num_picks, pick))
