"""Self-describing checkpoint folders: save_pretrained / load_pretrained.

    <dir>/
      config.yaml         the full RunConfig (read back with yaml.safe_load)
      checkpoint.json     format version, how the LLM is stored, visual token count
      model.safetensors   every weight outside the LLM (encoders, inter-slice, TG-IS, projectors)
      llm/                the base LLM as a plain HF folder (merged with LoRA when asked), unless it
                          is a frozen external folder named in config.yaml
      adapter/            the PEFT LoRA adapter (when LoRA is used and not merged), LoRA-sized: the
                          embedding rows the tokenizer added to an external base LLM (`<image>`)
                          are stored alone in grown_embedding_rows.safetensors, not whole tables
      tokenizer/          the tokenizer, <image> token included
      text_encoder/       the TG-IS text tower (tgis.text_source=hf; small, so always stored): the
                          checkpoint needs no outside folder but an external base LLM, which
                          checkpoint.json names (a clear DataError when it is missing)

`load_pretrained(path, device_map="auto")` loads the LLM with accelerate's big-model dispatch
(its layers spread over the GPUs, then the CPU), for LLMs too large for one GPU; every other
module then sits on the device of the LLM's input embeddings. A LoRA adapter needs the LLM on
GPUs only (no CPU/disk offload); merge it first (`medvlm3d export --merge-lora`) otherwise.

Writes are atomic: everything goes to a hidden sibling folder, which is renamed into place; an
older folder of the same name is moved aside first and removed only after the rename. Nothing
is unpickled when loading: safetensors, YAML via safe_load, and HF/PEFT's safetensors files; a
pickle-based file (pytorch_model.bin, adapter_model.bin, .pt) in the folder is refused, and every
damaged file (truncated safetensors, a pickle renamed, wrong shapes, missing or extra tensors,
checkpoint.json that is not JSON or whose format_version is not an integer, an unknown key in
config.yaml) is one DataError / ConfigError line naming it (model/checkpoint_checks.py).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medvlm3d.config import save_config
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.io import atomic_dir, atomic_write_json, swap_dir
from medvlm3d.model.checkpoint_checks import (FORMAT_VERSION, check_folder, check_llm_keys, check_state, first_line,
                                              llm_shape_mismatches, load_tensors, read_meta, read_run_config)

log = logging.getLogger(__name__)

LLM_PREFIX = "llm."
TEXT_TOWER = "text_encoder"  # the stored TG-IS text tower's folder
GROWN_ROWS = "grown_embedding_rows.safetensors"  # in adapter/: the rows added past an external LLM's vocabulary


def _has_lora(llm: torch.nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def non_llm_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All parameters and buffers outside the LLM, contiguous and unshared (for safetensors)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(LLM_PREFIX) or name.startswith("text_encoder."):
            continue
        state[name] = tensor.detach().cpu().contiguous().clone()
    return state


def atomic_dir_swap(tmp: Path, final: Path) -> None:
    """Kept for old imports: `medvlm3d.io.swap_dir`."""
    swap_dir(tmp, final)


def save_pretrained(model: Any, path: str | os.PathLike, merge_lora: bool = False, save_base_llm: str = "auto") -> Path:
    """Write `model` (a MedVLM) to the folder `path`, atomically.

    merge_lora: merge the adapter into the LLM and store it as a standalone `llm/`.
    save_base_llm: "auto" stores `llm/` unless the LLM comes from an external folder that was
        not trained (frozen or LoRA-only); "always" / "never" force it.
    """
    if save_base_llm not in ("auto", "always", "never"):
        raise ValueError(f"save_base_llm must be auto | always | never, got {save_base_llm!r}")
    final = Path(path)
    with atomic_dir(final) as tmp:
        cfg = copy.deepcopy(model.cfg)
        llm = model.llm
        lora = _has_lora(llm)
        external = bool(cfg.model.llm.path) and cfg.model.trainable.llm in ("frozen", "lora")
        if merge_lora and lora:
            merged = copy.deepcopy(llm).merge_and_unload()
            merged.save_pretrained(tmp / "llm", safe_serialization=True)
            layout = "merged"
            cfg.model.trainable.llm = "full" if cfg.model.trainable.llm == "lora" else cfg.model.trainable.llm
        else:
            base = llm.get_base_model() if lora else llm
            store_base = save_base_llm == "always" or (save_base_llm == "auto" and not external)
            if store_base:
                # PEFT's layers live inside the base model; save the base weights without them.
                base_state = _strip_lora_names(base) if lora else None
                base.save_pretrained(tmp / "llm", state_dict=base_state, safe_serialization=True)
            if lora:  # LoRA-sized: the embedding rows the tokenizer added are stored apart
                llm.save_pretrained(tmp / "adapter", safe_serialization=True, save_embedding_layers=False)
                if not store_base:
                    save_grown_rows(base, model.cfg.model.llm.path, tmp / "adapter" / GROWN_ROWS)
            layout = ("base" if store_base else "external") + ("+adapter" if lora else "")
        cfg.model.llm.path = ""
        text_tower = getattr(model, "text_encoder", None)
        if text_tower is not None:  # small (a BERT): stored, so the checkpoint stands alone
            text_tower.encoder.save_pretrained(tmp / TEXT_TOWER, safe_serialization=True)
            text_tower.tokenizer.save_pretrained(tmp / TEXT_TOWER)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        save_config(cfg, tmp / "config.yaml")
        save_file(non_llm_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "llm_layout": layout,
            "external_llm": model.cfg.model.llm.path if layout.startswith("external") else "",
            "text_encoder": TEXT_TOWER if text_tower is not None else "",
            "num_visual_tokens": int(model.num_visual_tokens),
            "variant": cfg.model.variant,
        }
        atomic_write_json(tmp / "checkpoint.json", meta)
    log.info("saved checkpoint to %s (%s)", final, layout)
    return final


def _strip_lora_names(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own weights from a PEFT-wrapped model, under their original names."""
    out = {}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _restore_llm(
    root: Path, cfg: Any, meta: dict[str, Any], tokenizer: Any, trainable: bool, device_map: Any = None
) -> Any:
    """The checkpoint's LLM: the base from `<root>/llm` (or the external folder it names), with
    `adapter/` loaded on top when present (trainable when `trainable`); dispatched over devices
    by `device_map` when given."""
    from medvlm3d.model.llm import build_llm

    llm_cfg = copy.deepcopy(cfg.model.llm)
    llm_cfg.path = str(root / "llm") if (root / "llm").is_dir() else meta.get("external_llm", "")
    if not llm_cfg.path:
        raise DataError(f"{root}: no llm/ folder and no external LLM path in checkpoint.json")
    if not Path(llm_cfg.path).is_dir():
        raise DataError(f"{root / 'checkpoint.json'}: the checkpoint's base LLM is the external folder "
                        f"{llm_cfg.path!r} (not stored: it was frozen or LoRA-trained), which is missing; restore "
                        "that folder, or save with save_base_llm='always' (medvlm3d export) to store it")
    try:
        llm = build_llm(llm_cfg, tokenizer, device_map=device_map)
    except (OSError, RuntimeError, ValueError) as e:  # HF's loader: truncated / mismatched weights
        if isinstance(e, (DataError, torch.cuda.OutOfMemoryError)):
            raise
        shapes = llm_shape_mismatches(Path(llm_cfg.path))
        raise DataError(f"{llm_cfg.path}: cannot load the LLM ({first_line(e)}){shapes}; expected the HF model "
                        "folder written by save_pretrained (safetensors)") from e
    if llm_cfg.path == str(root / "llm"):
        check_llm_keys(llm, root / "llm")
    if (root / "adapter").is_dir():
        from peft import PeftModel

        placed = {str(v) for v in (getattr(llm, "hf_device_map", None) or {}).values()}
        offloaded = sorted(placed & {"cpu", "disk"}) if len(placed) > 1 or "disk" in placed else []
        if offloaded:
            # PEFT would re-dispatch the offloaded base model, and the LoRA weights of offloaded
            # (meta) layers can be lost on the way; refuse rather than answer with a wrong model.
            raise ValueError(
                f"{root}: device_map={device_map!r} offloads part of the LLM to {' and '.join(offloaded)} "
                f"({llm.hf_device_map}); a LoRA adapter cannot be loaded onto offloaded layers. Merge it "
                "first (medvlm3d export --merge-lora) or give the LLM enough GPU memory (more GPUs)"
            )
        if (root / "adapter" / GROWN_ROWS).is_file():
            load_grown_rows(llm, root / "adapter" / GROWN_ROWS)
        try:
            llm = PeftModel.from_pretrained(llm, str(root / "adapter"), is_trainable=trainable)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{root / 'adapter'}: cannot load the LoRA adapter ({first_line(e)}); expected the PEFT "
                            "folder written by save_pretrained (adapter_config.json, adapter_model.safetensors)") from e
    return llm


