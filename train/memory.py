"""Activation memory of one training step, per component: the formulas behind `estimate_memory`
(train/estimate.py).

    activation_bytes(model, cfg, batch, e, seq, slices, masked) -> {no_ckpt|ckpt: {component: bytes}}
    layer_bytes(LayerShape, e, Trains) -> bytes of one transformer layer over s tokens, per sample
    num_slices(cfg) -> S per image as the data pipeline makes it

Activations, in bytes, with e = 2 (bf16) or 4 (fp32) bytes per element. A component keeps
activations only when autograd needs them: a trainable component, or one downstream of a
trainable one. The encoders come first in the graph, so a frozen encoder keeps nothing.
Transformer layer over s tokens (width h, heads a, q/kv widths q, kv, MLP width f), per sample:

    norms            2 x s h e   (LayerNorm keeps its input; HF RMSNorm keeps an fp32 copy of its
                                  input: 4 s h, plus s h e for its own weight when that trains)
    linear inputs    s h e (q/k/v), s h e (MLP in), s f e (MLP out), s q e (o, eager only): each
                     only when that linear's weight (or its LoRA adapter) trains
    attention        fused (SDPA / flash): q, k, v, output: s (2q + 2kv) e + softmax stats 4 s a
                     (the output, laid out [s, a, d], is also the o input: a view, no copy);
                     a padded batch adds the mask, s^2 e (HF then repeats k/v to q width);
                     eager (MONAI ViT): q, k, v + the softmax output a s^2 e
    MLP              GELU: its input s f e; gated (SiLU): gate, SiLU output, up: 3 s f e
    LoRA             per adapted linear: s r e (the input of lora_B); with dropout > 0 also the
                     dropped input and its mask, s in (e + 1)

For a GPT layer (LayerNorm, GELU, f = 4h, eager attention) at 16-bit this gives 32 s h + 2 a s^2
bytes: the 34 s h + 5 a s^2 of Korthikanti et al. 2022 ("Reducing activation recomputation in
large transformer models") without the dropout masks and copies (2 s h + 3 a s^2), which these
models, run with dropout 0, never make. The 3D ViT runs it over its N3 tokens (+ cls), the
ViT slice encoder over B*S slices of its patch tokens, the inter-slice transformer over S.
Other (CNN) backbones: no closed formula; the tensors autograd saves in one forward of the
fp32 meta-device module (`meta_saved_bytes`, saved_tensors_hooks), scaled by e / 4.
Projector MLPs keep their linear inputs (if trained) and GELU inputs; TG-IS keeps v [S, T, Dl]
for the weighted sum.
LLM head: the logits (held by the caller) and the log-softmax output of the loss, s V (e + 4);
backward working set: the two fp32 gradients of the log-softmax, 8 s V.
Gradient checkpointing (`model.llm.gradient_checkpointing`, the LLM's decoder layers only, as
the package does it): each layer keeps its input, s h e, and backward recomputes one layer at a
time, so the working set becomes max(logits gradients, one layer's full activations).

"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medvlm3d.config import RunConfig

COMPONENTS = ("encoder3d", "slice_encoder", "inter_slice", "tgis", "projector", "llm")
ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "proj"}
MLP_OUT = {"down_proj", "fc2", "w2", "c_proj", "linear2", "dense_4h_to_h"}


# --------------------------------------------------------------------------------------------
# activation formulas


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer over `seq` tokens (widths in elements)."""

    seq: int
    hidden: int
    heads: int
    q_dim: int
    kv_dim: int
    ffn: int
    gated: bool = False
    fused: bool = True
    rms_norm: bool = False
    masked: bool = False
    lora: tuple[tuple[int, int, bool], ...] = ()  # (in_features, r, dropout > 0) per trainable adapter


@dataclass(frozen=True)
class Trains:
    """Which weights of a layer train (their inputs are kept for the weight gradient)."""

    norms: bool = True
    attn_in: bool = True
    attn_out: bool = True
    mlp_in: bool = True
    mlp_out: bool = True


