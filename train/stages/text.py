"""stage0_text: the VLM's causal LM on plain text (train/data.py TextDataset, TextCollator).

TextLM(vlm)(input_ids [B,L], attention_mask [B,L] | None, position_ids [B,L] | None) -> logits [B,L,V]
loss = lm (the LLM's own loss over the step's supervised tokens) x ctx.scale
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from medvlm3d.train.stages.base import STAGES, LossContext, Stage, summed


class TextLM(nn.Module):
    """The VLM's LLM alone. `.vlm` is what gets exported."""

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Padded rows (attention_mask) or packed ones (position_ids restarting at each sample)."""
        return self.vlm.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits


def lm_term(logits: torch.Tensor, labels: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """The LM contribution: the global-token-mean share of this micro-batch, x ctx.scale."""
    lm = ctx.lm_loss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=ctx.n_tokens.clamp(min=1))
    return lm * ctx.scale


@STAGES.register("stage0_text")
class TextStage(Stage):
    def dataset(self, cfg: Any, tokenizer: Any, num_visual_tokens: int) -> tuple[Dataset, Callable]:
        from medvlm3d.train.data import TextCollator, TextDataset, read_train_records

        d = cfg.data
        return (TextDataset(read_train_records(cfg), tokenizer, d.max_text_len, d.task, d.vqa_mode,
                            shuffle=d.shuffle_choices, context=d.text_context),
                TextCollator(tokenizer.pad_token_id, pack=d.text_packing))

    def module(self, vlm: nn.Module, cfg: Any) -> nn.Module:
        return TextLM(vlm)

    def loss(self, module: nn.Module, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = module(**{k: v for k, v in batch.items() if k != "labels"})
        terms = {"lm": lm_term(logits, batch["labels"], ctx)}
        return summed(terms), terms
