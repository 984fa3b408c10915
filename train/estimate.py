"""Memory planning before launch: parameter counts, visual tokens and GPU memory per rank.

    medvlm3d estimate --config <yaml|name> [--stage NAME] [--gpus N] [--zero 2|3] [--batch B]
                      [--dtype bf16|fp32] [--vocab V] [key=value ...]   (the verb: medvlm3d/cli/estimate.py)

Python API:
    estimate_memory(cfg, gpus=1, zero=3, batch=None, dtype=None, vocab=32000, padded=True) -> dict
    build_meta_model(cfg, vocab=32000) -> (MedVLM on the meta device, how the LLM was built)
    format_report(result) -> str  (the table the verb prints)

The model is built on PyTorch's `meta` device, so even a 4B model costs no memory and builds in
about a second. The tokenizer comes from `model.llm.tokenizer` (or `model.llm.path`); without one
a `VocabStub` of `vocab` tokens stands in. With `model.llm.path` set, only its `config.json` is
read (`AutoConfig`, local files only) and the LM is built from it on meta, LoRA added as the
trainable policy says. Parameter counts are `model.trainable.count_parameters` of that model.

Memory model, per GPU (N = gpus, P = all parameters, P_t = trainable ones):

    bf16 (mixed precision, the ZeRO paper's accounting): 2 bytes per frozen parameter; per
        trainable one 2 (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master copy + Adam m and v)
        = 16 bytes. Rows: weights 2 P, gradients 2 P_t, optimizer states 12 P_t.
    fp32: weights 4 P, gradients 4 P_t, optimizer states (Adam m, v) 8 P_t.
    ZeRO-2 shards gradients and optimizer states over N (weights replicated); ZeRO-3 also shards
        the weights, and adds a gather buffer: the largest leaf module's weights plus DeepSpeed's
        prefetch bucket (5e7 parameters, as configs/deepspeed/zero3.json), in the weight dtype.
    Activations are per micro-batch (`batch` samples per GPU, one image per sample) and are not
        sharded by ZeRO.

The activation formulas (per transformer layer, per component) are in train/memory.py.

Not counted: the CUDA context and kernels (~0.5-1 GiB), allocator fragmentation, NCCL and ZeRO
reduce buckets, the data loader; stage0_clip's text tower and heads (small, always trained); the
transient forward working set of a frozen encoder (one layer at a time, before anything else is
stored, so it rarely sets the peak).

Checked by bench/bench_memory.py (fp32, CPU, one training step per case): the saved activations
match autograd's own saved tensors to < 0.1 %, and the step's peak RSS to within a few per cent
(tiny, mid-size ViT / CNN / frozen-LLM cases, and real_0p5b). The bf16 GPU side (RMSNorm's fp32
copies, flash-attention layouts) follows the same accounting but is not yet measured.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvlm3d.config import RunConfig
from medvlm3d.data.errors import ConfigError
from medvlm3d.train.memory import COMPONENTS, activation_bytes, num_slices

log = logging.getLogger(__name__)

GiB = float(2**30)
DEFAULT_VOCAB = 32000
ZERO3_PREFETCH = 50_000_000  # stage3_prefetch_bucket_size in configs/deepspeed/zero3.json
__all__ = ["COMPONENTS", "DEFAULT_VOCAB", "GiB", "VocabStub", "build_meta_model", "estimate_memory",
           "format_report", "num_slices"]


class VocabStub:
    """Stands in for a tokenizer when the config names none: `n` tokens, `<image>` the last one."""

    def __init__(self, n: int) -> None:
        if n < 8:
            raise ConfigError(f"vocab must be >= 8 tokens, got {n}")
        self.n = int(n)
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return self.n

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.n - 1


# --------------------------------------------------------------------------------------------
# building on meta


def _tokenizer_or_stub(cfg: RunConfig, vocab: int) -> tuple[Any, str]:
    from medvlm3d.model.llm import load_tokenizer

    llm = cfg.model.llm
    folder = llm.tokenizer or llm.path
    if not folder:
        return VocabStub(vocab), f"no tokenizer in the config: vocab {vocab} (--vocab)"
    if not Path(folder).expanduser().is_dir():
        raise ConfigError(f"model.llm.tokenizer / model.llm.path: folder {folder!r} does not exist")
    try:
        tok = load_tokenizer(llm)
    except (OSError, ValueError) as e:
        if llm.tokenizer:
            raise
        log.info("no tokenizer in %s (%s); counting with the LM config's vocabulary", folder, e)
        return None, "LM config vocabulary"
    return tok, f"tokenizer {folder}: vocab {len(tok)}"


def _llm_from_folder(cfg: RunConfig, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The LM of `model.llm.path` from its config.json alone, on the current (meta) device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from medvlm3d.model.llm import DTYPES, apply_lora
    from medvlm3d.model.llm_family import grow_embeddings

    lc = cfg.model.llm
    folder = Path(lc.path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.llm.path: {str(folder)!r} holds no config.json")
    hf_cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=lc.trust_remote_code)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[lc.dtype], trust_remote_code=lc.trust_remote_code)
    if tokenizer is None:
        tokenizer = VocabStub(int(model.get_input_embeddings().weight.shape[0]))
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        grow_embeddings(model, len(tokenizer))  # on meta: no mean resizing (it reads values)
    if cfg.model.trainable.llm == "lora":
        model = apply_lora(model, lc.lora)
    return model, tokenizer


def build_meta_model(cfg: RunConfig, vocab: int = DEFAULT_VOCAB) -> tuple[nn.Module, str]:
    """A MedVLM with every parameter on the meta device (no memory, ~1 s even for billions of
    parameters), and a line saying where the LM and its vocabulary came from."""
    from medvlm3d.model.medvlm import MedVLM

    tok, source = _tokenizer_or_stub(cfg, vocab)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        llm = None
        if cfg.model.llm.path:
            llm, tok = _llm_from_folder(cfg, tok)
            source = f"LM config {cfg.model.llm.path}/config.json; " + (source if "tokenizer" in source else
                                                                           f"vocab {len(tok)}")
        else:
            source = f"LM built from model.llm fields ({cfg.model.llm.arch}); {source}"
        tower = None
        if cfg.model.tgis.text_source == "hf" and not cfg.model.tgis.text_encoder:
            tower = _BertBaseTower()
            source += "; TG-IS text tower not given (tgis.text_encoder): sized as BERT-base (M3D-CLIP's), frozen"
        model = MedVLM(cfg, tok, llm=llm, load_external_weights=False, text_encoder=tower)
    return model, source


class _BertBaseTower(nn.Module):
    """BERT-base (bert-base-uncased's config, the text tower of M3D-CLIP that Med-2E3's TG-IS reads),
    frozen: the stand-in `estimate` sizes when `tgis.text_encoder` is not set (built on meta)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.encoder = BertModel(BertConfig())
        self.out_dim = int(self.encoder.config.hidden_size)
        self.requires_grad_(False)

