"""What one training step (forward + backward, batch 1) of the real-size model costs on the CPU.

    python bench/bench_step.py                                   # real_0p5b, cases ckpt no-ckpt slice-full
    python bench/bench_step.py --cases ckpt --repeats 3 --threads 2
    python bench/bench_step.py --cases slice-full slice-full-ckpt

Each case runs in a fresh child process (so memory peaks do not mix): it loads the config with the
`stage2_finetune` layer (3D and slice encoders frozen, projectors and TG-IS full, LoRA on the LLM),
applies the case's overrides, builds the model from config (untrained weights; a tokenizer trained
on a tiny corpus, so the LM head is small), and runs `--warmup` untimed then `--repeats` timed steps
of `loss.backward()` on one sample: volume [1,1,D,H,W], slices [1,S,1,h,w], a prompt of
`num_visual_tokens` <image> tokens + `--text-len` text tokens (the text is the target). Cases:

    ckpt                  LLM gradient checkpointing on (the config's setting)
    no-ckpt               LLM gradient checkpointing off
    slice-full            ckpt + slice encoder trainable (model.trainable.slice_encoder=full)
    slice-full-ckpt       slice-full + slice-encoder checkpointing from the config
                          (model.slice_encoder.gradient_checkpointing=true: timm's set_grad_checkpointing)

Printed per case: trainable parameters, the components in which some module has checkpointing
switched on, median forward / backward / step seconds, peak RSS of the child
(getrusage ru_maxrss, build + all steps), and TG-IS: the forward + backward time of the TG-IS head
alone (random inputs of the real shapes, median of 5) with soft weighting and with top-k = 8
(`model.tgis.top_k`), and the top-k = 8 head's share of a step that used it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CORPUS = ["Write the findings of this scan.", "Findings: No focal lesion. The liver is normal."] * 20
CKPT_ON, CKPT_OFF = "model.llm.gradient_checkpointing=true", "model.llm.gradient_checkpointing=false"
SLICE_FULL, SLICE_CKPT = "model.trainable.slice_encoder=full", "model.slice_encoder.gradient_checkpointing=true"
CASES: dict[str, dict[str, Any]] = {
    "ckpt": dict(overrides=[CKPT_ON]),
    "no-ckpt": dict(overrides=[CKPT_OFF]),
    "slice-full": dict(overrides=[CKPT_ON, SLICE_FULL]),
    "slice-full-ckpt": dict(overrides=[CKPT_ON, SLICE_FULL, SLICE_CKPT]),
}
DEFAULT = ["ckpt", "no-ckpt", "slice-full"]
GIB = 2**30


# --------------------------------------------------------------------------------------------- child


def make_batch(model: Any, cfg: Any, text_len: int) -> dict[str, Any]:
    """One sample in the collator's layout (see data/collate.py), all slices real, no padding."""
    import torch

    g = torch.Generator().manual_seed(0)
    d, h, w = cfg.data.size
    sh, sw = cfg.data.slice_size
    s = d if cfg.data.num_slices <= 0 else cfg.data.num_slices
    nv, img = model.num_visual_tokens, model.image_token_id
    text = torch.randint(5, len(model.tokenizer), (1, text_len), generator=g)
    text[text == img] = 5
    ids = torch.cat([torch.full((1, nv), img), text], 1)
    labels = ids.clone()
    labels[:, :nv] = -100
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
        volumes=torch.rand(1, 1, d, h, w, generator=g), slices=torch.rand(1, s, 1, sh, sw, generator=g),
        slice_mask=torch.ones(1, s, dtype=torch.bool), slice_pos=((torch.arange(s) + 0.5) / s)[None],
        slice_plane=torch.zeros(1, s, dtype=torch.long), image_to_sample=torch.zeros(1, dtype=torch.long),
        question_ids=text[:, :16], question_mask=torch.ones(1, min(16, text_len), dtype=torch.long),
    )


