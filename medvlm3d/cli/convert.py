"""`medvlm3d convert SRC DST`: externally released pickle-based weights (a torch `.bin` / `.pt`,
read with weights_only) -> one `.safetensors` file, over `medvlm3d.model.convert`. A file that
weights_only refuses is one error line and exit 2.

`medvlm3d convert --extract-text-tower M3D_CLIP_WEIGHTS OUT_DIR [--tokenizer BERT_DIR]`: M3D-CLIP's
`language_encoder.*` (BERT-base) -> a plain HF BERT folder for `model.tgis.text_encoder`, over
`medvlm3d.model.clip_text`; a missing, extra or misshapen key is exit 2 listing the keys."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the released weights (.bin / .pt / .pth, or .safetensors)")
    parser.add_argument("dst", help="the .safetensors file to write (with --extract-text-tower: the folder)")
    parser.add_argument("--extract-text-tower", action="store_true",
                        help="write M3D-CLIP's BERT (language_encoder.*) as an HF folder at DST")
    parser.add_argument("--tokenizer", default=None,
                        help="with --extract-text-tower: a local bert-base-uncased folder whose tokenizer "
                             "files (and config.json) are copied in")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="with --extract-text-tower: attention heads when no config.json says (default width/64)")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.data.errors import ConfigError

    if not args.extract_text_tower:
        if args.tokenizer or args.num_heads:
            raise ConfigError("--tokenizer / --num-heads only go with --extract-text-tower")
        from medvlm3d.model.convert import convert_to_safetensors

        print(f"wrote {convert_to_safetensors(args.src, args.dst)}")
        return 0
    from medvlm3d.model.clip_text import extract_m3d_clip_text_tower

    out, notes = extract_m3d_clip_text_tower(args.src, args.dst, args.tokenizer, args.num_heads)
    print(f"wrote {out} (M3D-CLIP's text tower as a BERT folder; set model.tgis.text_encoder to it)")
    for note in notes:
        print(f"note: {note}")
    return 0
