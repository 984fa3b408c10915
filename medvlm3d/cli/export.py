"""`medvlm3d export`: a standalone checkpoint (optionally with the LoRA merged), over
`medvlm3d.model.export.export`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder to export")
    p.add_argument("--out", required=True, help="new standalone checkpoint folder")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into llm/")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.model.export import export

    print(export(args.checkpoint, args.out, merge_lora=args.merge_lora))
    return 0
