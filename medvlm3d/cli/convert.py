"""`medvlm3d convert SRC DST`: externally released pickle-based weights (a torch `.bin` / `.pt`,
read with weights_only) -> one `.safetensors` file, over `medvlm3d.model.convert`. A file that
weights_only refuses is one error line and exit 2."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the released weights (.bin / .pt / .pth, or .safetensors)")
    parser.add_argument("dst", help="the .safetensors file to write")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.model.convert import convert_to_safetensors

    out = convert_to_safetensors(args.src, args.dst)
    print(f"wrote {out}")
    return 0
