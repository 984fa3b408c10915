"""Helpers of the multi-process launch tests (tests/train/test_distributed.py, test_multinode.py).

Every launch trains the tiny stage-2 model (LoRA, distillation, slice loss) for STEPS steps with
`overrides(data, out, batch)`; `data` is the `dist_data` fixture of tests/train/conftest.py.

    free_port() -> a TCP port free on 127.0.0.1 now
    tree(root) -> {relative path: bytes} of every file under root
    overrides(data, out, batch) -> the key=value overrides of one run
    launch_cmd(config_file, data, out, *extra, launch_args=()) -> the `accelerate launch` argv
    launch_env() -> the environment of a launch (1 thread per process)
    losses(run) -> the per-step losses of run/metrics.jsonl
    assert_matches(run, reference) -> same per-step losses (RTOL) and exported weights (WEIGHT_ATOL)
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from medvlm3d.config import config_dir

STEPS = 4
COMMON = ["train.log_every=1", f"train.max_steps={STEPS}", "train.slice_loss_weight=0.5", "train.warmup_steps=1"]
RTOL = 1e-5  # relative, on each step's loss (see test_distributed.py for the measured noise)
WEIGHT_ATOL = 1e-5  # absolute, on every exported weight


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def overrides(data: dict[str, Path], out: Path, batch: int) -> list[str]:
    return [f"model.llm.tokenizer={data['tok']}", f"data.train={data['manifest']}", f"train.output_dir={out}",
            f"train.batch_size={batch}", *COMMON]


def launch_cmd(config_file: str, data: dict[str, Path], out: Path, *extra: str,
               launch_args: tuple[str, ...] = ()) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/<config_file> [launch_args] -m medvlm3d.train`
    on the tiny stage-2 config, batch 1 per process. Run it with cwd=config_dir().parent: the DeepSpeed
    json path in the accelerate yaml is relative to the folder holding configs/."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(config_dir() / "accelerate" / config_file), *launch_args,
            "-m", "medvlm3d.train", "--config", "tiny", "--stage", "stage2_finetune", *overrides(data, out, 1), *extra]


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_matches(run: Path, reference: Path) -> None:
    from medvlm3d.model.checkpoint import load_pretrained

    got, want = losses(run), losses(reference)
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=RTOL)
    a = load_pretrained(run / "final").state_dict()
    b = load_pretrained(reference / "final").state_dict()
    assert set(a) == set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, worst
