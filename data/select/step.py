"""The per-study data-side step: a preprocessed Study -> the image tensors of one sample, with
pre-selection, the distillation teacher and the 2d_only picks computed here (never in the model).

    plan = SelectionPlan.from_config(model_cfg, teacher=True | False)
    study_tensors(study, plan, index=i, slice_target=[n_img, S] | None) -> dict:
      volume [n_img, 1, D, H, W]                        the whole volume (the 3D branch sees it all)
      slices [n_img, S', 1, h, w]; slice_plane/slice_index [n_img, S'] long; slice_pos [n_img, S']
      slice_series [n_img, S'] long                     the image's position in its record (series / phase id)
      slice_target [n_img, S'] float                    (when given)
      teacher [n_img, S'] float                         (plan.teacher: sums to 1 per image)
      slice_keep [n_img, P] long                        (plan.keep: positions along S')
      slice_context [n_img, S', F] float                (plan.context: the `context` TG-IS scorer's
                                                         per-slice intensity features, data/select/context.py)
    S' = model.preselect_k when pre-selection is on (and below S), else S. The kept slices carry
    their own plane, index and position, so slice_index still names the slice in the volume.
Teacher, picks and slice_context are computed over the S' slices the model sees, and again by
`restrict` when a sample is cut.

The dataset (data/dataset.py), `generate` (model/generation.py) and eval all call this one step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .base import Selector, VoteMIConfig, build_selector
from .context import needs_slice_context, slice_context

log = logging.getLogger(__name__)
_PER_SLICE = ("slices", "slice_plane", "slice_index", "slice_pos", "slice_series", "slice_target")
_SELECTED = ("teacher", "slice_keep", "slice_context")  # computed by `select` over the slices given


@dataclass
class SelectionPlan:
    """Which selectors run for each study (None = that step is off)."""

    preselect: Selector | None = None  # picks preselect_k slices before the slice encoder
    select: Selector | None = None  # teacher and/or the 2d_only picks
    teacher: bool = False  # emit the selector's teacher
    keep: bool = False  # emit the selector's picks as slice_keep
    preselect_k: int = 0
    context: VoteMIConfig | None = None  # emit slice_context (vote-k's k / num_picks from here)
    key: str = ""  # what the picks depend on (from_config); "" = never cached
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # flat config keys the picks depend on

    @classmethod
    def from_config(cls, model_cfg: Any, teacher: bool = False) -> SelectionPlan:
        """From `cfg.model`: `teacher` asks for the distillation target (when vote_mi.teacher is
        not off); the picks go along for the 2d_only variant; pre-selection when preselect_k > 0."""
        vm = model_cfg.vote_mi
        want_teacher = bool(teacher) and vm.teacher != "off"
        want_keep = model_cfg.variant == "2d_only"
        k = int(getattr(model_cfg, "preselect_k", 0))
        want_context = needs_slice_context(model_cfg)
        settings = {f"model.vote_mi.{name}": list(v) if isinstance(v, tuple) else v
                    for name, v in dataclasses.asdict(vm).items()}
        settings |= {"model.preselector": model_cfg.preselector, "model.preselect_k": k}
        return cls(
            preselect=build_selector(model_cfg.preselector, vm, k) if k > 0 else None,
            select=build_selector(vm.selector, vm, vm.num_picks) if (want_teacher or want_keep) else None,
            teacher=want_teacher,
            keep=want_keep,
            preselect_k=k,
            context=vm if want_context else None,
            key=json.dumps([dataclasses.asdict(vm), model_cfg.preselector, k, want_teacher, want_keep]
                           + [want_context] * want_context, sort_keys=True),
            settings=settings,
        )

    @classmethod
    def for_cache(cls, model_cfg: Any) -> SelectionPlan | None:
        """The plan `medvlm3d preprocess` stores: pre-selection, the teacher (unless
        vote_mi.teacher is off) and the picks, whatever a later run asks of them (it keeps what it
        needs, `stored_choice`). None when a selector reads more than the slices (the sample index
        or its labels: `random`, `labels`): then each run selects as it loads."""
        vm = model_cfg.vote_mi
        plan = cls.from_config(model_cfg, teacher=True)
        plan.select = build_selector(vm.selector, vm, vm.num_picks)
        plan.keep = True
        steps = [s for s in (plan.preselect, plan.select) if s is not None]
        return plan if all(getattr(s, "slices_only", False) for s in steps) else None


def series_ids(n_img: int, n_slices: int) -> torch.Tensor:
    """[n_img, n_slices] long: each slice's series / phase id = its image's position in the record
    (a manifest record lists its images in order, e.g. [arterial, venous])."""
    return torch.arange(n_img, dtype=torch.long)[:, None].expand(n_img, n_slices).contiguous()


def _gather(tensors: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-slice tensors [n_img, S, ...] -> [n_img, k, ...] at keep [n_img, k]."""
    out = dict(tensors)
    for name in _PER_SLICE:
        if name in tensors:
            t = tensors[name]
            idx = keep.view(*keep.shape, *([1] * (t.ndim - 2))).expand(*keep.shape, *t.shape[2:])
            out[name] = torch.gather(t, 1, idx)
    return out


