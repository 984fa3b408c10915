"""One-GPU benchmark of the real-size configs: bf16 train-step throughput and MFU, sdpa vs eager
attention, gradient checkpointing on vs off, peak memory, and inference latency per study.

    bash bench/gpu_bench.sh                       # real_0p5b then med2e3 on cuda, ~3-5 min on an H100/H200
    bash bench/gpu_bench.sh --dry-run             # the same code path on the CPU, tiny config, seconds
    python bench/gpu_bench.py --configs real_0p5b --batch 4 --steps 3 --cases sdpa-ckpt

Models are built from the shipped configs with random weights (MedVLM(cfg, VocabStub): no
tokenizer, no weights, nothing downloaded) in the `stage2_finetune` policy (med2e3: its own
`stages:` block, LLM + slice encoder trained in full; real_0p5b: LoRA LLM, frozen encoders).
med2e3's TG-IS text feature comes from the LLM embeddings (`model.tgis.text_source=llm`): its BERT
text tower needs a local folder. Four training cases per config, each a fresh model: attention
sdpa / eager (`model.llm.attn_implementation`) x gradient checkpointing on / off (LLM and slice
encoder). A step = forward (torch.autocast bf16 on cuda) + LM loss + backward + AdamW step
(the recipe's `param_groups`) on a synthetic batch resident on the device (bench_memory.make_batch:
B samples of num_visual_tokens + data.max_text_len tokens); `--warmup` untimed steps, then the
median of `--steps`, each between torch.cuda.synchronize calls. Peak memory:
torch.cuda.max_memory_allocated over the case (CPU: the process max RSS, monotonic). Inference
(first case's model): one study, visual tokens + `--prompt-len` text tokens, generate's batch path
(prepare_inputs + greedy llm.generate) held to exactly `--max-new-tokens`; median of 3 after 1.

An out-of-memory case is a row "OOM" and the run goes on. Rows print as they are measured; with
$OUT set, $OUT/gpu_bench.md and .json are rewritten after each row. Exit 2: no CUDA device
(without --dry-run / --device cpu) or medvlm3d not installed; 1: a case failed other than by OOM.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench_memory import make_batch  # bench/ is sys.path[0] when this file runs as a script

try:
    from medvlm3d.io import atomic_write_json, atomic_write_text
    from medvlm3d.train.estimate import VocabStub
except ImportError as e:
    print(f"gpu_bench: cannot import medvlm3d ({e}); install it: python -m pip install --no-deps -e .", file=sys.stderr)
    sys.exit(2)

STAGE = "stage2_finetune"
CASES = {"sdpa-ckpt": ("sdpa", True), "sdpa-no-ckpt": ("sdpa", False),
         "eager-ckpt": ("eager", True), "eager-no-ckpt": ("eager", False)}
BATCH = {"real_0p5b": 8, "med2e3": 4}  # per step; med2e3 no-ckpt at 8 would not fit 139 GiB
VOCAB = {"qwen2": 151936, "phi3": 32064, "llama": 32000}  # the real tokenizers' sizes (Qwen2, Phi-3)
EXTRA = {"med2e3": ["model.tgis.text_source=llm"]}  # its BERT text tower needs a local folder
PEAK_TFLOPS = 989.0  # H100/H200 SXM bf16 dense
GIB = 2**30
FORMULA = ("model FLOPs/step = sum over LLM, 3D encoder, slice encoder of kw*N*T + ka*4*L*d*n*T "
           "(T tokens in the step, n tokens per sequence, N weight parameters (LLM: without the input "
           "embedding table), L layers, d width); kw = 6 trained, 4 frozen but passing gradients (the LoRA "
           "LLM), 2 frozen encoder (forward only); ka = 3 with backward, 1 forward only. Projectors and "
           "TG-IS are left out. MFU = FLOPs/step / step time / peak")


@dataclass
class Row:
    config: str
    case: str
    attn: str
    ckpt: str
    batch: int
    seq: int
    status: str = "ok"
    time_s: float = math.nan  # train: median step; infer: median latency per study
    samples_s: float = math.nan
    tokens_s: float = math.nan  # train: tokens in the step; infer: new tokens
    tflop_step: float = math.nan
    tflops: float = math.nan
    mfu_pct: float = math.nan
    peak_gib: float = math.nan  # cuda: max_memory_allocated; cpu: max RSS


COLUMNS = [("config", "config"), ("case", "case"), ("attn", "attn"), ("ckpt", "ckpt"), ("batch", "batch"),
           ("seq", "seq"), ("time_s", "s/step (s/study)"), ("samples_s", "samples/s"), ("tokens_s", "tokens/s"),
           ("tflop_step", "TFLOP/step"), ("tflops", "TFLOP/s"), ("mfu_pct", "MFU %"), ("peak_gib", "peak GiB"),
           ("status", "status")]


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table_head() -> str:
    return "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_line(r: Row) -> str:
    return "| " + " | ".join(fmt(getattr(r, k)) for k, _ in COLUMNS) + " |"


# ------------------------------------------------------------------------------------- the model


class DecodeStub(VocabStub):
    """VocabStub + the batch_decode that generate_batch calls; remembers the generated length."""

    new_tokens = 0

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        self.new_tokens = int(ids.shape[1])  # inputs_embeds only: HF returns the new tokens alone
        return [""] * int(ids.shape[0])


def case_config(name: str, attn: str, ckpt: bool, extra: list[str]) -> Any:
    from medvlm3d.config import load_config

    flag = "true" if ckpt else "false"
    return load_config(name, [*EXTRA.get(name, []), f"model.llm.attn_implementation={attn}",
                              f"model.llm.gradient_checkpointing={flag}",
                              f"model.slice_encoder.gradient_checkpointing={flag}", *extra], layers=[STAGE])


def build(cfg: Any, device: torch.device, vocab: int) -> Any:
    """The MedVLM of `cfg` with random weights, initialised on `device` directly."""
    from medvlm3d.model.medvlm import MedVLM

    torch.manual_seed(0)
    with torch.device(device):
        model = MedVLM(cfg, DecodeStub(vocab), load_external_weights=False)
    return model.to(device).train()


def _vit(module: Any, cfg3d: Any = None) -> tuple[int, int, int] | None:
    """(tokens per sequence n, layers L, width d) of a ViT encoder; None for anything else."""
    if cfg3d is not None:
        return (math.prod(module.grid), cfg3d.num_layers, cfg3d.hidden_size) if cfg3d.arch == "vit" else None
    bb = getattr(module, "backbone", None)
    if bb is None or not hasattr(bb, "blocks") or not hasattr(bb, "patch_embed"):
        return None
    n = int(bb.patch_embed.num_patches) + int(getattr(bb, "num_prefix_tokens", 0))
    return n, len(bb.blocks), int(bb.embed_dim)


def step_flops(model: Any, cfg: Any, batch: int, seq: int, n_slices: int) -> float:
    """Model FLOPs of one training step (FORMULA)."""
    from medvlm3d.model.llm import unwrap_base

    def trained(m: Any) -> bool:
        return any(p.requires_grad for p in m.parameters())

    base = unwrap_base(model.llm)
    n_llm = sum(p.numel() for p in model.llm.parameters()) - base.get_input_embeddings().weight.numel()
    kw = 6 if trained(base) and cfg.model.trainable.llm == "full" else 4
    tokens = batch * seq
    total = kw * n_llm * tokens + 3 * 4 * base.config.num_hidden_layers * base.config.hidden_size * seq * tokens
    encoders = [(model.encoder3d, _vit(model.encoder3d, cfg.model.encoder3d) if model.encoder3d else None, 1),
                (model.slice_encoder, _vit(model.slice_encoder) if model.slice_encoder else None, n_slices)]
    for module, shape, seqs in encoders:
        if module is None or shape is None:
            continue
        n, layers, width = shape
        t = batch * seqs * n
        grad = trained(module)
        total += (6 if grad else 2) * sum(p.numel() for p in module.parameters()) * t
        total += (3 if grad else 1) * 4 * layers * width * n * t
    return float(total)


# ---------------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def train_case(row: Row, model: Any, cfg: Any, vocab: int, args: argparse.Namespace, device: torch.device) -> None:
    """Fill `row` with the timed training steps of `model` (freshly built, peak stats just reset)."""
    from medvlm3d.train.memory import num_slices
    from medvlm3d.train.recipe import param_groups

    batch = {k: v.to(device) for k, v in make_batch(model, cfg, row.batch, vocab).items()}
    row.seq = int(batch["input_ids"].shape[1])
    opt = torch.optim.AdamW(param_groups(model, model, cfg), lr=cfg.train.lr)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, args.bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"non-finite loss {float(loss.detach())} at step {i}")
    step = statistics.median(times)
    flops = step_flops(model, cfg, row.batch, row.seq, num_slices(cfg))
    row.time_s, row.samples_s, row.tokens_s = step, row.batch / step, row.batch * row.seq / step
    row.tflop_step, row.tflops = flops / 1e12, flops / step / 1e12
    row.mfu_pct = 100 * flops / step / (args.peak_tflops * 1e12)
    row.peak_gib = peak_gib(device)


def infer_case(row: Row, model: Any, cfg: Any, vocab: int, args: argparse.Namespace, device: torch.device) -> None:
    """Fill `row` with the latency of one study through generate's batch path (greedy)."""
    from medvlm3d.data.batch import Batch
    from medvlm3d.model.generation import generate_batch
    from medvlm3d.model.llm import unwrap_base

    short = copy.deepcopy(cfg)
    short.data.max_text_len = args.prompt_len
    fields = make_batch(model, short, 1, vocab)
    fields["attention_mask"] = torch.ones_like(fields["attention_mask"])  # one study: no padding
    fields.pop("labels")
    fields["slice_index"] = torch.arange(fields["slices"].shape[1])[None]
    batch = Batch.from_dict(fields).to(device)
    row.seq = int(batch.input_ids.shape[1])
    gen = unwrap_base(model.llm).generation_config
    gen.min_new_tokens = args.max_new_tokens  # random weights would stop at a random EOS
    gen.use_cache = True  # gradient checkpointing switched the model config's cache off
    times = []
    for i in range(4):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, args.bf16):
            generate_batch(model, batch, max_new_tokens=args.max_new_tokens, do_sample=False)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    new = model.tokenizer.new_tokens
    if new != args.max_new_tokens:
        raise RuntimeError(f"generate made {new} new tokens, expected {args.max_new_tokens}")
    lat = statistics.median(times)
    row.time_s, row.samples_s, row.tokens_s, row.peak_gib = lat, 1 / lat, new / lat, peak_gib(device)
    row.status = f"ok ({new} new tokens)"