def save_grown_rows(llm: Any, external: str, path: Path) -> None:
    """The input (and untied output) embedding rows past the external base LLM's own vocabulary
    (the `<image>` / pad tokens the tokenizer added, initialised when the table grew) -> `path`."""
    from transformers import AutoConfig

    if not external:  # no base folder (an LLM built from fields, saved with save_base_llm="never"): no rows to split
        return
    hf = AutoConfig.from_pretrained(external, local_files_only=True)
    first = int(getattr(hf.get_text_config(), "vocab_size", 0) or 0)
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if first <= 0 or emb.weight.shape[0] <= first:
        return
    rows = {"input": emb.weight[first:].detach().cpu().contiguous()}
    if head is not None and head.weight is not emb.weight and head.weight.shape[0] > first:
        rows["output"] = head.weight[first:].detach().cpu().contiguous()
    save_file(rows, str(path), metadata={"first_row": str(first)})


def load_grown_rows(llm: Any, path: Path) -> None:
    """Put the rows `save_grown_rows` stored back into the (grown) embedding tables of `llm`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        first = int((fh.metadata() or {}).get("first_row", -1))
        rows = {k: fh.get_tensor(k) for k in fh.keys()}
    targets = {"input": llm.get_input_embeddings(), "output": llm.get_output_embeddings()}
    for key, value in rows.items():
        weight = getattr(targets.get(key), "weight", None)
        if weight is None or first < 0 or tuple(weight[first:].shape) != tuple(value.shape):
            raise DataError(f"{path}: {key} embedding rows {tuple(value.shape)} from row {first} do not fit the "
                            f"LLM's table {None if weight is None else tuple(weight.shape)}")
        with torch.no_grad():
            weight[first:] = value.to(device=weight.device, dtype=weight.dtype)


def _use_stored_text_tower(root: Path, cfg: Any, always: bool) -> None:
    """Point tgis.text_encoder at the checkpoint's stored copy (`always`, or when the configured
    folder is missing); a checkpoint without one keeps the configured (external) folder."""
    stored = root / TEXT_TOWER
    if stored.is_dir() and cfg.model.tgis.text_source == "hf" and \
            (always or not Path(cfg.model.tgis.text_encoder or "").is_dir()):
        cfg.model.tgis.text_encoder = str(stored)


def _read_meta(root: Path) -> dict[str, Any]:
    """checkpoint.json, checked (model/checkpoint_checks.py); the folder's weight files first."""
    check_folder(root)
    return read_meta(root)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: Any) -> Any:
    """`device_map` unchanged when it is one HF accepts (a strategy name, a device, or a non-empty
    dict {module name: device | "disk"}) and names no GPU that torch cannot see; else ValueError."""
    expected = (f"device_map must be one of {list(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:N, N), or a dict "
                "{module name: device}")
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, dict):
        if not device_map:
            raise ConfigError(f"{expected}; got an empty dict")
        values = [v for v in device_map.values() if v != "disk"]
    elif isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        values = [device_map]
    else:
        raise ConfigError(f"{expected}; got {device_map!r}")
    for v in values:
        try:
            dev = torch.device("cuda", v) if isinstance(v, int) and not isinstance(v, bool) else torch.device(v)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"{expected}; got {device_map!r} ({v!r} is not a device)") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device_map {device_map!r} names a CUDA device but torch sees no CUDA GPU")
    return device_map


