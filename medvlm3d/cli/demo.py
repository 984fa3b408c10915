"""`medvlm3d demo`: the embedded default end to end (phantoms, stages 0-2, eval table), over
`medvlm3d.train.demo.run_demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from medvlm3d.train.demo import STAGES, TEACHERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--n-train", type=int, default=1000, help="training studies (seed 0)")
    parser.add_argument("--n-test", type=int, default=200, help="held-out studies (seed 1)")
    parser.add_argument("--config", default="demo", help="model/data config (name or YAML)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every stage")
    parser.add_argument("--skip-to", choices=STAGES, default=None, help="resume the chain at this stage")
    parser.add_argument("--stop-after", choices=STAGES, default=None,
                        help="train up to this stage and stop (no evaluation), e.g. a stage-0 export to share")
    parser.add_argument("--meteor", action="store_true", help="also compute METEOR (starts java)")
    parser.add_argument("--unsupervised", action="store_true",
                        help="train without slice labels (config demo -> demo_unsupervised, slice loss off)")
    parser.add_argument("--teacher", choices=TEACHERS, default=None,
                        help="Vote-MI teacher to distil TG-IS from (off: no distillation); default: the config's")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of every stage (default: the config's)")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.train.demo import format_figures, run_demo

    result = run_demo(args.out, args.n_train, args.n_test, config=args.config, overrides=args.set,
                      skip_to=args.skip_to, meteor=args.meteor, unsupervised=args.unsupervised,
                      teacher=args.teacher, seed=args.seed, stop_after=args.stop_after)
    if "figures" not in result:
        print(f"stopped after {args.stop_after}: {result['checkpoint']}")
        return 0
    print(format_figures(result["figures"]))
    print(f"\ncheckpoint: {result['checkpoint']}\nreport: {Path(args.out) / 'report.md'}\n"
          f"total time: {result['seconds'] / 60:.1f} min")
    return 0
