"""`medvlm3d preprocess`: read each study of a dataset once and write preprocessed shards plus an
index for `data.preprocessed=<dir>`, over `medvlm3d.data.preprocess.run_preprocess`. Under
`accelerate launch` (any number of processes and nodes) each rank writes its own shards; rank 0
merges the index after a barrier. Exit 2 on bad input, or on a bad volume with --on-error stop."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="dataset: a .jsonl manifest, M3D_Cap.json, an M3D-VQA .csv or a CT-RATE root")
    parser.add_argument("--config", default="demo",
                        help="run config (YAML path or shipped name) whose data and model.vote_mi sections set "
                             "the preprocessing and stored selection (default demo)")
    parser.add_argument("--out", required=True, help="the cache folder (shards/ and index.json)")
    parser.add_argument("--shard-size", type=int, default=64, help="studies per shard (default 64)")
    parser.add_argument("--on-error", default="skip", choices=("skip", "stop"),
                        help="a study that fails to load: record it and go on (skip, default) or stop (exit 2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.size=[32,256,256]")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.config import load_config
    from medvlm3d.data.preprocess import launched_ranks, run_preprocess

    cfg = load_config(args.config, args.overrides)
    with launched_ranks() as (rank, world, barrier):
        summary = run_preprocess(args.data, cfg, args.out, shard_size=args.shard_size, on_error=args.on_error,
                                 rank=rank, world=world, barrier=barrier, progress=rank == 0)
    print(f"preprocess rank {rank}/{world}: {summary.line()}", flush=True)
    if rank == 0:
        print(f"index: {os.path.join(args.out, 'index.json')}")
    return 0
