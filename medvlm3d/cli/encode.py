"""`medvlm3d encode`: run a checkpoint's frozen encoders once over every study of a dataset and write
their outputs (3D tokens, per-slice 2D tokens) into shards plus an index for `data.features=<dir>`,
over `medvlm3d.model.features.run_encode`. Under `accelerate launch` (any number of processes and
nodes) each rank writes its own shards; rank 0 merges the index after a barrier. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained folder whose encoders are encoded")
    parser.add_argument("--data", required=True,
                        help="dataset: a .jsonl manifest, M3D_Cap.json, an M3D-VQA .csv or a CT-RATE root")
    parser.add_argument("--out", required=True, help="the features folder (shards/ and index.json)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="stored dtype (default bf16)")
    parser.add_argument("--shard-size", type=int, default=64, help="studies per shard (default 64)")
    parser.add_argument("--on-error", default="skip", choices=("skip", "stop"),
                        help="a study that fails to load: record it and go on (skip, default) or stop (exit 2)")
    parser.add_argument("--device", default="cpu", help="where the encoders run (cpu, cuda, cuda:1, ...)")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.data.preprocess import launched_ranks
    from medvlm3d.model.checkpoint import load_pretrained
    from medvlm3d.model.features import run_encode

    with launched_ranks() as (rank, world, barrier):
        vlm = load_pretrained(args.checkpoint, device=args.device)
        summary = run_encode(vlm, args.data, args.out, dtype=args.dtype, shard_size=args.shard_size,
                             on_error=args.on_error, rank=rank, world=world, barrier=barrier, progress=rank == 0)
    print(f"encode rank {rank}/{world}: {summary.line()}", flush=True)
    if rank == 0:
        print(f"index: {os.path.join(args.out, 'index.json')}")
    return 0