ALL = Trains()
NONE = Trains(False, False, False, False, False)


def norm_bytes(seq: int, hidden: int, e: int, rms: bool, trains: bool) -> int:
    if rms:  # HF RMSNorm: fp32 copy of its input (+ the normalised input for its weight's gradient)
        return seq * hidden * 4 + (seq * hidden * e if trains else 0)
    return seq * hidden * e + seq * 8  # LayerNorm: input + mean/rstd


def layer_bytes(sh: LayerShape, e: int, tr: Trains = ALL) -> int:
    """Activation bytes one sample keeps in one transformer layer (see the module docstring)."""
    s, h = sh.seq, sh.hidden
    total = 2 * norm_bytes(s, h, e, sh.rms_norm, tr.norms)
    total += s * h * e * tr.attn_in + s * h * e * tr.mlp_in + s * sh.ffn * e * tr.mlp_out
    if sh.fused:  # SDPA keeps q, k, v and its output, which is also (a view) the o input
        kv = sh.q_dim if sh.masked else sh.kv_dim  # HF repeats k/v to all heads when a mask is given
        total += s * (2 * sh.q_dim + 2 * kv) * e + s * sh.heads * 4
        total += s * s * e if sh.masked else 0
    else:  # eager: q, k, v, the softmax output; the o input is a separate copy
        total += s * (sh.q_dim + 2 * sh.kv_dim) * e + sh.heads * s * s * e + s * sh.q_dim * e * tr.attn_out
    total += s * sh.ffn * e * (3 if sh.gated else 1)
    for in_features, r, dropout in sh.lora:
        total += s * r * e + (s * in_features * (e + 1) if dropout else 0)
    return total


def checkpointed_layer_bytes(sh: LayerShape, e: int) -> int:
    """A checkpointed layer keeps only its input."""
    return sh.seq * sh.hidden * e