# ------------------------------------------------------------------------------------- the run


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def attempt(row: Row, fn: Any) -> bool:
    """Run fn(); True when it returned. An out-of-memory error marks `row` OOM, any other error
    marks it "error: ..." (traceback on stderr): one failed case does not end the benchmark."""
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001
        why = " ".join(str(e).replace("|", "/").split())[:80]
        row.status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {why}"
        if not is_oom(e):
            traceback.print_exc()
        return False


def run_case(name: str, case: str, with_infer: bool, args: argparse.Namespace, device: torch.device,
             emit: Any) -> None:
    """Build the case's model; on the first case also time inference; then the training steps."""
    attn, ckpt = CASES[case]
    row = Row(name, case, attn, "on" if ckpt else "off", args.batch or BATCH.get(name, 2), 0)
    state: dict[str, Any] = {}

    def build_it() -> None:
        cfg = case_config(name, attn, ckpt, args.override)
        vocab = args.vocab or VOCAB.get(cfg.model.llm.arch, 32000)
        reset_peak(device)
        state.update(cfg=cfg, vocab=vocab, model=build(cfg, device, vocab))

    if attempt(row, build_it):
        cfg, vocab = state["cfg"], state["vocab"]
        if with_infer:
            irow = Row(name, "infer", attn, "-", 1, 0)
            attempt(irow, lambda: infer_case(irow, state["model"], cfg, vocab, args, device))
            emit(irow)
            reset_peak(device)
        attempt(row, lambda: train_case(row, state["model"], cfg, vocab, args, device))
    state.clear()
    reset_peak(device)
    emit(row)


