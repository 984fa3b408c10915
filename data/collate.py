"""Collator: a list of samples (see data/dataset.py) -> one padded batch.

    Collator(pad_token_id, padding_side="right")(samples) -> dict with
      input_ids [B, L] long         padded with pad_token_id on `padding_side`
      attention_mask [B, L] long    1 = real token
      labels [B, L] long            padded with -100
      question_ids [B, Lq] long     the question alone (TG-IS text feature); always right-padded
      question_mask [B, Lq] long    1 = real token
      volumes [N, 1, D, H, W]       N = all images of the batch, ordered by sample
      image_to_sample [N] long      which sample each image belongs to (non-decreasing)
      slices [N, S, 1, h, w]        S = the most slices of any image; padded slices are zeros; a
                                    view of `volumes` (axial_view) when every sample's slices are one
      slice_mask [N, S] bool        True = a real slice
      slice_plane [N, S] long, slice_index [N, S] long, slice_pos [N, S] float   (0 where padded)
      slice_series [N, S] long      series / phase id: the image's position in its record (the
                                    sample's own `slice_series` when given), 0 where padded
      slice_target [N, S] float     1 on the question's slice_labels, else 0
      has_slice_target [N] bool
      teacher [N, S] float          when the samples carry one: the distillation target, 0 where padded
      slice_keep [N, P] long        when the samples carry one: picked slice positions (2d_only)
      slice_context [N, S, F] float when the samples carry one: the `context` scorer's per-slice
                                    intensity features (data/select/context.py), 0 where padded
      ids, questions, targets: list[str] (length B); records: list[dict]

Left padding is for batched generation (prompts end at the same position). Slices are always
padded at the end of the slice axis, whatever `padding_side` says.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import get_worker_info

from .prompts import IGNORE_INDEX
from .shards import axial_view
from .select.step import series_ids

_TEXT_KEYS = ("input_ids", "labels", "attention_mask", "question_ids")
_PER_IMAGE_KEYS = ("slice_plane", "slice_index", "slice_pos", "slice_target")


def _as_1d(x: Any, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype)
    if t.dim() != 1:
        raise ValueError(f"expected a 1D sequence of token ids, got shape {tuple(t.shape)}")
    return t


class Collator:
    """Pads text (on `padding_side`) and slices (at the end) and concatenates the images."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_token_id is None or int(pad_token_id) < 0:
            raise ValueError(f"pad_token_id must be a non-negative token id, got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("Collator got an empty list of samples")
        ids = [str(s.get("id", "")) for s in samples]
        for s, sid in zip(samples, ids):
            missing = [k for k in (*_TEXT_KEYS, "volume", "slices", *_PER_IMAGE_KEYS) if k not in s]
            if missing:
                raise ValueError(f"sample {sid!r} lacks keys {missing}")

        text = {k: [_as_1d(s[k], torch.long) for s in samples] for k in _TEXT_KEYS}
        for s, sid, a, b, c in zip(samples, ids, text["input_ids"], text["labels"], text["attention_mask"]):
            if not (len(a) == len(b) == len(c)):
                raise ValueError(
                    f"sample {sid!r}: input_ids, labels and attention_mask lengths differ ({len(a)}, {len(b)}, {len(c)})"
                )
        side = self.padding_side
        q_mask = [torch.ones_like(q) for q in text["question_ids"]]
        batch: dict[str, Any] = {
            "input_ids": _pad(text["input_ids"], self.pad_token_id, side),
            "attention_mask": _pad(text["attention_mask"], 0, side),
            "labels": _pad(text["labels"], IGNORE_INDEX, side),
            "question_ids": _pad(text["question_ids"], self.pad_token_id, "right"),
            "question_mask": _pad(q_mask, 0, "right"),
        }
        batch.update(collate_images(samples, ids))
        batch["ids"] = ids
        batch["questions"] = [str(s.get("question", "")) for s in samples]
        batch["targets"] = [str(s.get("target", "")) for s in samples]
        batch["records"] = [s.get("record", {}) for s in samples]
        return batch


def _pad(seqs: Sequence[torch.Tensor], value: float, side: str) -> torch.Tensor:
    return pad_sequence(list(seqs), batch_first=True, padding_value=value, padding_side=side)


def _batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker it is allocated in shared memory, so
    that sending the batch to the main process copies nothing (what torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    n = math.prod(shape)
    return torch.empty(0, dtype=dtype).new(torch.UntypedStorage._new_shared(n * dtype.itemsize)).view(tuple(shape))


def _is_axial_view(sample: dict[str, Any]) -> bool:
    """True when the sample's slices tensor is `axial_view` of its volume tensor (same memory)."""
    vol, sl = sample["volume"], sample["slices"]
    if not (isinstance(vol, torch.Tensor) and isinstance(sl, torch.Tensor)):
        return False
    view = axial_view(vol)
    return sl.data_ptr() == vol.data_ptr() and sl.shape == view.shape and sl.stride() == view.stride()


def _pad_slices(slices: Sequence[torch.Tensor], s_max: int) -> torch.Tensor:
    """[S_i, 1, h, w] per image -> [N, s_max, 1, h, w], zeros after each image's S_i: one copy of
    each image's slices straight into the batch (no intermediate stack)."""
    first = slices[0]
    out = _batch_buffer((len(slices), s_max, *first.shape[1:]), first.dtype)
    for i, sl in enumerate(slices):
        out[i, :sl.shape[0]].copy_(sl)
        out[i, sl.shape[0]:].zero_()
    return out


def collate_images(samples: Sequence[dict[str, Any]], ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The image half of a batch: per-sample image tensors (data/select/step.py: study_tensors)
    -> volumes, image_to_sample, slices (padded), slice_* [N, S], teacher / slice_keep /
    slice_context when given. A sample without slice_target gets zeros (e.g. at inference)."""
    if ids is None:
        ids = [str(s.get("id", i)) for i, s in enumerate(samples)]
    volumes, owner, slices, lengths = [], [], [], []
    per_image: dict[str, list[torch.Tensor]] = {k: [] for k in _PER_IMAGE_KEYS}
    has_target, series = [], []
    extra: dict[str, list[torch.Tensor]] = {"teacher": [], "slice_keep": [], "slice_context": []}
    first_shape = None
    for b, (s, sid) in enumerate(zip(samples, ids)):
        vol = torch.as_tensor(s["volume"])
        if vol.dim() != 5 or vol.shape[1] != 1:
            raise ValueError(f"sample {sid!r}: volume must be [n_img, 1, D, H, W], got {tuple(vol.shape)}")
        n_img = int(vol.shape[0])
        if first_shape is None:
            first_shape = (sid, tuple(vol.shape[2:]))
        elif tuple(vol.shape[2:]) != first_shape[1]:
            raise ValueError(
                f"volumes differ in size within a batch: sample {first_shape[0]!r} has D,H,W={first_shape[1]} "
                f"but sample {sid!r} has {tuple(vol.shape[2:])}; all volumes must be resized to data.size"
            )
        sl = torch.as_tensor(s["slices"])
        if sl.dim() != 5 or sl.shape[0] != n_img or sl.shape[2] != 1:
            raise ValueError(f"sample {sid!r}: slices must be [{n_img}, S, 1, h, w], got {tuple(sl.shape)}")
        n_sl = int(sl.shape[1])
        ser = torch.as_tensor(s["slice_series"]) if "slice_series" in s else series_ids(n_img, n_sl)
        if tuple(ser.shape) != (n_img, n_sl):
            raise ValueError(f"sample {sid!r}: slice_series must be [{n_img}, {n_sl}], got {tuple(ser.shape)}")
        series.extend(ser.unbind(0))
        for k in _PER_IMAGE_KEYS:
            t = torch.as_tensor(s[k]) if k in s or k != "slice_target" else torch.zeros(n_img, n_sl)
            if tuple(t.shape) != (n_img, n_sl):
                raise ValueError(f"sample {sid!r}: {k} must be [{n_img}, {n_sl}], got {tuple(t.shape)}")
            per_image[k].extend(t.unbind(0))
        hst = torch.as_tensor(s.get("has_slice_target", torch.zeros(n_img, dtype=torch.bool)), dtype=torch.bool)
        if tuple(hst.shape) != (n_img,):
            raise ValueError(f"sample {sid!r}: has_slice_target must be [{n_img}], got {tuple(hst.shape)}")
        for k in extra:
            if k in s:
                t = torch.as_tensor(s[k])
                if k == "slice_context" and (t.ndim != 3 or tuple(t.shape[:2]) != (n_img, n_sl)):
                    raise ValueError(f"sample {sid!r}: slice_context must be [{n_img}, {n_sl}, F], got {tuple(t.shape)}")
                extra[k].extend(t.unbind(0))
        volumes.append(vol)
        owner.extend([b] * n_img)
        slices.extend(sl.unbind(0))
        lengths.extend([n_sl] * n_img)
        has_target.append(hst)

    h_w = {tuple(x.shape[-2:]) for x in slices}
    if len(h_w) > 1:
        raise ValueError(f"slices differ in size within a batch: {sorted(h_w)}; all must be data.slice_size")
    n_len = torch.tensor(lengths)
    s_max = int(n_len.max())
    out = {k: _pad(v, 0, "right") for k, v in extra.items() if v}
    for k, v in out.items():
        if v.shape[0] != n_len.numel():
            raise ValueError(f"{k} is given for {v.shape[0]} of the batch's {n_len.numel()} images: all or none")
    batch_volumes = torch.cat(volumes, 0, out=_batch_buffer((n_len.numel(), *volumes[0].shape[1:]), volumes[0].dtype))
    return out | {
        "volumes": batch_volumes,
        "image_to_sample": torch.tensor(owner, dtype=torch.long),
        # slices that are the volumes' own axial rows (data/shards.py: axial_view) stay a view
        "slices": axial_view(batch_volumes) if all(map(_is_axial_view, samples)) else _pad_slices(slices, s_max),
        "slice_mask": torch.arange(s_max)[None, :] < n_len[:, None],
        "slice_plane": _pad(per_image["slice_plane"], 0, "right").long(),
        "slice_index": _pad(per_image["slice_index"], 0, "right").long(),
        "slice_pos": _pad(per_image["slice_pos"], 0.0, "right").float(),
        "slice_series": _pad(series, 0, "right").long(),
        "slice_target": _pad(per_image["slice_target"], 0.0, "right").float(),
        "has_slice_target": torch.cat(has_target, 0),
    }
