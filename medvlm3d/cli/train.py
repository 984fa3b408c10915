"""`medvlm3d train` (= `accelerate launch -m medvlm3d.train`): one training stage, over
`medvlm3d.train.recipe.run_training`. TrainingDiverged -> exit 3 (see medvlm3d/cli/__init__.py)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="run config: a YAML path or a shipped name (default demo)")
    parser.add_argument("--stage", action="append", default=[],
                        help="stage YAML layered on top (path or shipped name, e.g. stage1_align); repeatable")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=50 train.output_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.config import load_config
    from medvlm3d.train.recipe import run_training

    cfg = load_config(args.config, args.overrides, layers=args.stage)
    path = run_training(cfg)
    print(f"model folder: {path}")
    return 0