def _place_around_llm(model: Any, dtype: torch.dtype | None) -> torch.device:
    """Move every module except the (dispatched) LLM to the device of the LLM's input embeddings,
    cast to `dtype` there unless that device is the CPU; returns that device."""
    if next(model.parameters(recurse=False), None) is not None or next(model.buffers(recurse=False), None) is not None:
        raise ValueError("MedVLM holds tensors outside its submodules; load_pretrained(device_map=...) cannot place them")
    dev = model.embed_device
    for name, child in model.named_children():
        if name == "llm":
            continue
        child.to(dev)
        if dtype is not None and dev.type != "cpu":
            child.to(dtype)
    return dev


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    device_map: Any = None,
) -> Any:
    """Rebuild a MedVLM from a folder written by `save_pretrained`, from that folder alone
    (or the external LLM folder it names).

    device: where the whole model goes (without `device_map`).
    dtype: the whole model's dtype (bf16/fp16 on a GPU; on the CPU only float32, since some 3D
        ops such as avg_pool3d have no bf16 CPU kernel).
    device_map: for LLMs too large for one GPU: "auto" (or "balanced", "balanced_low_0",
        "sequential", a device, or a dict {module name: device}) loads the base LLM with HF's
        `from_pretrained(device_map=...)`, i.e. accelerate's big-model dispatch; the LoRA adapter
        is loaded on top (not onto layers offloaded to the CPU or disk: a clear error), and every
        other module goes to the device of the LLM's input embeddings (`device` is then ignored).
        The dispatched LLM is never moved with `.to`.
    """
    from medvlm3d.model.llm import load_tokenizer
    from medvlm3d.model.medvlm import MedVLM

    if dtype is not None and dtype != torch.float32 and device_map is None and torch.device(device).type == "cpu":
        raise ValueError(f"dtype {dtype} is for a GPU: on the CPU load in float32 (dtype=None), "
                         "since some 3D ops (avg_pool3d) have no reduced-precision CPU kernel")
    root = Path(path)
    if not (root / "config.yaml").is_file() or not (root / "model.safetensors").is_file():
        raise DataError(
            f"{root} is not a medvlm3d checkpoint: expected config.yaml and model.safetensors inside it"
        )
    meta = _read_meta(root)
    cfg = read_run_config(root)
    cfg.model.llm.tokenizer = str(root / "tokenizer")
    _use_stored_text_tower(root, cfg, always=True)
    tokenizer = load_tokenizer(cfg.model.llm)
    if dtype is not None:
        cfg.model.llm.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    if device_map is not None:
        check_device_map(device_map)
    llm = _restore_llm(root, cfg, meta, tokenizer, trainable=cfg.model.trainable.llm == "lora", device_map=device_map)
    model = MedVLM(cfg, tokenizer, llm=llm, load_external_weights=False)
    state = load_tensors(root / "model.safetensors")
    check_state(model, state, root / "model.safetensors", skip=(LLM_PREFIX, "text_encoder."))
    model.load_state_dict(state, strict=False)
    if device_map is not None:
        dev = _place_around_llm(model, dtype)
        log.info("loaded %s with device_map=%r; non-LLM modules on %s", root, device_map, dev)
    else:
        model.to(device)
        if dtype is not None:
            model.to(dtype)
    model.eval()
    return model


