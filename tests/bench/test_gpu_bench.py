"""bench/gpu_bench.sh: the dry run (CPU, tiny config) prints and writes the full table with finite
figures; an out-of-memory case becomes an "OOM" row and the run goes on; no CUDA -> exit 2."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CASES = ["sdpa-ckpt", "sdpa-no-ckpt", "eager-ckpt", "eager-no-ckpt"]
NUMERIC = ["batch", "seq", "s/step (s/study)", "samples/s", "tokens/s", "peak GiB"]


@functools.cache
def load_bench():
    """bench/gpu_bench.py as a module (it imports bench_memory as a sibling script)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


@pytest.mark.slow
def test_dry_run_writes_the_table(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_bench.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "gpu_bench.md").read_text()
    rows = parse_table(md)
    assert rows == parse_table(proc.stdout)  # the printed table is the written one
    assert [(r["config"], r["case"]) for r in rows] == [("tiny", "infer")] + [("tiny", c) for c in CASES]
    assert [r["attn"] for r in rows] == ["sdpa", "sdpa", "sdpa", "eager", "eager"]
    assert [r["ckpt"] for r in rows] == ["-", "on", "off", "on", "off"]
    assert rows[0]["status"] == "ok (4 new tokens)" and all(r["status"] == "ok" for r in rows[1:])
    for r in rows:
        cols = NUMERIC + (["TFLOP/step", "TFLOP/s", "MFU %"] if r["case"] != "infer" else [])
        for col in cols:
            value = float(r[col].replace(",", ""))
            assert math.isfinite(value) and value > 0, (r["case"], col, r[col])
    assert "989 TFLOP/s" in md and "kw*N*T" in md  # the MFU formula and peak in the footer
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [r["case"] for r in data["rows"]] == ["infer"] + CASES
    train = [r for r in data["rows"] if r["case"] != "infer"]
    assert all(math.isclose(r["tokens_s"], r["batch"] * r["seq"] / r["time_s"], rel_tol=1e-9) for r in train)
    assert all(r["seq"] == train[0]["seq"] and r["tflop_step"] == train[0]["tflop_step"] for r in train)


def test_out_of_memory_is_a_row_and_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench()
    args = bench.parse(["--dry-run", "--cases", "sdpa-ckpt"])
    args.bf16 = False

    def oom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(bench, "train_case", oom)
    rows = []
    bench.run_case("tiny", "sdpa-ckpt", False, args, torch.device("cpu"), rows.append)
    assert [(r.case, r.status) for r in rows] == [("sdpa-ckpt", "OOM")]
    assert math.isnan(rows[0].time_s)
    assert bench.table_line(rows[0]).endswith("| OOM |")


def test_step_flops_follows_the_stated_formula() -> None:
    bench = load_bench()
    cfg = bench.case_config("tiny", "sdpa", True, [])
    model = bench.build(cfg, torch.device("cpu"), 64)
    base = model.llm.get_base_model()
    n_llm = sum(p.numel() for p in model.llm.parameters()) - base.get_input_embeddings().weight.numel()
    L, d, seq, b = base.config.num_hidden_layers, base.config.hidden_size, 50, 3
    enc = bench.step_flops(model, cfg, b, seq, 16) - 4 * n_llm * b * seq - 3 * 4 * L * d * seq * b * seq
    assert cfg.model.trainable.llm == "lora" and enc > 0  # LoRA LLM: kw = 4; frozen encoders add their forward
    assert bench.step_flops(model, cfg, 2 * b, seq, 16) == pytest.approx(2 * bench.step_flops(model, cfg, b, seq, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_no_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    assert bench.main(["--configs", "tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
