"""The `Stage` contract and its registry `STAGES` (train.stage names -> Stage subclasses).

A stage supplies, for one training run:

    dataset(cfg, tokenizer, num_visual_tokens) -> (Dataset, collate_fn)   what it trains on
    module(vlm, cfg) -> nn.Module                                         what it trains (.vlm is exported)
    loss(module, batch, ctx) -> (loss, terms)                             one micro-batch's objective

`terms` maps names to scalar tensors. Every name NOT in `stage.diagnostics` is a weighted
contribution, and `loss` is computed AS their sum (`summed`), so what is logged is what is
backpropagated. Names in `stage.diagnostics` (e.g. "kl", the unweighted KL) are detached
read-outs, logged but never summed. All terms are in backpropagated units: the loop logs
`term / ctx.scale` per micro-batch and all-reduces them (see train/loop.py micro_batch_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from medvlm3d.data.errors import ConfigError
from medvlm3d.registry import Registry

if TYPE_CHECKING:
    from medvlm3d.config import RunConfig

STAGES = Registry("stage")


@dataclass
class LossContext:
    """What a stage's loss needs besides the module and the batch.

    lm_loss: the LLM's own causal LM loss; n_tokens: supervised tokens of the whole optimizer step
    (all processes and micro-batches, a 0-d tensor); scale: processes x accumulation steps.
    """

    cfg: "RunConfig"
    step: int
    lm_loss: Callable[..., torch.Tensor]
    n_tokens: torch.Tensor
    scale: float


def summed(terms: dict[str, torch.Tensor], diagnostics: tuple[str, ...] = ()) -> torch.Tensor:
    """The sum of the contributions in `terms` (every name not in `diagnostics`)."""
    parts = [v for k, v in terms.items() if k not in diagnostics]
    if not parts:
        raise ValueError(f"a stage loss needs at least one contribution, got only {sorted(terms)}")
    total = parts[0]
    for v in parts[1:]:
        total = total + v
    return total


class Stage:
    """One training stage; subclasses register with `@STAGES.register("<name>")`."""

    diagnostics: ClassVar[tuple[str, ...]] = ()
    runs_vlm: ClassVar[bool] = False  # the module is the MedVLM's image forward (feature cache, TG-IS)

    def __init__(self, name: str) -> None:
        self.name = name

    def dataset(self, cfg: "RunConfig", tokenizer: Any, num_visual_tokens: int) -> tuple[Dataset, Callable]:
        raise NotImplementedError

    def module(self, vlm: nn.Module, cfg: "RunConfig") -> nn.Module:
        return vlm

    def loss(self, module: nn.Module, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def contributions(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The summed part of `terms`."""
        return {k: v for k, v in terms.items() if k not in self.diagnostics}


def get_stage(name: str) -> Stage:
    """The registered stage `name` (ConfigError listing the names when unknown)."""
    if name not in STAGES:
        raise ConfigError(f"train.stage: unknown stage {name!r}; registered: {', '.join(STAGES.names())}")
    return STAGES.get(name)(name)
