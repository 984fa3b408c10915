#!/usr/bin/env bash
# One-GPU benchmark of the real-size configs (bench/gpu_bench.py: throughput, MFU, sdpa vs eager,
# gradient checkpointing, peak memory, inference latency); random weights, nothing downloaded.
#   bash bench/gpu_bench.sh                 real_0p5b then med2e3 on cuda (~3-5 min on one H100/H200)
#   bash bench/gpu_bench.sh --dry-run       the same code path on the CPU, tiny config (seconds)
#   OUT=<dir> bash bench/gpu_bench.sh       also writes <dir>/gpu_bench.md and gpu_bench.json
# Python: $PYTHON, else .venv/bin/python when present, else `python` on PATH (medvlm3d installed:
# pip install --no-deps -e .). Exit 2: no CUDA device without --dry-run, or medvlm3d not importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PY" bench/gpu_bench.py "$@"
