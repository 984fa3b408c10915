"""Inference latency per study on CPU: load once, then read a NIfTI file and answer, per study.

    python bench/bench_infer.py --checkpoint runs/demo/stage2_finetune/final     # a trained checkpoint
    python bench/bench_infer.py --config real_0p5b                                # untrained, real size
    python bench/bench_infer.py --config demo --studies 5 --max-new-tokens 32

What one `medvlm3d infer` call does after the model is loaded, timed per study on phantom
volumes written as NIfTI files at `--native` size (default 120x256x256, a CT-like native grid):
the loader (MONAI orientation, HU window, resize to the checkpoint's own `data.size`, slice
views), then `model.generate` (encoders, TG-IS, greedy decoding of up to `--max-new-tokens`).
A `--config` run builds an untrained model (a tokenizer trained on the phantom corpus) and saves
it with `save_pretrained`, so loading is timed the same way as for a trained checkpoint.

Prints: load time, and per study the median of load-volume, generate and total seconds, with the
number of tokens in the answer text (re-encoded; untrained weights may stop early or run to the limit).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medvlm3d.config import load_config
from medvlm3d.data.readers import read_records
from medvlm3d.data.synthetic import corpus_texts, make_dataset
from medvlm3d.data.tokenizer import train_tokenizer
from medvlm3d.data.volume import load_study
from medvlm3d.model.checkpoint import load_pretrained
from medvlm3d.model.medvlm import build_model

PROMPT = "Is there a focal lesion in this scan? Choices: A. yes B. no C. cannot be determined D. only artifacts"


def untrained_checkpoint(config: str, work: Path, corpus: list[str]) -> Path:
    """Build `config` with random weights and save it as a checkpoint folder."""
    tok = work / "tokenizer"
    train_tokenizer(corpus, tok, vocab_size=1000)
    cfg = load_config(config, [f"model.llm.tokenizer={tok}"])
    model = build_model(cfg)
    out = work / "checkpoint"
    model.save_pretrained(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a trained checkpoint folder")
    src.add_argument("--config", help="a config name or YAML: time an untrained model of that size")
    ap.add_argument("--studies", type=int, default=3, help="studies timed (after one warm-up)")
    ap.add_argument("--native", type=int, nargs=3, default=(120, 256, 256), metavar=("D", "H", "W"))
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = make_dataset(work / "studies", args.studies + 1, seed=7, shape=tuple(args.native))
        records = [r for r in read_records(manifest) if r["task"] == "report"]
        ckpt = Path(args.checkpoint) if args.checkpoint else untrained_checkpoint(args.config, work, corpus_texts(records))
        t0 = time.perf_counter()
        model = load_pretrained(ckpt)
        load_s = time.perf_counter() - t0
        model.cfg.data.cache_dir = ""  # a training run's volume cache would hide the loader's cost
        n_params = sum(p.numel() for p in model.parameters())
        read, total, new_tokens = [], [], []
        for i, rec in enumerate(records[: args.studies + 1]):
            t0 = time.perf_counter()
            load_study(rec["image"], model.cfg.data, train=False)  # the loader alone
            t1 = time.perf_counter()
            out = model.generate(volume=rec["image"], prompt=PROMPT, max_new_tokens=args.max_new_tokens)
            t2 = time.perf_counter()  # generate() reads the file itself: a whole `infer` answer
            if i == 0:
                continue  # warm-up
            read.append(t1 - t0)
            total.append(t2 - t1)
            new_tokens.append(len(model.tokenizer(out.text, add_special_tokens=False)["input_ids"]))
    name = args.checkpoint or args.config
    print(f"{name}: {n_params / 1e6:.1f}M parameters, {model.num_visual_tokens} visual tokens, "
          f"data.size {tuple(model.cfg.data.size)}, {args.threads} threads, native volume {tuple(args.native)}")
    print(f"load_pretrained: {load_s:.2f} s")
    print(f"{'per study (median of ' + str(args.studies) + ')':<28}{'seconds':>10}")
    print(f"{'  read + preprocess':<28}{statistics.median(read):>10.3f}")
    print(f"{'  infer (read + generate)':<28}{statistics.median(total):>10.3f}")
    print(f"{'  answer tokens (re-encoded)':<28}{statistics.median(new_tokens):>10.0f}")


if __name__ == "__main__":
    main()