def init_from_checkpoint(cfg: Any, path: str | os.PathLike) -> Any:
    """Start a new stage: build a MedVLM from the run config `cfg` (its trainable policy, LoRA
    settings and variant), taking every weight that the previous stage's checkpoint holds.

    The LLM base comes from `<path>/llm` (or the external folder it names); an existing
    `adapter/` is loaded (trainable when the policy says `lora`), otherwise LoRA starts fresh
    when the policy asks for it. Non-LLM weights load from `model.safetensors`; modules that the
    checkpoint lacks (e.g. a TG-IS head first added in this stage) keep their initialisation.
    """
    from medvlm3d.model.llm import apply_lora, load_tokenizer
    from medvlm3d.model.medvlm import MedVLM

    root = Path(path)
    if not (root / "model.safetensors").is_file():
        raise ConfigError(f"train.init_from={str(root)!r} is not a medvlm3d checkpoint (no model.safetensors)")
    meta = _read_meta(root)
    cfg = copy.deepcopy(cfg)
    cfg.model.llm.tokenizer = str(root / "tokenizer")
    _use_stored_text_tower(root, cfg, always=False)
    tokenizer = load_tokenizer(cfg.model.llm)
    llm = _restore_llm(root, cfg, meta, tokenizer, trainable=cfg.model.trainable.llm == "lora")
    if (root / "adapter").is_dir() and cfg.model.trainable.llm == "full":
        llm = llm.merge_and_unload()
    elif not (root / "adapter").is_dir() and cfg.model.trainable.llm == "lora":
        llm = apply_lora(llm, cfg.model.llm.lora)
    model = MedVLM(cfg, tokenizer, llm=llm, load_external_weights=False)
    state = load_tensors(root / "model.safetensors")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    model.load_state_dict(usable, strict=False)
    fresh = sorted(k for k in own if k not in usable and not k.startswith(LLM_PREFIX) and not k.startswith("text_encoder."))
    if skipped:
        log.warning("init_from %s: %d tensors did not fit this config and were skipped (e.g. %s)", root, len(skipped), skipped[:3])
    if fresh:
        log.info("init_from %s: %d tensors start fresh in this stage (e.g. %s)", root, len(fresh), fresh[:3])
    return model