def mlp_bytes(n: int, mlp: nn.Module, e: int, trains: bool) -> int:
    """`build_mlp` Sequential over n tokens: linear inputs (if trained) + GELU inputs."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    total = sum(n * m.in_features * e * trains for m in linears)
    return total + sum(n * m.out_features * e for m in linears[:-1])


def meta_saved_bytes(fn: Any, example: tuple[int, ...]) -> int:
    """Bytes of the tensors autograd saves when `fn` (a module on the meta device, or one of its
    methods) runs on an input of shape `example`; storages counted once, parameters and the input
    left out. Costs no memory: every tensor is on the meta device. Per example: the difference of
    a batch of 2 and a batch of 1 (so per-channel batch-norm statistics do not scale with it)."""
    one = _meta_saved(fn, (1, *example))
    return _meta_saved(fn, (2, *example)) - one


def _meta_saved(fn: Any, example: tuple[int, ...]) -> int:
    module = getattr(fn, "__self__", fn)
    skip = {p.untyped_storage()._cdata for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in skip:
            seen[st._cdata] = st.nbytes()
        return t

    x = torch.empty(*example, device="meta")
    skip.add(x.untyped_storage()._cdata)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def _vit_shape(blocks: Any, seq: int) -> LayerShape | None:
    """LayerShape of a MONAI / timm ViT block list, or None when it is not one."""
    if not blocks:
        return None
    b = blocks[0]
    attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
    fc1 = getattr(mlp, "linear1", None) or getattr(mlp, "fc1", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(qkv, nn.Linear):
        return None
    h = qkv.in_features
    fused = bool(getattr(attn, "fused_attn", False) or getattr(attn, "use_flash_attention", False))
    return LayerShape(seq=seq, hidden=h, heads=int(attn.num_heads), q_dim=qkv.out_features // 3,
                      kv_dim=qkv.out_features // 3, ffn=fc1.out_features, fused=fused)


def encoder3d_bytes(enc: nn.Module, e: int) -> int:
    """Per image, a trained 3D encoder."""
    d, h, w = enc.grid
    net = getattr(enc, "net", None)
    blocks = getattr(net, "blocks", None)
    n = d * h * w + (1 if hasattr(net, "cls_token") else 0)
    sh = _vit_shape(blocks, n)
    if sh is None:
        return meta_saved_bytes(enc, (1, *enc.img_size)) * e // 4
    return len(blocks) * layer_bytes(sh, e) + norm_bytes(n, sh.hidden, e, False, True)


def slice_encoder_bytes(enc: nn.Module, e: int) -> int:
    """Per slice, a trained slice encoder (timm ViT formula, else the CNN leaf sum)."""
    bb = enc.backbone
    h, w = enc.img_size
    pe = getattr(bb, "patch_embed", None)
    n = int(getattr(pe, "num_patches", 0) or 0) + int(getattr(bb, "num_prefix_tokens", 0))
    sh = _vit_shape(getattr(bb, "blocks", None), n) if n else None
    if sh is None:
        return meta_saved_bytes(enc.encode, (1, h, w)) * e // 4
    stem = enc.in_chans * h * w * e
    return stem + len(bb.blocks) * layer_bytes(sh, e) + 2 * norm_bytes(n, sh.hidden, e, False, True)


# --------------------------------------------------------------------------------------------
# the LLM


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _decoder_layers(base: nn.Module, n_layers: int) -> nn.ModuleList:
    for _, m in base.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers:
            return m
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(base).__name__}")


def llm_layer(llm: nn.Module, seq: int, masked: bool) -> tuple[LayerShape, Trains, int]:
    """(shape, which weights train, number of layers) of the LM's decoder layers."""
    from medvlm3d.model.llm import unwrap_base
    from medvlm3d.model.trainable import lora_layers

    base = unwrap_base(llm)
    c = base.config
    h, heads = int(c.hidden_size), int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or h // heads)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    n_layers = int(c.num_hidden_layers)
    layer = _decoder_layers(base, n_layers)[0]
    names = [n for n, _ in layer.named_modules()]
    gated = any(n.endswith(("gate_proj", "gate_up_proj", "w1", "w3")) for n in names)
    rms = any("RMSNorm" in type(m).__name__ for m in layer.modules())
    groups = dict(attn_in=False, attn_out=False, mlp_in=False, mlp_out=False)
    for name, m in layer.named_modules():
        if not isinstance(m, nn.Linear) or "lora_" in name:
            continue
        owner = name.removesuffix(".base_layer")
        suffix = owner.rsplit(".", 1)[-1]
        attn = "attn" in owner or "attention" in owner
        if attn:
            key = "attn_out" if suffix in ATTN_OUT else "attn_in"
        else:
            key = "mlp_out" if suffix in MLP_OUT else "mlp_in"
        groups[key] |= _trains(layer.get_submodule(owner))
    norms = any(p.requires_grad for n, m in layer.named_modules() if "norm" in type(m).__name__.lower()
                for p in m.parameters(recurse=False))
    lora = []
    for lyr in lora_layers(layer):
        for ad in lyr.active_adapters:
            if ad in lyr.lora_A and lyr.lora_A[ad].weight.requires_grad:
                a = lyr.lora_A[ad]
                lora.append((a.in_features, a.out_features, not isinstance(lyr.lora_dropout[ad], nn.Identity)))
    ffn = int(getattr(c, "intermediate_size", 4 * h))
    fused = getattr(c, "_attn_implementation", "sdpa") != "eager"
    sh = LayerShape(seq=seq, hidden=h, heads=heads, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, ffn=ffn,
                    gated=gated, fused=fused, rms_norm=rms, masked=masked, lora=tuple(lora))
    return sh, Trains(norms=norms, **groups), n_layers




# --------------------------------------------------------------------------------------------
# per component


def num_slices(cfg: RunConfig) -> int:
    """S per image as the data pipeline makes it (num_slices -1: the max_slices worst case)."""
    d = cfg.data
    total = 0
    for plane in d.planes:
        axis = ("axial", "coronal", "sagittal").index(plane)
        if d.num_slices > 0:
            total += d.num_slices
        elif d.num_slices == -1 and axis == 0:
            total += d.max_slices
        else:
            total += int(d.size[axis])
    return total


