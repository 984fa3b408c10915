"""Checks of a checkpoint folder before and while it is loaded: one clear DataError line each.

    read_meta(root) -> dict                    checkpoint.json, strict JSON, format_version an int
    read_run_config(root) -> RunConfig         config.yaml; a ConfigError names the file
    check_folder(root)                         only regular files, no pickled weights (.bin, .pt, ...)
                                               in the folder, every .safetensors header readable
    load_tensors(path) -> {name: Tensor}       safetensors only; truncated / pickle -> DataError
    check_state(model, state, path, skip=())   every key present with the module's shape, nothing extra
    check_llm_keys(llm, folder)                the LLM folder's tensor names cover the LLM, no extra
    llm_shape_mismatches(folder) -> str        wrongly shaped tensors of an HF folder, for a message
    first_line(e) -> "<Type>: first line"      for wrapping a library's exception text

Policy (README "Checkpoints"): inside a medvlm3d checkpoint folder, weights are safetensors only.
A `pytorch_model.bin`, `adapter_model.bin` or any other pickle-based file there is refused,
naming the file (convert it once with `medvlm3d.model.convert.convert_to_safetensors`). Nothing
in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.data.guard import check_regular

FORMAT_VERSION = 1
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUBFOLDERS = ("", "llm", "adapter", "tokenizer", "text_encoder")
_SHOW = 5  # keys listed in a mismatch message


def first_line(e: BaseException) -> str:
    """'<Type>: <first line of the message>' (library errors can span many lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _sniff(path: Path) -> str:
    """What a file that is not safetensors looks like, for the message."""
    try:
        head = path.open("rb").read(8)
    except OSError:
        return ""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "; it is a pickle (a torch .bin / .pt renamed?), which medvlm3d never unpickles"
    if head[:2] == b"PK":
        return "; it is a zip archive (a torch.save file renamed?), which medvlm3d never unpickles"
    return ""


def read_meta(root: Path) -> dict[str, Any]:
    """checkpoint.json (absent: {} for old folders); DataError naming it when not a JSON object
    whose format_version is an integer this medvlm3d reads."""
    meta_file = root / "checkpoint.json"
    if not meta_file.exists():
        return {}
    check_regular(meta_file, "checkpoint.json", dir_ok=False)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{meta_file}: not valid JSON ({first_line(e)}); expected the JSON object written by "
                        "save_pretrained") from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file}: holds a JSON {type(meta).__name__}; expected an object with format_version")
    version = meta.get("format_version")
    if "format_version" not in meta:
        raise DataError(f"{meta_file}: no 'format_version'; expected an integer 1..{FORMAT_VERSION}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DataError(f"{meta_file}: format_version {version!r} is a {type(version).__name__}; expected an "
                        f"integer 1..{FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise DataError(f"{meta_file}: checkpoint format {version} is newer than this medvlm3d reads "
                        f"(up to {FORMAT_VERSION}); upgrade medvlm3d")
    if version < 1:
        raise DataError(f"{meta_file}: format_version {version}; expected an integer 1..{FORMAT_VERSION}")
    return meta


def read_run_config(root: Path) -> Any:
    """config.yaml of a checkpoint; a ConfigError (or YAML error) names the file."""
    from medvlm3d.config import load_config

    path = root / "config.yaml"
    check_regular(path, "config.yaml", dir_ok=False)
    try:
        return load_config(path)
    except ConfigError as e:
        text = " ".join(str(e).split())  # YAML errors span lines: one line, naming the file
        raise ConfigError(text if str(path) in text else f"{path}: {text}") from e
    except DataError:
        raise
    except (ValueError, OSError, TypeError) as e:  # YAML syntax, bad bytes: one line naming the file
        raise ConfigError(f"{path}: unreadable run config ({first_line(e)}); expected the YAML written by "
                          "save_pretrained") from e