def header(args: argparse.Namespace, device: torch.device) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    prec = "bf16 autocast" if args.bf16 else "fp32"
    return (f"# GPU benchmark: {', '.join(args.configs)}\n\n"
            f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}; {prec}; "
            f"stage {STAGE}, random weights; train: {args.warmup} warm-up + median of {args.steps} steps; "
            f"infer: batch 1, prompt = visual tokens + {args.prompt_len} text tokens, greedy, "
            f"{args.max_new_tokens} new tokens, median of 3\n")


def footer(args: argparse.Namespace) -> str:
    return (f"\n{FORMULA} = {args.peak_tflops:g} TFLOP/s (H100/H200 SXM bf16 dense; --peak-tflops).\n"
            "Train rows: s/step = forward + backward + AdamW step, batch resident on the device (no data "
            "loading); tokens/s = batch x seq / step. Infer rows: s/study = prepare_inputs (encoders, TG-IS) "
            "+ greedy generate; tokens/s = new tokens / s. peak GiB: torch.cuda.max_memory_allocated per "
            "case (CPU: process max RSS). Inference runs on the first case's model before its training. "
            f"LM vocabulary by arch {VOCAB} (--vocab); config overrides {EXTRA}.\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 1 step: checks the code path")
    ap.add_argument("--configs", nargs="+", help="shipped config names (default: real_0p5b med2e3)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--batch", type=int, default=0, help=f"samples per step (0: {BATCH}, else 2)")
    ap.add_argument("--steps", type=int, help="timed steps per case (default 5; dry run 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 2; dry run 1)")
    ap.add_argument("--max-new-tokens", type=int, help="generated tokens per study (default 64; 0: no infer row)")
    ap.add_argument("--prompt-len", type=int, help="text tokens of the inference prompt (default 32)")
    ap.add_argument("--vocab", type=int, default=0, help=f"LM vocabulary (0: {VOCAB} by llm.arch)")
    ap.add_argument("--device", default=None, help="cuda (default), cuda:N, or cpu")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on cuda")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--budget-s", type=float, default=400.0, help="cases not started by then are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gpu_bench.md/.json ($OUT)")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, every case")
    args = ap.parse_args(argv)
    dry = args.dry_run
    defaults = dict(configs=["tiny"] if dry else ["real_0p5b", "med2e3"], steps=1 if dry else 5,
                    warmup=1 if dry else 2, max_new_tokens=4 if dry else 64, prompt_len=8 if dry else 32,
                    device="cpu" if dry else "cuda")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.max_new_tokens < 0 or args.prompt_len < 1 or args.batch < 0:
        ap.error("--steps and --prompt-len must be >= 1; --warmup, --max-new-tokens, --batch >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False). Run on a GPU machine, "
              "or use --dry-run (CPU, tiny config) / --device cpu.", file=sys.stderr)
        return 2
    args.bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    out = Path(args.out) if args.out else None
    rows: list[Row] = []
    head = header(args, device)
    print(head + "\n" + table_head(), flush=True)

    def emit(row: Row) -> None:
        rows.append(row)
        print(table_line(row), flush=True)
        if out is not None:
            body = "\n".join([table_head(), *map(table_line, rows)])
            atomic_write_text(out / "gpu_bench.md", f"{head}\n{body}\n{footer(args)}")
            atomic_write_json(out / "gpu_bench.json", {"header": head.strip(), "formula": FORMULA,
                                                       "peak_tflops": args.peak_tflops,
                                                       "rows": [asdict(r) for r in rows]})

    start = time.monotonic()
    for name in args.configs:
        for i, case in enumerate(args.cases):
            if time.monotonic() - start > args.budget_s:
                attn, ckpt = CASES[case]
                emit(Row(name, case, attn, "on" if ckpt else "off", 0, 0, status="skipped (time budget)"))
                continue
            run_case(name, case, i == 0 and args.max_new_tokens > 0, args, device, emit)
    print(footer(args), flush=True)
    print(f"total {time.monotonic() - start:.0f} s" + (f"; table in {out / 'gpu_bench.md'}" if out else ""))
    return 1 if any(r.status.startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