def checkpointed(model: Any) -> list[str]:
    """Components holding a module with HF (`gradient_checkpointing`) or timm (`grad_checkpointing`) on."""
    names = []
    for name, comp in model.components().items():
        if comp is not None and any(getattr(m, "gradient_checkpointing", False) is True
                                    or getattr(m, "grad_checkpointing", False) is True for m in comp.modules()):
            names.append(name)
    return names


def tgis_seconds(model: Any, batch: dict[str, Any], top_k: int, repeats: int = 5) -> float:
    """Median forward + backward seconds of the TG-IS head alone (text feature included)."""
    import torch

    grid, s = model.projector3d.out_grid, batch["slices"].shape[1]
    x3d = torch.randn(1, model.projector3d.num_tokens, model.width, requires_grad=True)
    v = torch.randn(1, s, model.slice_encoder.num_tokens, model.width, requires_grad=True)
    model.tgis.top_k = top_k
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        text = model.text_features(batch["question_ids"], batch["question_mask"], None, batch["image_to_sample"])
        out = model.tgis(x3d, grid, v, text, batch["slice_pos"], batch["slice_plane"], batch["slice_mask"])
        torch.autograd.backward([out.z2d, out.logits], [torch.ones_like(out.z2d), torch.ones_like(out.logits)])
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from medvlm3d.config import load_config
    from medvlm3d.model.medvlm import build_model

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["config"], [f"model.llm.tokenizer={spec['tok']}", *spec["overrides"]],
                      layers=["stage2_finetune"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = make_batch(model, cfg, spec["text_len"])
    fwd, bwd = [], []
    for i in range(spec["warmup"] + spec["repeats"]):
        t0 = time.perf_counter()
        out = model(**batch)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        del out
        model.zero_grad(set_to_none=True)
        if i >= spec["warmup"]:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return {
        "fwd": statistics.median(fwd), "bwd": statistics.median(bwd),
        "step": statistics.median([f + b for f, b in zip(fwd, bwd)]),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "ckpt": checkpointed(model), "seq": int(batch["input_ids"].shape[1]),
        "tgis_soft": tgis_seconds(model, batch, 0), "tgis_k8": tgis_seconds(model, batch, 8),
    }


# -------------------------------------------------------------------------------------------- parent


def run_case(name: str, args: argparse.Namespace, tok: Path) -> dict[str, Any]:
    spec = dict(CASES[name], config=args.config, tok=str(tok), threads=args.threads, warmup=args.warmup,
                repeats=args.repeats, text_len=args.text_len)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="real_0p5b")
    ap.add_argument("--cases", nargs="+", default=DEFAULT, choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per case (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=256, help="text tokens after the visual tokens")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.text_len < 1:
        ap.error("--repeats, --threads and --text-len must be >= 1, --warmup >= 0")
    from medvlm3d.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tok"
        train_tokenizer(CORPUS, tok, vocab_size=300)
        print(f"{args.config} + stage2_finetune, CPU fp32, batch 1, {args.threads} threads, "
              f"{args.warmup} warm-up + median of {args.repeats} step(s); tiny vocab")
        print(f"{'case':<22}{'trainable':>11}{'seq':>6}{'fwd s':>8}{'bwd s':>8}{'step s':>8}{'peak RSS':>10}"
              f"{'TG-IS ms':>10}{'k=8 ms':>8}{'k=8 share':>10}  checkpointing in")
        for name in args.cases:
            r = run_case(name, args, tok)
            share = 100 * r["tgis_k8"] / (r["step"] - r["tgis_soft"] + r["tgis_k8"])
            print(f"{name:<22}{r['trainable'] / 1e6:>10.2f}M{r['seq']:>6}{r['fwd']:>8.1f}{r['bwd']:>8.1f}"
                  f"{r['step']:>8.1f}{r['peak_rss'] / GIB:>7.2f}GiB{1e3 * r['tgis_soft']:>10.1f}"
                  f"{1e3 * r['tgis_k8']:>8.1f}{share:>9.2f}%  {', '.join(r['ckpt']) or '-'}")
            sys.stdout.flush()
        print(f"model parameters: {r['total'] / 1e6:.1f}M")


if __name__ == "__main__":
    main()
