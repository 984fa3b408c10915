"""Check `medvlm3d estimate` against measured memory: one training step per case, on the CPU, fp32.

    python bench/bench_memory.py                    # tiny + mid-size models (7 cases), ~5 min on 2 cores
    python bench/bench_memory.py --cases tiny mid
    python bench/bench_memory.py --cases real        # real_0p5b + stage2_finetune, batch 1 (~8 GB RSS)

Each case runs in a fresh subprocess (so peaks do not mix), with glibc's mmap threshold pinned at
64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the OS and RSS follows the live
tensors. The child first builds the model and runs one step at batch 1 (warm-up: imports, lazy
kernel and thread-pool set-up), frees it and trims the heap; then, from that RSS (rss0):

    weights      RSS growth while building the model (fp32, random init)
    saved acts   bytes of the tensors autograd saves in the forward (saved_tensors_hooks, storages
                 counted once, parameters and input batch left out): exactly what the formulas
                 model, minus the logits the caller holds
    fwd+bwd      peak RSS growth over forward + backward of step 1 (activations, backward working
                 set and the gradients; no optimizer states yet)
    optimizer    RSS growth over the first AdamW step (its m and v)
    step peak    peak RSS of step 2 (weights, optimizer states, activations, gradients) - rss0

Peak RSS is read from /proc/self/status VmHWM, reset between phases through
/proc/self/clear_refs (falls back to ru_maxrss). The estimate is `estimate_memory(cfg, gpus=1,
dtype="fp32", padded=True)` (ZeRO-2 row, 1 GPU: nothing sharded); the batches are right-padded.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any

MIB = 2**20
VOCAB = 32000
# The mid-size model: demo at 32x128x128 with a 4-layer 3D ViT (512 tokens, pooled to 128) in place
# of its 3D ResNet, a 4-layer ViT-Tiny-like slice encoder (64 tokens per slice, 32 slices) and a
# 8-layer 512-wide GQA LLaMA, 256 text tokens.
LLM_MID = [
    "model.llm.hidden_size=512", "model.llm.num_layers=8", "model.llm.num_heads=8", "model.llm.num_kv_heads=2",
    "model.llm.intermediate_size=1408",
]
MID = [
    "data.size=[32,128,128]", "data.slice_size=[128,128]", "data.max_text_len=256",
    "model.encoder3d.preset=vit3d_tiny", "model.projector.pool3d=[1,2,2]",
    "model.encoder3d.hidden_size=192", "model.encoder3d.num_layers=4",
    "model.encoder3d.num_heads=4", "model.encoder3d.mlp_dim=768",
    "model.slice_encoder.model_kwargs={patch_size: 16, depth: 4, embed_dim: 192, num_heads: 3}",
    *LLM_MID,
]
# The same LLM with CNN encoders (MONAI 3D ResNet, timm ResNet-18 slices) at 32x64x64.
MID_CNN = ["data.max_text_len=256", *LLM_MID,
    "model.encoder3d.preset=resnet3d_tiny", "model.projector.pool3d=[1,2,2]",
    "model.encoder3d.resnet_conv1_stride=1", "model.encoder3d.resnet_max_pool=true",  # MONAI's stem, as measured
    "model.slice_encoder.model_name=resnet18", "model.slice_encoder.model_kwargs={}",
]
CASES: dict[str, dict[str, Any]] = {
    "tiny": dict(config="tiny", overrides=[], batch=8, layers=[]),
    "tiny-v512": dict(config="tiny", overrides=[], batch=8, layers=[], vocab=512),
    "tiny-ckpt": dict(config="tiny", overrides=["model.llm.gradient_checkpointing=true"], batch=8, layers=[]),
    "mid": dict(config="demo", overrides=MID, batch=4, layers=[]),
    "mid-ckpt": dict(config="demo", overrides=MID + ["model.llm.gradient_checkpointing=true"], batch=4, layers=[]),
    "mid-stage1": dict(config="demo", overrides=MID, batch=4, layers=["stage1_align"]),
    "mid-cnn": dict(config="demo", overrides=MID_CNN, batch=4, layers=[]),
    # opt-in (--cases real): the real-size config, frozen encoders, LoRA, LLM checkpointing; ~8 GB, minutes
    "real": dict(config="real_0p5b", overrides=[], batch=1, layers=["stage2_finetune"]),
}
DEFAULT = [c for c in CASES if c != "real"]


# --------------------------------------------------------------------------------------------- child


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def make_batch(model: Any, cfg: Any, batch: int, vocab: int) -> dict[str, Any]:
    """A right-padded training batch of the collator's layout, one image per sample."""
    import torch

    from medvlm3d.train.memory import num_slices

    nv, text = model.num_visual_tokens, cfg.data.max_text_len
    d, h, w = cfg.data.size
    sh, sw = cfg.data.slice_size
    s = num_slices(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 2, (batch, nv + text), generator=g)
    ids[:, :nv] = model.image_token_id
    mask = torch.ones_like(ids)
    mask[0, -8:] = 0  # one padded sample
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :nv] = -100
    return dict(
        input_ids=ids, attention_mask=mask, labels=labels,
        volumes=torch.rand(batch, 1, d, h, w, generator=g), slices=torch.rand(batch, s, 1, sh, sw, generator=g),
        slice_mask=torch.ones(batch, s, dtype=torch.bool), slice_pos=((torch.arange(s) + 0.5) / s).repeat(batch, 1),
        slice_plane=torch.zeros(batch, s, dtype=torch.long), image_to_sample=torch.arange(batch),
        question_ids=torch.randint(3, vocab - 2, (batch, 16), generator=g),
        question_mask=torch.ones(batch, 16, dtype=torch.long),
    )