def study_tensors(
    study: Any, plan: SelectionPlan | None = None, index: int = 0, slice_target: torch.Tensor | None = None,
    cache: Path | None = None, chosen: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """See the module docstring. `index`: the sample's dataset index (seeds a random selector).
    `cache`: a file holding this study's selection (the dataset names it beside the preprocessed
    volume's cache file): read when present, else written after selecting. `chosen`: the
    selection stored by `preprocess` (`SelectionPlan.for_cache`), used instead of selecting."""
    out: dict[str, torch.Tensor] = {
        "volume": study.volume,
        "slices": study.slices,
        "slice_plane": study.slice_plane,
        "slice_index": study.slice_index,
        "slice_pos": study.slice_pos,
        "slice_series": series_ids(*study.slice_plane.shape),
    }
    if slice_target is not None:
        out["slice_target"] = slice_target
    if plan is None:
        return out
    if chosen is not None:
        chosen = stored_choice(chosen, plan)
    elif cache is not None:
        chosen = _read(cache)
    if chosen is None:
        chosen = choose(out, plan, index)
        if cache is not None:
            _write(cache, chosen)
    if "preselect" in chosen:
        out = _gather(out, chosen["preselect"])
    if plan.context is not None and "slice_context" not in chosen:  # a selection stored without it
        chosen = chosen | {"slice_context": slice_context(out["slices"], out["slice_plane"], plan.context)}
    return out | {k: v for k, v in chosen.items() if k != "preselect"}


def stored_choice(chosen: dict[str, torch.Tensor], plan: SelectionPlan) -> dict[str, torch.Tensor]:
    """What `plan` uses of a selection stored with `SelectionPlan.for_cache`'s plan."""
    wanted = {"preselect", *(["teacher"] if plan.teacher else []), *(["slice_keep"] if plan.keep else []),
              *(["slice_context"] if plan.context is not None else [])}
    return {k: v for k, v in chosen.items() if k in wanted}


def choose(out: dict[str, torch.Tensor], plan: SelectionPlan, index: int) -> dict[str, torch.Tensor]:
    """{"preselect": [n_img, k] (when it cuts), "teacher", "slice_keep", "slice_context"}: what the
    plan picks and computes."""
    chosen: dict[str, torch.Tensor] = {}
    n_img, s = out["slices"].shape[:2]
    if plan.preselect is not None and plan.preselect_k < s:
        chosen["preselect"] = torch.stack([
            plan.preselect(out["slices"][i], out["slice_plane"][i], None, index,
                           out["slice_target"][i] if "slice_target" in out else None).keep
            for i in range(n_img)
        ])
        out = _gather(out, chosen["preselect"])
    picked = select(out, plan, index)
    return chosen | {k: picked[k] for k in _SELECTED if k in picked}


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # a bad cache file is recomputed, never fatal
        log.warning("%s: unreadable selection cache (%s: %s); recomputed", path, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None


def _write(path: Path, chosen: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in chosen.items()}, str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # a cache that cannot be written never stops training
        log.warning("%s: cannot write selection cache (%s: %s)", path, type(e).__name__, e)
        tmp.unlink(missing_ok=True)


def cache_name(volume_key: str, plan: SelectionPlan, index: int, slice_target: torch.Tensor | None) -> str | None:
    """File name of a study's selection beside its volume cache file `<volume_key>.safetensors`
    (None when the plan has no key, e.g. built by hand): keyed by the plan's config, the sample
    index (a random selector seeds from it) and the slice labels (the labels selector reads them)."""
    if not plan.key:
        return None
    h = hashlib.sha256(f"{plan.key}|{index}".encode())
    if slice_target is not None:
        h.update(slice_target.contiguous().numpy().tobytes())
    return f"{volume_key}.select-{h.hexdigest()[:16]}.safetensors"


def select(images: dict[str, torch.Tensor], plan: SelectionPlan | None, index: int = 0) -> dict[str, torch.Tensor]:
    """Add the plan's teacher [n_img, S] / slice_keep [n_img, P] / slice_context [n_img, S, F] to
    per-sample image tensors (any given ones are dropped: they belong to other slices)."""
    out = {k: v for k, v in images.items() if k not in _SELECTED}
    if plan is not None and plan.context is not None:
        out["slice_context"] = slice_context(out["slices"], out["slice_plane"], plan.context)
    if plan is None or plan.select is None:
        return out
    n_img = out["slices"].shape[0]
    sel = [plan.select(out["slices"][i], out["slice_plane"][i], None, index,
                       out["slice_target"][i] if "slice_target" in out else None) for i in range(n_img)]
    if plan.teacher:
        out["teacher"] = torch.stack([x.teacher for x in sel]).float()
    if plan.keep:
        out["slice_keep"] = torch.stack([x.keep for x in sel]).long()
    return out


def restrict(images: dict[str, Any], keep: torch.Tensor, plan: SelectionPlan | None = None,
             index: int = 0) -> dict[str, Any]:
    """A sample (or its image tensors) cut to the slices at keep [n_img, k] (per-slice tensors
    gathered), with the plan's teacher / picks / slice_context computed again over the kept slices."""
    return select(_gather(images, keep), plan, index)
