"""stage1_align and stage2_finetune: the MedVLM's image forward (data/collate.py batches).

MedVLM(**batch) -> logits [B,L,V], scores / teacher / slice_mask [N,S]
loss = lm x ctx.scale + distill + slice, where
    distill = λ(step) · KL(teacher ‖ scores)   (only when train.distill_weight > 0 and a teacher is given)
    slice   = train.slice_loss_weight · slice_loss(scores, slice_target)   (only when the weight > 0)
diagnostics (logged, not summed): kl = KL(teacher ‖ scores), slice_nll = slice_loss(...)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from medvlm3d.train.losses import distill_weight, distillation_loss, slice_loss
from medvlm3d.train.stages.base import STAGES, LossContext, Stage, summed
from medvlm3d.train.stages.text import lm_term


@STAGES.register("stage1_align")
@STAGES.register("stage2_finetune")
class VLMStage(Stage):
    diagnostics = ("kl", "slice_nll")
    runs_vlm = True

    def dataset(self, cfg: Any, tokenizer: Any, num_visual_tokens: int) -> tuple[Dataset, Callable]:
        from medvlm3d.train.data import read_train_records, study_data

        return study_data(cfg, read_train_records(cfg), tokenizer, num_visual_tokens,
                          teacher=cfg.train.distill_weight > 0)

    def loss(self, module: nn.Module, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = ctx.cfg.train
        out = module(**{k: v for k, v in batch.items() if k != "labels"})
        terms = {"lm": lm_term(out.logits, batch["labels"], ctx)}
        if out.scores is not None:
            if t.distill_weight > 0 and out.teacher is not None:
                kl = distillation_loss(out.teacher, out.scores, out.slice_mask)
                terms["distill"] = distill_weight(ctx.step, t.max_steps, t.distill_weight, t.distill_schedule) * kl
                terms["kl"] = kl.detach()
            if t.slice_loss_weight > 0:
                nll = slice_loss(out.scores, batch["slice_target"], batch["has_slice_target"])
                terms["slice"] = t.slice_loss_weight * nll
                terms["slice_nll"] = nll.detach()
        return summed(terms, self.diagnostics), terms