def check_folder(root: Path) -> None:
    """Refuse special files (FIFOs...), pickle-based weight files and unreadable safetensors headers
    in `root` and its SUBFOLDERS (llm, adapter, tokenizer, text_encoder; headers only: nothing is loaded)."""
    for sub in SUBFOLDERS:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            check_regular(f, "a checkpoint file")  # a FIFO would block HF's loaders
            if f.suffix.lower() in PICKLED_SUFFIXES:
                raise DataError(f"{f}: a pickle-based weight file inside a medvlm3d checkpoint; checkpoints hold "
                                "safetensors only (nothing is unpickled). Convert it once with "
                                "medvlm3d.model.convert.convert_to_safetensors (the `medvlm3d convert` verb)")
            if f.suffix.lower() == ".safetensors":
                _open_header(f)


def _open_header(path: Path) -> list[str]:
    check_regular(path, "a .safetensors file", dir_ok=False)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({first_line(e)}){_sniff(path)}; expected "
                        "a complete .safetensors file (truncated or damaged copy?)") from e


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; DataError naming it when truncated, damaged or a pickle."""
    _open_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot read its tensors ({first_line(e)}); expected a complete .safetensors "
                        "file") from e


def _shape_lines(pairs: Iterable[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} (expected {list(a)}, found {list(b)})" for k, a, b in pairs)


def check_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                skip: tuple[str, ...] = ()) -> None:
    """DataError listing the missing, unexpected and wrongly shaped tensors of `state` against
    `model` (keys starting with a `skip` prefix are not expected in `state`)."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(skip))
    wrong = sorted((k, tuple(own[k].shape), tuple(v.shape)) for k, v in state.items()
                   if k in own and tuple(own[k].shape) != tuple(v.shape))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of the wrong shape: {_shape_lines(wrong[:_SHOW])}")
    if missing:
        parts.append(f"{len(missing)} missing: {missing[:_SHOW]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {unexpected[:_SHOW]}")
    raise DataError(f"{path} does not match its config.yaml: {'; '.join(parts)}; expected the tensors of the model "
                    "that config describes (was the file copied from another run?)")


def check_llm_keys(llm: torch.nn.Module, folder: Path) -> None:
    """The safetensors files of an HF model folder must hold every LLM tensor (tied ones excepted)
    and nothing else: HF would silently start missing weights from random values."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return
    found: set[str] = set()
    for f in files:
        found.update(_open_header(f))
    own = llm.state_dict()
    have_ptrs = {own[k].data_ptr() for k in found if k in own}
    missing = sorted(k for k in own if k not in found and own[k].data_ptr() not in have_ptrs)
    unexpected = sorted(k for k in found if k not in own)
    if missing or unexpected:
        raise DataError(f"{folder}: its weights do not match the LLM of config.yaml: {len(missing)} missing "
                        f"{missing[:_SHOW]}, {len(unexpected)} unexpected {unexpected[:_SHOW]}; expected the "
                        "folder written by save_pretrained")


def llm_shape_mismatches(folder: Path) -> str:
    """", first mismatches: name (expected [...], found [...])" between an HF folder's config.json
    and its safetensors files (the model built on the meta device: no memory); "" when none
    are found or the folder's config cannot be built."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder))).state_dict()
        wrong = []
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    found = tuple(fh.get_slice(k).get_shape())
                    if k in own and tuple(own[k].shape) != found:
                        wrong.append((k, tuple(own[k].shape), found))
    except Exception:  # noqa: BLE001 - only a better message is lost
        return ""
    return f"; {len(wrong)} tensor(s) of the wrong shape: {_shape_lines(sorted(wrong)[:_SHOW])}" if wrong else ""


__all__ = ["FORMAT_VERSION", "PICKLED_SUFFIXES", "check_folder", "check_llm_keys", "check_state", "first_line",
           "llm_shape_mismatches", "load_tensors", "read_meta", "read_run_config"]