# --------------------------------------------------------------------------------------------
# the estimate


def _dtype_of(cfg: RunConfig, dtype: str | None) -> str:
    if dtype is None:
        mixed = cfg.train.mixed_precision != "no" or cfg.model.llm.dtype != "float32"
        return "bf16" if mixed else "fp32"
    if dtype not in ("bf16", "fp32"):
        raise ConfigError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    return dtype


def _largest_leaf(model: nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def estimate_memory(
    cfg: RunConfig,
    gpus: int = 1,
    zero: int = 3,
    batch: int | None = None,
    dtype: str | None = None,
    vocab: int = DEFAULT_VOCAB,
    padded: bool = True,
) -> dict[str, Any]:
    """Parameter counts, visual tokens and per-GPU memory (GiB) for ZeRO-2 and ZeRO-3.

    Args:
        cfg: the run config (stage overlays already applied: the trainable policy matters).
        gpus: data-parallel ranks N (ZeRO shards over them).
        zero: the stage to headline (2 or 3); both are always computed.
        batch: micro-batch per GPU (default `train.batch_size`), one image per sample.
        dtype: "bf16" (mixed precision) or "fp32"; default from `train.mixed_precision` / `llm.dtype`.
        vocab: vocabulary when the config has no tokenizer.
        padded: batches carry a padding mask (the attention then keeps an s x s mask per layer).

    Returns a dict: params {component: {trainable, frozen, total}}, tokens {...},
    activations {no_ckpt|ckpt: {component: bytes}}, memory {2|3: {row: GiB}} and the arguments.
    """
    from medvlm3d.model.trainable import count_parameters

    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"estimate_memory expects a RunConfig (medvlm3d.load_config(...)), got {type(cfg).__name__}")
    if int(gpus) < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    if zero not in (2, 3):
        raise ConfigError(f"zero must be 2 or 3, got {zero}")
    batch = int(cfg.train.batch_size if batch is None else batch)
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    dtype = _dtype_of(cfg, dtype)
    e = 2 if dtype == "bf16" else 4

    model, source = build_meta_model(cfg, vocab)
    counts = count_parameters(model.components())
    params = {k: {"trainable": v["trainable"], "frozen": v["total"] - v["trainable"], "total": v["total"]}
              for k, v in counts.items()}
    slices = num_slices(cfg)
    t3 = model.projector3d.num_tokens if model.projector3d is not None else 0
    t2 = model.num_visual_tokens - (t3 if model.variant != "2d_only" else 0)
    n3 = math.prod(model.encoder3d.grid) if model.encoder3d is not None else 0
    nv = model.num_visual_tokens if cfg.train.stage != "stage0_text" else 0
    seq = nv + cfg.data.max_text_len
    tokens = {"3d": t3, "2d": t2, "per_image": model.num_visual_tokens, "encoder3d_grid_tokens": n3,
              "slices": slices, "slice_tokens": model.slice_encoder.num_tokens if model.slice_encoder else 0,
              "text": cfg.data.max_text_len, "sequence": seq}
    acts = activation_bytes(model, cfg, batch, e, seq, slices, padded)

    p_all, p_tr = params["total"]["total"], params["total"]["trainable"]
    w_b, g_b, o_b = (2, 2, 12) if dtype == "bf16" else (4, 4, 8)
    gather = w_b * (_largest_leaf(model) + ZERO3_PREFETCH) if gpus > 1 else 0
    memory: dict[int, dict[str, float]] = {}
    for stage in (2, 3):
        row = {
            "weights": w_b * p_all / (gpus if stage == 3 else 1) / GiB,
            "gradients": g_b * p_tr / gpus / GiB,
            "optimizer": o_b * p_tr / gpus / GiB,
            "zero3_gather": (gather if stage == 3 else 0) / GiB,
            "activations": acts["no_ckpt"]["total"] / GiB,
            "activations_ckpt": acts["ckpt"]["total"] / GiB,
        }
        static = row["weights"] + row["gradients"] + row["optimizer"] + row["zero3_gather"]
        row["total"] = static + row["activations"]
        row["total_ckpt"] = static + row["activations_ckpt"]
        memory[stage] = row
    return {
        "variant": model.variant, "stage": cfg.train.stage, "gpus": int(gpus), "zero": zero, "batch": batch,
        "dtype": dtype, "llm_source": source, "llm_checkpointing": cfg.model.llm.gradient_checkpointing,
        "params": params, "tokens": tokens, "activations": acts, "memory": memory,
    }


