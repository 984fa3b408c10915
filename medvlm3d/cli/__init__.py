"""`medvlm3d <verb>` (also `python -m medvlm3d <verb>`): the command line, a thin layer over the
library. Each verb is one module of this package, `medvlm3d/cli/<verb>.py`, with
`add_arguments(parser)` and `run(args) -> int`; this file only dispatches, importing the chosen
verb's module alone so that `medvlm3d <verb> --help` stays fast. The verb modules are the only
place in medvlm3d that print(); the library logs and raises.

Exit codes, one policy for every verb (the verbs do not catch exceptions themselves):

    0    ok
    2    bad input or config: a `DataError` or `ConfigError` (medvlm3d.data.errors, both
         ValueError subclasses) raised anywhere below the verb, e.g. a run folder locked by
         another run. One line `error: <message>` on stderr, no traceback (`--log-level DEBUG`
         logs it). argparse usage errors are 2 too, and so is a full disk (an OSError with errno
         ENOSPC/EDQUOT: "error: no space left on <path>").
    3    training diverged (`TrainingDiverged`, train/loop.py; a checkpoint was saved first)
    130  interrupted: Ctrl-C (KeyboardInterrupt), or SIGTERM/SIGINT during training
         (`TrainingStopped`, a KeyboardInterrupt: the step finished, a checkpoint was saved, and
         the message says how to continue)
    1    anything else is a bug: the traceback is printed on stderr.

A verb may also return 2 itself when its own check finds bad input (e.g. `validate` when the
dataset has bad records, after printing its report).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from types import ModuleType
from typing import Any, Callable, Sequence

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.io import NoSpaceLeft, is_no_space

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

# verb -> one-line help; the verb's code is the module medvlm3d.cli.<verb>
VERBS: dict[str, str] = {
    "synth": "make a phantom dataset (NIfTI volumes + JSONL manifest)",
    "validate": "check a dataset: read each record, load each volume once; exit 2 if bad",
    "train": "train one stage (also: accelerate launch -m medvlm3d.train ...)",
    "score": "score any model's predictions (preds.jsonl) against references under a named protocol",
    "eval": "evaluate a checkpoint: report | vqa_closed | vqa_open | classify (--protocol voteMI)",
    "preprocess": "read each study once into shards + index for data.preprocessed (accelerate launch: any ranks)",
    "encode": "run a checkpoint's frozen encoders once into feature shards for data.features (accelerate launch)",
    "infer": "answer a prompt about one scan; slice scores, Vote-MI picks, --plot/--json",
    "select": "Vote-MI slice selection alone: PNG slices + selection.json for any 2D VLM",
    "export": "write a standalone checkpoint (optionally with the LoRA merged)",
    "convert": "turn released pickle weights (.bin/.pt, read weights_only) into .safetensors, once; "
               "--extract-text-tower: M3D-CLIP's BERT -> an HF folder for TG-IS",
    "estimate": "memory planning: parameters, visual tokens, GPU memory per rank (ZeRO-2/3)",
    "demo": "the embedded default end to end: phantoms, stages 0-2, eval table",
}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verb_module(verb: str) -> ModuleType:
    """The module implementing `verb` (imported on demand)."""
    if verb not in VERBS:
        raise ConfigError(f"unknown verb {verb!r}; the verbs are {sorted(VERBS)}")
    return importlib.import_module(f"{__name__}.{verb}")


def verb_parser(verb: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of one verb (its own options plus --log-level)."""
    parser = argparse.ArgumentParser(prog=prog or f"medvlm3d {verb}", description=VERBS[verb])
    parser.add_argument("--log-level", default=None, help="logging level (default INFO)")
    verb_module(verb).add_arguments(parser)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def guarded(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call `run(args)` under the exit-code policy of the module docstring."""
    try:
        return int(run(args) or 0)
    except (DataError, ConfigError) as e:
        log.debug("bad input or config", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        print(f"interrupted: {_one_line(e)}" if str(e) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if not is_no_space(e):
            traceback.print_exc()
            return EXIT_BUG
        log.debug("disk full", exc_info=True)
        msg = str(e) if isinstance(e, NoSpaceLeft) else f"no space left on {e.filename or 'the output folder'}"
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        loop = sys.modules.get("medvlm3d.train.loop")  # only a verb that trained can have raised it
        if loop is not None and isinstance(e, loop.TrainingDiverged):
            print(f"error: training diverged: {_one_line(e)}", file=sys.stderr)
            return EXIT_DIVERGED
        traceback.print_exc()
        return EXIT_BUG


def run_verb(verb: str, argv: Sequence[str], prog: str | None = None, log_level: str | None = None) -> int:
    """Parse `argv` with `verb`'s parser, set up logging and run it under the exit-code policy.
    argparse errors (exit 2) and --help (exit 0) raise SystemExit as usual."""
    args = verb_parser(verb, prog).parse_args(list(argv))
    level = (args.log_level or log_level or "INFO").upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    return guarded(verb_module(verb).run, args)


def main(argv: Sequence[str] | None = None) -> int:
    """`medvlm3d [--log-level L] <verb> [args]` -> the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="medvlm3d", description="3D medical vision-language models",
                                     epilog="exit codes: 0 ok, 2 bad input or config, 3 training diverged, "
                                            "130 interrupted, 1 a bug (traceback)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb, help_text in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    # Parse the verb first, then let its own module define the rest of the arguments.
    known, rest = parser.parse_known_args(argv)
    if known.verb is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    return run_verb(known.verb, rest, log_level=known.log_level)


__all__: list[Any] = ["main", "run_verb", "guarded", "VERBS", "EXIT_OK", "EXIT_BUG", "EXIT_BAD_INPUT",
                      "EXIT_DIVERGED", "EXIT_INTERRUPTED"]
