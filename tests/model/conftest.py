"""Fixtures of the model tests: `trained`, a tiny MedVLM as after training (non-zero LoRA B)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medvlm3d.config import load_config
from medvlm3d.model.medvlm import MedVLM, build_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir: Path) -> MedVLM:
    """A tiny model whose LoRA B matrices and heads are non-zero (as after training), built
    from a private tokenizer copy that is deleted before loading: the folder must suffice."""
    tok = tmp_path_factory.mktemp("tok_copy") / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    torch.manual_seed(0)
    m = build_model(load_config("tiny", [f"model.llm.tokenizer={tok}"]))
    with torch.no_grad():
        for name, p in m.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    shutil.rmtree(tok)
    return m.eval()
