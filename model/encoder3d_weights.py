"""Weight loading for the 3D encoders: safe state-dict reading and the M3D-CLIP key map.

`read_state_dict(path)` -> {name: tensor} from a `.safetensors` file or a torch file loadable
with `weights_only=True` (never unpickles arbitrary objects). `map_m3d_clip_keys` maps an
M3D-CLIP / M3D-LaMed vision-tower state dict onto MONAI ViT keys, turning the Linear patch
embedding `[hidden, p1*p2*p3*c]` into the Conv3d kernel `[hidden, c, p1, p2, p3]`.
`load_encoder3d_weights(module, path, key_map)` loads into a module from `build_encoder3d` in
place. All three are re-exported by `medvlm3d.model.encoder3d`.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from medvlm3d.data.errors import DataError

logger = logging.getLogger(__name__)


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file or a torch file with `weights_only=True`.

    The one place an external `.bin` / `.pt` is read, and only from an explicit config path
    (`model.encoder3d.weights`, `model.slice_encoder.weights`, or `convert_to_safetensors`);
    checkpoint folders are safetensors only (model/checkpoint_checks.py).

    Uses timm's reader (which also unwraps `state_dict` / `model` entries and strips `module.`
    prefixes). Raises `FileNotFoundError` naming the path when it is missing, and `ValueError`
    (a `DataError`, one line naming the file) when the file cannot be read safely (e.g. a pickle
    of arbitrary objects, refused by weights_only=True).
    """
    from timm.models import load_state_dict  # local import: timm is heavy and only needed here

    p = Path(path)
    if not str(path) or not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    try:
        sd = load_state_dict(str(p), use_ema=False, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
        lines = str(e).strip().splitlines() or [""]  # torch's weights_only refusal spans many lines
        raise DataError(
            f"cannot read {what} from {p}: expected a .safetensors file or a torch file loadable "
            f"with weights_only=True ({type(e).__name__}: {lines[0][:300]})"
        ) from e
    if not isinstance(sd, dict):
        raise ValueError(f"{what} file {p} holds a {type(sd).__name__}, expected a state dict")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{what} file {p} holds no tensors")
    return tensors


_M3D_PREFIXES = ("vision_encoder.", "vision_tower.vision_tower.", "vision_tower.")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_STALE = re.compile(r"^(classification_head\.|blocks\.\d+\.cross_attn\.)")


def map_m3d_clip_keys(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an M3D-CLIP (or M3D-LaMed) vision-encoder state dict onto MONAI ViT keys.

    Strips `module.` / `model.` wrappers, keeps only the vision encoder's keys when the dict
    holds a whole model (`vision_encoder.` in M3D-CLIP, `vision_tower.vision_tower.` in
    M3D-LaMed), drops the unused classification head and stale `cross_attn` keys of older MONAI
    versions, and converts M3D's "perceptron" patch embedding (Linear on `(p1 p2 p3 c)`) to the
    equivalent Conv3d kernel `[hidden, c, p1, p2, p3]` when `target` uses a conv embedding.
    """
    stripped = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        stripped[k] = v
    if any(k.startswith(_M3D_PREFIXES) for k in stripped):
        picked = {}
        for k, v in stripped.items():
            for p in _M3D_PREFIXES:
                if k.startswith(p):
                    picked[k[len(p):]] = v
                    break
        stripped = picked
    out = {k: v for k, v in stripped.items() if not _STALE.match(k)}
    lin, conv = "patch_embedding.patch_embeddings.1.", "patch_embedding.patch_embeddings."
    if lin + "weight" in out and conv + "weight" in target and target[conv + "weight"].ndim == 5:
        _, c, p1, p2, p3 = target[conv + "weight"].shape
        w = out.pop(lin + "weight")
        if w.shape[1] != c * p1 * p2 * p3:
            raise ValueError(
                f"M3D-CLIP patch embedding has {w.shape[1]} inputs per patch, the ViT expects "
                f"{c}x{p1}x{p2}x{p3}; check encoder3d.patch_size"
            )
        out[conv + "weight"] = rearrange(w, "o (p1 p2 p3 c) -> o c p1 p2 p3", p1=p1, p2=p2, p3=p3, c=c)
        if lin + "bias" in out:
            out[conv + "bias"] = out.pop(lin + "bias")
    return out


def load_encoder3d_weights(module: nn.Module, path: str | Path, key_map: str = "") -> dict[str, list[str]]:
    """Load weights into a module from `build_encoder3d` (in place).

    `key_map`: "" takes the keys as they are, either the module's own (`net.` prefix) or the
    bare MONAI network's; "m3d_clip" applies `map_m3d_clip_keys`. Unexpected keys are logged; a
    missing key (listed), a shape mismatch or a file in which no key matches raises `ValueError`.
    Returns {"loaded": [...], "missing": [...], "unexpected": [...]}.
    """
    if key_map not in ("", "m3d_clip"):
        raise ValueError(f"key_map must be '' or 'm3d_clip', got {key_map!r}")
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module):
        raise ValueError(f"expected a module from build_encoder3d (with a .net), got {type(module).__name__}")
    sd = read_state_dict(path, "3D encoder weights")
    target = net.state_dict()
    if key_map == "m3d_clip":
        sd = map_m3d_clip_keys(sd, target)
    elif not any(k in target for k in sd) and any(k.startswith("net.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
    if "cls_token" in sd and "cls_token" not in target:
        logger.warning(
            "%s has a cls token but the ViT was built without one (set encoder3d.weights_key_map="
            "m3d_clip to keep it); dropping it, so features differ from the pretrained model's", path
        )
    loaded = [k for k in sd if k in target]
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
           for k in loaded if sd[k].shape != target[k].shape]
    if bad:
        raise ValueError(f"3D encoder weights {path} do not fit the configured encoder (check img_size, "
                         f"patch_size, hidden_size): " + "; ".join(bad[:5]))
    if not loaded:
        raise ValueError(
            f"no key of 3D encoder weights {path} matched the encoder (key_map={key_map!r}); "
            f"file keys start with {sorted(sd)[:3]}, expected e.g. {sorted(target)[:3]}"
        )
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    real_missing = [k for k in missing if ".norm_cross_attn." not in k]  # unused by MONAI's forward
    if real_missing:  # never a silent partial load
        raise ValueError(f"3D encoder weights {path} lack {len(real_missing)} of the encoder's keys "
                         f"(key_map={key_map!r}): {real_missing[:20]}; file keys start with {sorted(sd)[:3]}")
    net.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    if unexpected:
        logger.warning("3D encoder weights %s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected[:10])
    logger.info("loaded %d tensors into the 3D encoder from %s", len(loaded), path)
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected}
