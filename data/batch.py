"""The typed batch that the collator builds and MedVLM takes (N images over B samples, S slices
per image after padding / pre-selection, P picks, L text tokens, Lq question tokens).

    Batch.from_dict(collator_output) -> Batch      unknown keys raise (nothing is swallowed)
    batch.to(device) -> Batch                      tensors moved, the rest kept
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch


@dataclass
class Batch:
    """A collated batch (data/collate.py).

    input_ids, attention_mask [B, L] long; labels [B, L] long (-100 = not supervised) | None
    volumes [N, 1, D, H, W] float; image_to_sample [N] long (non-decreasing)
    slices [N, S, 1, h, w] float; slice_mask [N, S] bool (True = real slice)
    slice_pos [N, S] float; slice_plane, slice_index [N, S] long
    slice_series [N, S] long  series / phase id (the image's position in its record) | None
    question_ids, question_mask [B, Lq] long; questions: B strings | None (tgis.text_source hf)
    slice_target [N, S] float, has_slice_target [N] bool    supervised slice labels | None
    teacher [N, S] float      data-side selector's distribution (0 on padding) | None
    slice_keep [N, P] long    data-side picks (positions along S) for 2d_only | None
    slice_context [N, S, F] float   data-side per-slice features of the `context` scorer on
                              intensity (data/select/context.py), 0 on padding | None
    ids, targets: B strings; records: B dicts    bookkeeping, unused by the model
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    volumes: torch.Tensor
    slices: torch.Tensor
    slice_mask: torch.Tensor
    slice_pos: torch.Tensor
    slice_plane: torch.Tensor
    image_to_sample: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    labels: torch.Tensor | None = None
    questions: list[str] | None = None
    slice_index: torch.Tensor | None = None
    slice_series: torch.Tensor | None = None
    slice_target: torch.Tensor | None = None
    has_slice_target: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    slice_keep: torch.Tensor | None = None
    slice_context: torch.Tensor | None = None
    ids: list[str] | None = None
    targets: list[str] | None = None
    records: list[Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Batch:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Batch: unknown keys {unknown}; expected a subset of {sorted(names)}")
        missing = sorted(f.name for f in fields(cls) if f.default is not None and f.name not in d)
        if missing:
            raise ValueError(f"Batch: missing keys {missing}")
        return cls(**dict(d))

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})
