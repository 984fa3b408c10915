"""Helpers of the training-recipe tests (tests/train/test_recipe*.py).

    tiny(phantom, out, stage, data="all", *overrides) -> the tiny RunConfig of one stage
    history(run) -> the loss history of the run's latest complete checkpoint
    metrics(run) -> the records of run/metrics.jsonl
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
