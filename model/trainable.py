"""Which parameters train: an explicit per-component policy, in the manner of torchtune.

Components are named as the fields of `TrainablePolicy` (encoder3d, slice_encoder, inter_slice,
tgis, projector, llm); a component that a model variant lacks is passed as None and skipped.

- `apply_trainable_policy(components, policy)`: sets `requires_grad` per component:
  "frozen" -> nothing trains; "full" -> everything trains; "lora" (the LLM only) -> only the
  adapter weights of peft's LoRA layers train (found through `peft.tuners.lora.LoraLayer` and its
  `adapter_layer_names`, e.g. `lora_A` / `lora_B`, for the active adapters).
- `count_parameters(components)` -> {name: {"trainable": n, "total": n}, ..., "total": {...}}.
- `trainable_parameter_groups(components, base_lr, lr_per_component, weight_decay)` -> AdamW
  parameter groups, one learning rate per component, no weight decay on biases and other 1-D
  tensors (norm weights), via timm's `param_groups_weight_decay`.

- `stochastic_layers(module)`: its batch-/instance-norm layers with running statistics and its
  dropout / drop-path layers: the layers whose output depends on train/eval mode.
- `hold_frozen_in_eval(components)`: puts those layers of every frozen component (no parameter
  requires grad) in eval mode, so that a frozen encoder is a fixed function: its batch-norm
  statistics do not drift and its output for a study does not depend on the rest of the batch.
  `MedVLM.train()` calls it; the rest of a frozen module keeps the requested mode (an LLM's
  gradient checkpointing, which checks `self.training`, still works while it is frozen).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from peft.tuners.lora import LoraLayer
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from medvlm3d.config_fields import check_choice


@dataclass
class TrainablePolicy:
    """Per component: frozen | full (| lora for the LLM)."""

    encoder3d: str = "full"
    slice_encoder: str = "full"
    inter_slice: str = "full"
    tgis: str = "full"
    projector: str = "full"
    llm: str = "lora"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = ("frozen", "lora", "full") if f.name == "llm" else ("frozen", "full")
            check_choice(f"trainable.{f.name}", getattr(self, f.name), allowed)


log = logging.getLogger(__name__)

TOTAL = "total"


def policy_names(policy: TrainablePolicy | type[TrainablePolicy] = TrainablePolicy) -> list[str]:
    """The component names a policy covers (its dataclass fields)."""
    return [f.name for f in dataclasses.fields(policy)]


def _check_names(components: Mapping[str, Any]) -> None:
    valid = policy_names()
    unknown = [n for n in components if n not in valid]
    if unknown:
        raise ValueError(f"components {unknown} are not in the trainable policy; valid names: {valid}")


def lora_layers(module: nn.Module) -> list[LoraLayer]:
    """The peft LoRA layers inside `module` (empty when it carries no LoRA adapter)."""
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def _mark_only_lora_trainable(module: nn.Module, name: str) -> None:
    layers = lora_layers(module)
    if not layers:
        raise ValueError(
            f"trainable.{name} is 'lora' but the {name} ({type(module).__name__}) has no LoRA adapter; "
            "wrap it with medvlm3d.model.llm.apply_lora first, or use 'full' / 'frozen'"
        )
    module.requires_grad_(False)
    for layer in layers:
        for adapter in layer.active_adapters:
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr, None)  # nn.ModuleDict / nn.ParameterDict keyed by adapter
                if holder is not None and adapter in holder:
                    holder[adapter].requires_grad_(True)


def stochastic_layers(module: nn.Module) -> list[nn.Module]:
    """The submodules of `module` whose output depends on train/eval mode: norms with running
    statistics (BatchNorm, InstanceNorm with track_running_stats), dropout, and drop-path (timm
    keeps its rate in `drop_prob`)."""
    out = []
    for m in module.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            out.append(m)
        elif isinstance(m, _DropoutNd) or isinstance(getattr(m, "drop_prob", None), (int, float)):
            out.append(m)
    return out


def hold_frozen_in_eval(components: Mapping[str, nn.Module | None]) -> list[str]:
    """Put the `stochastic_layers` of each frozen present component in eval mode (in place);
    returns the names of the frozen components."""
    frozen = []
    for name, module in components.items():
        if module is None or any(p.requires_grad for p in module.parameters()):
            continue
        for m in stochastic_layers(module):
            m.eval()
        frozen.append(name)
    return frozen


def apply_trainable_policy(components: Mapping[str, nn.Module | None], policy: TrainablePolicy) -> None:
    """Set `requires_grad` on every present component as `policy` says (in place)."""
    _check_names(components)
    for name in policy_names(policy):
        module = components.get(name)
        if module is None:
            continue
        mode = getattr(policy, name)
        if mode == "frozen":
            module.requires_grad_(False)
        elif mode == "full":
            module.requires_grad_(True)
        elif mode == "lora":
            _mark_only_lora_trainable(module, name)
        else:  # TrainablePolicy validates its values; this guards hand-built objects
            raise ValueError(f"trainable.{name} must be frozen | full | lora, got {mode!r}")
        log.debug("trainable.%s = %s", name, mode)


def _numel(p: nn.Parameter) -> int:
    # DeepSpeed ZeRO-3 partitions parameters and keeps the full size in `ds_numel`.
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(components: Mapping[str, nn.Module | None]) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per present component, plus a "total" row (a tensor
    shared between components is counted once there)."""
    if TOTAL in components:
        raise ValueError(f"a component may not be named {TOTAL!r}")
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    total = {"trainable": 0, "total": 0}
    for name, module in components.items():
        if module is None:
            continue
        row = {"trainable": 0, "total": 0}
        for p in module.parameters():
            n = _numel(p)
            row["total"] += n
            row["trainable"] += n if p.requires_grad else 0
            if id(p) not in seen:
                seen.add(id(p))
                total["total"] += n
                total["trainable"] += n if p.requires_grad else 0
        out[name] = row
    out[TOTAL] = total
    return out