# --------------------------------------------------------------------------------------------
# the table


def format_report(r: dict[str, Any], title: str = "") -> str:
    """The human-readable table of an `estimate_memory` result."""
    lines = [f"medvlm3d estimate{': ' + title if title else ''} | variant {r['variant']}, stage {r['stage']}, "
             f"{r['dtype']}, batch {r['batch']} per GPU, {r['gpus']} GPU(s)", f"LLM: {r['llm_source']}", ""]
    lines.append(f"{'parameters':<16}{'trainable':>16}{'frozen':>16}{'total':>16}")
    for name, row in r["params"].items():
        lines.append(f"{name:<16}{row['trainable']:>16,}{row['frozen']:>16,}{row['total']:>16,}")
    tk = r["tokens"]
    lines += ["", f"visual tokens per image: 3D {tk['3d']:,} (encoder grid {tk['encoder3d_grid_tokens']:,}), "
              f"2D {tk['2d']:,} ({tk['slices']} slices x {tk['slice_tokens']} tokens each), "
              f"total {tk['per_image']:,}",
              f"sequence per sample: {tk['sequence'] - tk['text']:,} visual + {tk['text']:,} text "
              f"(data.max_text_len) = {tk['sequence']:,} tokens", ""]
    a, c = r["activations"]["no_ckpt"], r["activations"]["ckpt"]
    lines.append(f"{'activations GiB':<22}{'no ckpt':>10}{'LLM ckpt':>10}")
    for name in a:
        lines.append(f"{name:<22}{a[name] / GiB:>10.3f}{c[name] / GiB:>10.3f}")
    ck = "on" if r["llm_checkpointing"] else "off"
    lines += ["", f"memory per GPU, GiB (* = --zero {r['zero']}; the config has LLM gradient checkpointing {ck})",
              f"{'':<22}{'ZeRO-2' + '*' * (r['zero'] == 2):>10}{'ZeRO-3' + '*' * (r['zero'] == 3):>10}"]
    labels = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states",
              "zero3_gather": "ZeRO-3 gather", "activations": "activations", "activations_ckpt": "activations (ckpt)",
              "total": "total", "total_ckpt": "total (ckpt)"}
    for key, label in labels.items():
        lines.append(f"{label:<22}{r['memory'][2][key]:>10.2f}{r['memory'][3][key]:>10.2f}")
    lines.append("(+ CUDA context ~0.5-1 GiB and allocator fragmentation, not counted)")
    return "\n".join(lines) + "\n"
