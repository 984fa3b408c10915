"""Helpers of the training-recipe tests (tests/train/test_recipe*.py).

    tiny(phantom, out, stage, data="all", *overrides) -> the tiny RunConfig of one stage
    history(run) -> the loss history of the run's latest complete checkpoint
    metrics(run) -> the records of run/metrics.jsonl
    PAPER_TINY: overrides that shrink a paper config (configs/med2e3.yaml, ...) to test size
"""

from __future__ import annotations

import json
from pathlib import Path

from medvlm3d.config import load_config
from medvlm3d.train.checkpointing import latest_complete, read_progress


def tiny(phantom: dict[str, Path], out: Path, stage: str, data: str = "all", *overrides: str):
    return load_config("tiny", [f"model.llm.tokenizer={phantom['tok']}", f"data.train={phantom[data]}",
                                f"train.output_dir={out}", "train.log_every=1", *overrides], layers=[stage])


def history(run: Path) -> list[float | None]:
    return read_progress(latest_complete(run))["loss_history"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


PAPER_TINY = [
    "data.size=[16,32,32]", "data.slice_size=[32,32]", "data.num_workers=0", "data.max_text_len=96",
    "model.encoder3d.preset=vit3d_tiny", "model.encoder3d.hidden_size=32", "model.encoder3d.num_layers=1",
    "model.encoder3d.num_heads=2", "model.encoder3d.mlp_dim=64",
    "model.slice_encoder.model_name=vit_tiny_patch16_224", "model.slice_encoder.num_tokens=4",
    "model.slice_encoder.model_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.slice_encoder.gradient_checkpointing=false", "model.inter_slice.num_heads=2",
    "model.projector.pool3d=[1,2,2]",
    "model.llm.hidden_size=32", "model.llm.num_layers=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=4",
    "model.llm.intermediate_size=64", "model.llm.max_position_embeddings=512", "model.llm.dtype=float32",
    "model.llm.gradient_checkpointing=false", "model.llm.lora.r=4", "model.llm.lora.alpha=8",
    "train.mixed_precision='no'", "train.batch_size=2", "train.global_batch=0", "train.grad_accum=1",
    "train.epochs=0", "train.max_steps=1", "train.log_every=1",
]