def _step(model: Any, batch: dict[str, Any], opt: Any, count: dict[str, int] | None = None) -> None:
    import torch

    if count is None:
        out = model(**batch)
    else:
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        skip |= {t.untyped_storage().data_ptr() for t in batch.values() if isinstance(t, torch.Tensor)}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        count["saved"] = sum(seen.values())
    out.loss.backward()
    del out
    if opt is not None:
        opt.step()


def child(spec: dict[str, Any]) -> dict[str, int]:
    import torch

    from medvlm3d.config import load_config
    from medvlm3d.train.estimate import VocabStub
    from medvlm3d.model.medvlm import MedVLM

    torch.manual_seed(0)
    cfg = load_config(spec["config"], spec["overrides"], layers=spec["layers"])
    tok = VocabStub(spec["vocab"])

    def build() -> Any:
        return MedVLM(cfg, tok).train()

    # warm-up at batch 1: imports, lazy kernels, thread pools
    model = build()
    warm = make_batch(model, cfg, 1, spec["vocab"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _step(model, warm, opt)
    del model, opt, warm
    _trim()

    batch = make_batch(build_shape_only(cfg, tok), cfg, spec["batch"], spec["vocab"])
    _trim()
    rss0 = _rss()
    model = build()
    _trim()
    rss1 = _rss()
    res = {"weights": rss1 - rss0}
    _reset_peak()
    count: dict[str, int] = {}
    _step(model, batch, None, count)
    res["saved"] = count["saved"]
    res["fwd_bwd"] = _peak() - rss1
    _trim()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    before = _rss()
    opt.step()
    _trim()
    res["optimizer"] = _rss() - before
    opt.zero_grad(set_to_none=True)
    _trim()
    _reset_peak()
    _step(model, batch, opt)
    res["step_peak"] = _peak() - rss0
    return res


def build_shape_only(cfg: Any, tok: Any) -> Any:
    """The model on the meta device (for token counts; costs no memory)."""
    import torch

    from medvlm3d.model.medvlm import MedVLM

    with torch.device("meta"):
        return MedVLM(cfg, tok)


# -------------------------------------------------------------------------------------------- parent


def run_case(name: str, vocab: int, threads: int) -> dict[str, int]:
    spec = dict({"vocab": vocab}, **CASES[name])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate_rows(name: str, vocab: int) -> dict[str, float]:
    from medvlm3d.config import load_config
    from medvlm3d.train.estimate import GiB, estimate_memory

    spec = CASES[name]
    vocab = spec.get("vocab", vocab)
    cfg = load_config(spec["config"], spec["overrides"], layers=spec["layers"])
    r = estimate_memory(cfg, gpus=1, zero=2, batch=spec["batch"], dtype="fp32", vocab=vocab, padded=True)
    m = r["memory"][2]
    ckpt = cfg.model.llm.gradient_checkpointing
    acts = r["activations"]["ckpt" if ckpt else "no_ckpt"]
    held_logits = spec["batch"] * r["tokens"]["sequence"] * vocab * 4
    act = m["activations_ckpt" if ckpt else "activations"] * GiB
    return {
        "weights": m["weights"] * GiB,
        "saved": acts["total"] - acts["backward"] - held_logits,
        "fwd_bwd": act + m["gradients"] * GiB,
        "optimizer": m["optimizer"] * GiB,
        "step_peak": (m["total_ckpt"] if ckpt else m["total"]) * GiB,
        "_params": r["params"]["total"]["total"], "_trainable": r["params"]["total"]["trainable"],
        "_seq": r["tokens"]["sequence"], "_batch": spec["batch"], "_vocab": vocab,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT, choices=list(CASES))
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = [("weights", "weights"), ("saved", "saved acts"), ("fwd_bwd", "fwd+bwd peak"),
            ("optimizer", "optimizer"), ("step_peak", "step peak")]
    print(f"fp32, CPU; MiB (measured RSS vs estimate_memory), error = (est - meas) / meas")
    print(f"{'case':<12}{'quantity':<14}{'measured':>11}{'estimate':>11}{'error':>9}")
    for name in args.cases:
        meas = run_case(name, args.vocab, args.threads)
        est = estimate_rows(name, args.vocab)
        print(f"{name:<12}params {est['_params']:,} (trainable {est['_trainable']:,}), batch {est['_batch']}, "
              f"sequence {est['_seq']}, vocab {est['_vocab']}")
        for key, label in rows:
            m, e = meas[key] / MIB, est[key] / MIB
            err = f"{(e - m) / m * 100:+.0f}%" if m > 0.5 else "n/a"
            print(f"{'':<12}{label:<14}{m:>11.1f}{e:>11.1f}{err:>9}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