def trainable_parameter_groups(
    components: Mapping[str, nn.Module | None],
    base_lr: float,
    lr_per_component: Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: per present component, its trainable parameters at
    `lr_per_component.get(name, base_lr)`, split into a decayed group (`weight_decay`) and an
    undecayed one (biases and 1-D tensors such as norm weights, plus a timm model's
    `no_weight_decay()` names). Each group carries "name" ("<component>" or "<component>/no_decay").

    Raises ValueError for a name in `lr_per_component` that is not a component, a negative rate,
    or when nothing is trainable.
    """
    lr_per_component = dict(lr_per_component or {})
    valid = list(components)
    unknown = [n for n in lr_per_component if n not in valid]
    if unknown:
        raise ValueError(f"train.lr_per_component names {unknown} are not model components; valid names: {valid}")
    if base_lr < 0 or any(v < 0 for v in lr_per_component.values()):
        raise ValueError(f"learning rates must be >= 0, got base {base_lr} and {lr_per_component}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, module in components.items():
        if module is None:
            continue
        lr = float(lr_per_component.get(name, base_lr))
        no_wd = list(module.no_weight_decay()) if callable(getattr(module, "no_weight_decay", None)) else []
        for g in param_groups_weight_decay(module, weight_decay=weight_decay, no_weight_decay_list=no_wd):
            params = [p for p in g["params"] if id(p) not in seen]  # a shared tensor joins one group only
            seen.update(id(p) for p in params)
            if not params:
                continue
            decayed = g["weight_decay"] > 0
            groups.append(
                {"params": params, "lr": lr, "weight_decay": float(g["weight_decay"]),
                 "name": name if decayed else f"{name}/no_decay"}
            )
    if not groups:
        raise ValueError(f"no trainable parameters in components {[n for n, m in components.items() if m is not None]}")
    return groups
