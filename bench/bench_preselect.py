"""The 2D-branch cost with slice pre-selection (model.preselect_k): k of S slices vs all S.

    python bench/bench_preselect.py                       # demo (fwd+bwd) and real size (fwd), k=8 of 32
    python bench/bench_preselect.py --rounds 10 --real-rounds 2 --k 8

The 2D branch is the slice encoder + Projector2D + TG-IS (text projection, slice descriptors,
scores, fusion), built from the config with random weights; the 3D tokens and the question
feature are random inputs (the 3D branch sees the whole volume either way, so it is not timed).
With pre-selection the data side has already cut the stack to k slices (data/select/step.py),
so the branch simply receives [N, k, 1, h, w]: that is what is timed. The data-side selector's
own cost (vote-k on intensity features, per study, cached with the preprocessed volume) is
timed apart.

    demo: configs/demo.yaml, 32 slices of 64x64, batch 8, forward + backward (training step)
    real: configs/m3d_phi3_2e3.yaml shapes, 32 slices of 256x256, vit_base_patch16_siglip_256
          (random weights, 256 tokens per slice), LLM width 3072 (Phi-3-mini), batch 1,
          forward only under no_grad (inference; the slice encoder is frozen in that recipe)

Rounds are interleaved (full, k, full, k, ... with the order alternating), one thread; the
ratio is median(k) / median(full) from the same run.

Measured (2-core shared CPU, 1 thread): demo fwd+bwd 815 ms -> 195 ms, ratio 0.240 (10 rounds;
0.347 in a 5-round run while other jobs loaded the CPU); real fwd 141.3 s -> 25.5 s, ratio 0.181
(2 rounds); the data-side votek selector 7-12 ms per study at demo size, 53 ms at real size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from medvlm3d.config import load_config
from medvlm3d.data.select import build_selector
from medvlm3d.model.encoder3d import build_encoder3d
from medvlm3d.model.projector import Projector2D, projected_grid
from medvlm3d.model.slice_encoder import SliceEncoder
from medvlm3d.model.tgis import TGIS

PHI3_WIDTH = 3072


def branch(cfg: Any, width: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, tuple[int, int, int]]:
    mc = cfg.model
    enc = SliceEncoder(mc.slice_encoder, tuple(cfg.data.slice_size), load_weights=False)
    proj = Projector2D(mc.projector, enc.out_dim, width)
    tgis = TGIS(mc.tgis, width, width)
    grid = projected_grid(build_encoder3d(mc.encoder3d).grid, mc.projector.pool3d)
    return enc, proj, tgis, grid


def step(parts: Any, grid: tuple[int, int, int], n: int, s: int, cfg: Any, width: int, backward: bool) -> float:
    enc, proj, tgis, _ = parts
    h, w = cfg.data.slice_size
    slices = torch.rand(n, s, 1, h, w)
    mask = torch.ones(n, s, dtype=torch.bool)
    pos = ((torch.arange(s) + 0.5) / s).expand(n, s)
    plane = torch.zeros(n, s, dtype=torch.long)
    x3d = torch.randn(n, grid[0] * grid[1] * grid[2], width)
    text = torch.randn(n, width)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = tgis(x3d, grid, proj(enc(slices, mask)), text, pos, plane, mask)
        if backward:
            (out.z2d.float().pow(2).mean() + out.scores.sum()).backward()
    return time.perf_counter() - t0


def measure(name: str, cfg: Any, width: int, n: int, k: int, rounds: int, backward: bool) -> dict[str, float]:
    torch.manual_seed(0)
    parts = branch(cfg, width)
    for m in parts[:3]:
        m.train(backward)
        m.requires_grad_(backward)
    s = 32
    step(parts, parts[3], n, k, cfg, width, backward)  # warm-up
    full, pre = [], []
    for r in range(rounds):
        order = [(s, full), (k, pre)] if r % 2 == 0 else [(k, pre), (s, full)]
        for count, bucket in order:
            bucket.append(step(parts, parts[3], n, count, cfg, width, backward))
    f, p = statistics.median(full), statistics.median(pre)
    print(f"{name:<5} {'fwd+bwd' if backward else 'fwd':<8} batch {n}  S=32: {f * 1e3:9.1f} ms   "
          f"k={k}: {p * 1e3:9.1f} ms   ratio {p / f:.3f}   ({rounds} rounds)", flush=True)
    return {"full_s": f, "pre_s": p, "ratio": p / f}


def selector_cost(cfg: Any, k: int, repeats: int = 5) -> float:
    h, w = cfg.data.slice_size
    slices, plane = torch.rand(32, 1, h, w), torch.zeros(32, dtype=torch.long)
    sel = build_selector(cfg.model.preselector, cfg.model.vote_mi, k)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sel(slices, plane)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds at demo size")
    p.add_argument("--real-rounds", type=int, default=2, help="interleaved rounds at real size (0 = skip)")
    args = p.parse_args()
    torch.set_num_threads(1)
    demo = load_config("demo", [f"model.preselect_k={args.k}"])
    measure("demo", demo, demo.model.llm.hidden_size, 8, args.k, args.rounds, backward=True)
    print(f"data-side selector '{demo.model.preselector}' at demo size: {selector_cost(demo, args.k) * 1e3:.1f} ms/study")
    if args.real_rounds:
        real = load_config("m3d_phi3_2e3", [f"model.preselect_k={args.k}", "model.encoder3d.weights="])
        measure("real", real, PHI3_WIDTH, 1, args.k, args.real_rounds, backward=False)
        print(f"data-side selector '{real.model.preselector}' at real size: {selector_cost(real, args.k) * 1e3:.1f} ms/study")


if __name__ == "__main__":
    main()
