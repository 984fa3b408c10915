"""`medvlm3d infer`: answer a prompt about one scan, over `medvlm3d.eval.infer.infer`."""

from __future__ import annotations

import argparse
import logging

# eval.infer.TASKS, spelled here so that `--help` does not import torch (tests/test_cli.py checks they agree)
TASKS = ("vqa", "report")

log = logging.getLogger(__name__)


def add_device_map_argument(p: argparse.ArgumentParser) -> None:
    """`--device-map`, shared by `medvlm3d infer` and `medvlm3d eval`."""
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="for LLMs too large for one GPU, e.g. --device-map auto: the LLM's layers are spread over "
                        "the GPUs (then the CPU) by accelerate, bf16, and the other modules follow its input "
                        "embeddings; also balanced | balanced_low_0 | sequential | a device | a JSON object "
                        "{module name: device}. Overrides --device. A LoRA adapter needs the LLM on GPUs only (export "
                        "--merge-lora first otherwise). Default: none (whole model on --device)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (written by save_pretrained / export)")
    p.add_argument("--volume", required=True, help="a .nii/.nii.gz file, a DICOM series folder or file, or an .npy")
    p.add_argument("--prompt", default=None, help="the question or instruction")
    p.add_argument("--task", choices=TASKS, default="vqa", help="report: no prompt needed (default vqa)")
    p.add_argument("--plot", default=None, help="write the slice-score picture here (PNG)")
    p.add_argument("--json", default=None, help="write the answer, slice scores and Vote-MI picks here")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (bf16 on a GPU)")
    add_device_map_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's eval.max_new_tokens")
    p.add_argument("--top-k", type=int, default=6, help="slices shown in the plot's strip (default 6)")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.eval.infer import infer, parse_device_map

    out = infer(args.checkpoint, args.volume, args.prompt, task=args.task, device=args.device,
                max_new_tokens=args.max_new_tokens, plot=args.plot, json_path=args.json, top_k=args.top_k,
                device_map=parse_device_map(args.device_map))
    top = sorted(out["slice_scores"], key=lambda e: -e["score"])[:3]
    if top:
        log.info("top slices: %s", ", ".join(f"{e['plane']} {e['index']} ({e['score']:.3f})" for e in top))
    print(out["answer"])
    return 0
