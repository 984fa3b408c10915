"""`medvlm3d estimate`: parameters, visual tokens and GPU memory per rank before launch, over
`medvlm3d.train.estimate.estimate_memory` / `format_report`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="run config: a YAML path or a shipped name (default demo)")
    parser.add_argument("--stage", action="append", default=[],
                        help="stage YAML layered on top (e.g. stage2_finetune); repeatable")
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    parser.add_argument("--zero", type=int, default=3, help="ZeRO stage to headline: 2 or 3 (both are printed)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch per GPU (default train.batch_size)")
    parser.add_argument("--dtype", default=None, help="bf16 (mixed precision) | fp32 (default: from the config)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary when the config names no tokenizer (default 32000)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.max_text_len=1024")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.config import load_config
    from medvlm3d.data.errors import ConfigError
    from medvlm3d.train.estimate import DEFAULT_VOCAB, estimate_memory, format_report

    vocab = DEFAULT_VOCAB if args.vocab is None else args.vocab
    checks = [(args.gpus >= 1, f"--gpus must be >= 1, got {args.gpus}"),
              (args.zero in (2, 3), f"--zero must be 2 or 3, got {args.zero}"),
              (args.batch is None or args.batch >= 1, f"--batch must be >= 1, got {args.batch}"),
              (args.dtype in (None, "bf16", "fp32"), f"--dtype must be bf16 or fp32, got {args.dtype!r}"),
              (vocab >= 8, f"--vocab must be >= 8, got {vocab}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    cfg = load_config(args.config, args.overrides, layers=args.stage)
    result = estimate_memory(cfg, args.gpus, args.zero, args.batch, args.dtype, vocab)
    print(format_report(result, str(args.config)), end="")
    return 0
