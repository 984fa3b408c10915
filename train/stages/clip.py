"""stage0_clip: contrastive pretraining of the encoders on report records (train/clip.py).

ContrastiveModel(vlm, cfg)(**batch) -> {loss_volume, loss_slices, loss, logit_scale} (scalars)
loss = loss_volume + loss_slices (whichever the model has); diagnostic: logit_scale
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from medvlm3d.data.errors import DataError
from medvlm3d.train.stages.base import STAGES, LossContext, Stage, summed


@STAGES.register("stage0_clip")
class ClipStage(Stage):
    diagnostics = ("logit_scale",)

    def dataset(self, cfg: Any, tokenizer: Any, num_visual_tokens: int) -> tuple[Dataset, Callable]:
        from medvlm3d.train.data import read_train_records, study_data

        records = [r for r in read_train_records(cfg) if r.get("task") == "report"]
        if not records:
            raise DataError(f"data.train {cfg.data.train!r} holds no report records, which stage0_clip trains on")
        return study_data(cfg, records, tokenizer, num_visual_tokens)

    def module(self, vlm: nn.Module, cfg: Any) -> nn.Module:
        from medvlm3d.train.clip import ContrastiveModel

        return ContrastiveModel(vlm, cfg)

    def loss(self, module: nn.Module, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = module(**batch)
        if not isinstance(out, dict) or not ({"loss_volume", "loss_slices"} & set(out)):
            raise ValueError("the stage0_clip model must return a dict holding 'loss_volume' and/or 'loss_slices'")
        terms = {k: out[k] for k in ("loss_volume", "loss_slices") if k in out}
        if "logit_scale" in out:
            terms["logit_scale"] = out["logit_scale"].detach()
        return summed(terms, self.diagnostics), terms
