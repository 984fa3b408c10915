"""`medvlm3d <verb>`: the command line. Each verb lives in its package as a pair of functions,
`add_arguments(parser)` and `run(args) -> int`; this file only dispatches to them, importing the
chosen verb's module alone so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# verb -> (module implementing add_arguments/run, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "synth": ("medvlm3d.data.synthetic", "make a phantom dataset (NIfTI volumes + JSONL manifest)"),
    "validate": ("medvlm3d.data.validate", "check a dataset: read each record, load each volume once; exit 1 if bad"),
    "train": ("medvlm3d.train.recipe", "train one stage (also: accelerate launch -m medvlm3d.train ...)"),
    "eval": ("medvlm3d.eval.runner", "evaluate a checkpoint: report | vqa_closed | vqa_open | classify (--protocol voteMI)"),
    "infer": ("medvlm3d.eval.infer", "answer a prompt about one scan; slice scores, Vote-MI picks, --plot/--json"),
    "select": ("medvlm3d.eval.infer", "Vote-MI slice selection alone: PNG slices + selection.json for any 2D VLM"),
    "export": ("medvlm3d.eval.infer", "write a standalone checkpoint (optionally with the LoRA merged)"),
    "estimate": ("medvlm3d.eval.estimate", "memory planning: parameters, visual tokens, GPU memory per rank (ZeRO-2/3)"),
    "demo": ("medvlm3d.train.demo", "the embedded default end to end: phantoms, stages 0-2, eval table"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="medvlm3d", description="3D medical vision-language models")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    # Parse the verb first, then let its own module define the rest of the arguments.
    known, rest = parser.parse_known_args(argv)
    if known.verb is None:
        parser.print_help()
        return 2
    module = importlib.import_module(VERBS[known.verb][0])
    verb_parser = argparse.ArgumentParser(prog=f"medvlm3d {known.verb}", description=VERBS[known.verb][1])
    module.add_arguments(verb_parser)
    args = verb_parser.parse_args(rest)
    logging.basicConfig(level=known.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