def activation_bytes(model: nn.Module, cfg: RunConfig, batch: int, e: int, seq: int, slices: int,
                 masked: bool) -> dict[str, dict[str, int]]:
    """Saved activations per component in bytes for `batch` samples (`e` bytes per element, `seq`
    LLM tokens, `slices` slices per image, `masked`: a padding mask), without and with the LLM's
    gradient checkpointing; plus the backward working set and the total."""
    comps = model.components()
    stage = cfg.train.stage
    run_visual = stage != "stage0_text"
    run_llm = fusion = stage != "stage0_clip"  # stage0_clip: the encoders alone (+ small contrastive heads)
    t = {name: _trains(m) for name, m in comps.items()}
    g3 = run_visual and t["encoder3d"]
    g2 = run_visual and t["slice_encoder"]
    gi = g2 or t["inter_slice"]
    gp3, gp2 = g3 or t["projector"], gi or t["projector"]
    llm_full = cfg.model.trainable.llm == "full"
    gt = gp3 or gp2 or t["tgis"] or llm_full
    g_vis = run_visual and (gp3 or gt or (model.variant == "2d_only" and gp2))
    act = {name: 0 for name in COMPONENTS} | {"logits": 0}
    enc3d, senc = model.encoder3d, model.slice_encoder
    if run_visual and enc3d is not None:
        act["encoder3d"] = encoder3d_bytes(enc3d, e) if g3 else 0
        if gp3 and fusion:
            p3 = model.projector3d
            act["projector"] += math.prod(p3.grid) * p3.in_dim * e * (g3 and p3.pool is not None)
            act["projector"] += mlp_bytes(p3.num_tokens, p3.mlp, e, t["projector"])
    if run_visual and senc is not None:
        act["slice_encoder"] = slices * slice_encoder_bytes(senc, e) if g2 else 0
        n2 = slices * senc.num_tokens
        if gi and fusion and model.inter_slice is not None:
            d2 = senc.out_dim
            sh = LayerShape(seq=slices, hidden=d2, heads=cfg.model.inter_slice.num_heads, q_dim=d2, kv_dim=d2,
                            ffn=4 * d2, masked=True)
            act["inter_slice"] = cfg.model.inter_slice.num_layers * layer_bytes(sh, e) + 3 * slices * d2 * e
        if gp2 and fusion:
            act["projector"] += mlp_bytes(n2, model.projector2d.mlp, e, t["projector"])
        if model.tgis is not None and gt and fusion:
            act["tgis"] = (n2 + 2 * slices) * model.width * e
    stored_ckpt = dict(act)
    work, work_ckpt = 0, 0
    if run_llm:
        sh, tr, n_layers = llm_layer(model.llm, seq, masked)
        vocab = int(model.llm.get_output_embeddings().weight.shape[0])
        if t["llm"] or g_vis:
            head = model.llm.get_output_embeddings()
            tail = norm_bytes(seq, sh.hidden, e, sh.rms_norm, tr.norms) + seq * sh.hidden * e * _trains(head)
            act["llm"] = n_layers * layer_bytes(sh, e, tr) + tail
            stored_ckpt["llm"] = n_layers * checkpointed_layer_bytes(sh, e) + tail
            work_ckpt = layer_bytes(sh, e, tr)
        act["logits"] = stored_ckpt["logits"] = seq * vocab * (e + 4)
        work = seq * vocab * 8
        work_ckpt = max(work, work_ckpt)
    scale = {k: v * batch for k, v in act.items()}
    scale_ckpt = {k: v * batch for k, v in stored_ckpt.items()}
    scale["backward"], scale_ckpt["backward"] = work * batch, work_ckpt * batch
    scale["total"], scale_ckpt["total"] = sum(scale.values()), sum(scale_ckpt.values())
    return {"no_ckpt": scale, "ckpt": scale_ckpt}
