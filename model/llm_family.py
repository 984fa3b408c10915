"""What differs between LLM families, handled in one place for model/llm.py and train/estimate.py.

    linear_names(model) -> sorted leaf names of the linear layers: nn.Linear and transformers'
        Conv1D (GPT-2 keeps its projections in Conv1D)
    auto_lora_targets(model) -> the LoRA targets `llm.lora.target_modules: auto` chooses: every
        linear layer type of the decoder (Llama/Mistral/Qwen2/Gemma: q/k/v/o_proj, gate/up/down_proj;
        Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj; GPT-2: c_attn, c_proj, c_fc), never the
        output head (`lm_head`, or whichever module the model returns as its output embeddings)
        nor a mixture-of-experts router (`gate`, `router`)
    lora_targets(model, requested) -> the targets to give peft: `auto` (or ["auto"]) as above; an
        explicit name that matches no module is a ConfigError listing the linear layer types; the
        layer types an explicit list leaves out are logged
    grow_embeddings(model, n): resize the token embeddings to n rows; on the meta device (memory
        estimates) without transformers' mean resizing, which reads the values
    embedding_rms(model) -> float: the RMS of what the input embedding *module* outputs over the
        whole vocabulary (Gemma multiplies its table by sqrt(hidden) inside the module, so the
        table's own RMS is ~sqrt(hidden) too small); 1.0 on the meta device
    with_attn_fallback(build, requested) -> model: build(attn_implementation); when the
        architecture refuses it (Gemma2 with sdpa), a warning naming `model.llm.attn_implementation`
        and build("eager")
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from medvlm3d.data.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
ROUTERS = frozenset({"gate", "router"})  # MoE routers: Linear, never LoRA targets


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D


def linear_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of `model`'s linear layers (nn.Linear and Conv1D)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_linear(m)})


def _head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {"lm_head"} | {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if head is not None and m is head}


def auto_lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer type of the model but its output head and MoE routers."""
    skip = _head_names(model) | ROUTERS
    found = [n for n in linear_names(model) if n not in skip]
    if not found:
        raise ConfigError(f"llm.lora.target_modules=auto: {type(model).__name__} has no linear layer besides "
                          f"its output head (linear layers: {linear_names(model)})")
    return found


def lora_targets(model: nn.Module, requested: str | Sequence[str]) -> list[str]:
    """The module-name suffixes to put LoRA on (see the module docstring)."""
    names = [requested] if isinstance(requested, str) else list(requested)
    if names == [AUTO]:
        chosen = auto_lora_targets(model)
        log.info("llm.lora.target_modules=auto for %s: %s", type(model).__name__, chosen)
        return chosen
    if not names:
        raise ConfigError(f"llm.lora.target_modules is empty; use 'auto' or choose among {linear_names(model)}")
    if AUTO in names:
        raise ConfigError(f"llm.lora.target_modules: 'auto' stands alone, got {names}")
    modules = [name for name, _ in model.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise ConfigError(
            f"llm.lora.target_modules {missing} match no module of {type(model).__name__}; its linear layers are "
            f"{linear_names(model)} ('auto' chooses {auto_lora_targets(model)})")
    left = sorted(set(auto_lora_targets(model)) - set(names))
    if left:
        log.warning("llm.lora.target_modules %s matched only some linear layer types of %s; without LoRA: %s "
                    "(target_modules: auto chooses them all)", names, type(model).__name__, left)
    return names


def grow_embeddings(model: Any, n: int) -> None:
    """Resize `model`'s token embeddings (and tied/untied head) to `n` rows."""
    on_meta = model.get_input_embeddings().weight.is_meta
    model.resize_token_embeddings(n, mean_resizing=not on_meta)


@torch.no_grad()
def embedding_rms(model: Any, chunk: int = 4096) -> float:
    """RMS of the input embedding module's outputs over all token ids (1.0 on meta)."""
    emb = model.get_input_embeddings()
    weight = emb.weight
    if weight.is_meta:
        return 1.0
    total, count = 0.0, 0
    for start in range(0, int(weight.shape[0]), chunk):
        ids = torch.arange(start, min(start + chunk, int(weight.shape[0])), device=weight.device)
        out = emb(ids).float()
        total += float(out.pow(2).sum())
        count += out.numel()
    return (total / max(1, count)) ** 0.5


def _refuses(e: Exception) -> bool:
    return "attention implementation" in str(e) or "attn_implementation" in str(e)


def with_attn_fallback(build: Callable[[str], Any], requested: str) -> Any:
    """build(requested), or build("eager") with a warning when the architecture refuses it."""
    try:
        return build(requested)
    except ValueError as e:
        if requested == "eager" or not _refuses(e):
            raise
        log.warning("model.llm.attn_implementation=%s is not supported by this architecture (%s); using eager "
                    "attention. Set model.llm.attn_implementation=eager to silence this", requested,
                    " ".join(str(e).split())[:160])
        return build("eager")


__all__ = ["AUTO", "auto_lora_targets", "embedding_rms", "grow_embeddings", "linear_names", "lora_targets",
           "with_attn_fallback"]
