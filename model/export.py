"""Checkpoint export: a standalone copy of a checkpoint folder (see model/checkpoint.py for the
layout), the base LLM always stored in `llm/`, the LoRA adapter kept or merged.

    export(checkpoint, out, merge_lora=False) -> Path
        With merge_lora the adapter is merged and `<out>/llm` loads with plain
        `AutoModelForCausalLM.from_pretrained`. The verb: `medvlm3d export` (medvlm3d/cli/export.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medvlm3d.data.errors import ConfigError

log = logging.getLogger(__name__)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, merge_lora: bool = False) -> Path:
    """A standalone copy of a checkpoint: the base LLM always stored in `llm/` (even when the
    source names an external LLM folder), the adapter kept or merged (`merge_lora`)."""
    from medvlm3d.eval.infer import _check_checkpoint, load_model
    from medvlm3d.model.checkpoint import save_pretrained
    from medvlm3d.model.llm import has_lora

    src = _check_checkpoint(checkpoint)
    if Path(out).resolve() == src.resolve():
        raise ConfigError(f"export: --out must differ from --checkpoint ({src})")
    model = load_model(src, "cpu")
    if merge_lora and not has_lora(model.llm):
        log.info("%s holds no LoRA adapter; --merge-lora has nothing to merge", src)
    path = save_pretrained(model, out, merge_lora=merge_lora, save_base_llm="always")
    log.info("exported %s -> %s%s", src, path, " (LoRA merged)" if merge_lora else "")
    return path
