"""2D slice encoder: a timm backbone run over every real slice of a study, chunked.

    slices [B, S, 1, h, w], mask [B, S] bool  ->  tokens [B, S, T, D2]   (`pooled`: [B, S, D2])

Only the real slices (mask True) go through the backbone, `chunk_size` slices per call;
padded positions come out as zeros. Each slice's feature map from `forward_features` is
adaptive-average-pooled to a `sqrt(T) x sqrt(T)` grid, so T (`num_tokens`) must be a perfect
square (1, 4, 9, 16, ...). Tokens are in row-major (row, column) order.

The feature layout is told apart by tensor rank, never by model name:
- rank 3 `[N, L, C]` (ViT-like): the first `model.num_prefix_tokens` tokens (cls / register)
  are dropped and the rest reshaped to the patch grid (`patch_embed.grid_size`, else square).
- rank 4 `[N, C, h, w]` (CNN; `[N, h, w, C]` when the model says `output_fmt == "NHWC"`, e.g. Swin).

Input slices are in [0, 1]; they are normalised with the backbone's pretrained mean/std (the
channel mean for `in_chans=1`; none with `normalize: none`), and the grey channel is repeated when `in_chans=3`.
`cfg.gradient_checkpointing` switches on timm's `set_grad_checkpointing` (blocks / stages are
recomputed in backward; a `ValueError` at construction if the model does not support it).
`cfg.weights` is a local file (safetensors or weights-only torch) handed to timm's own
pretrained loader, which adapts the input conv to `in_chans`, resamples ViT position
embeddings to the slice size and drops the classifier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from medvlm3d.config_fields import check_choice
from medvlm3d.data.errors import ConfigError
from medvlm3d.model.encoder3d import read_state_dict


@dataclass
class SliceEncoderConfig:
    """timm 2D backbone over each slice: [B, S, 1, h, w] -> [B, S, T, D2]."""

    model_name: str = "resnet18"
    in_chans: int = 1  # 1, or 3 by repeating the grey channel
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    num_tokens: int = 4  # T: tokens per slice after pooling
    chunk_size: int = 64  # slices per backbone call
    gradient_checkpointing: bool = False  # timm set_grad_checkpointing on the backbone (saves memory)
    # pretrained: (x - mean) / std of the backbone's pretrained config; none: the [0, 1] slices as
    # they are (Med-2E3 feeds SigLIP its [0, 1] volume slices without normalising)
    normalize: str = "pretrained"

    def __post_init__(self) -> None:
        check_choice("slice_encoder.in_chans", self.in_chans, (1, 3))
        check_choice("slice_encoder.normalize", self.normalize, ("pretrained", "none"))
        if self.num_tokens < 1 or self.chunk_size < 1:
            raise ConfigError("slice_encoder.num_tokens and slice_encoder.chunk_size must be >= 1")


logger = logging.getLogger(__name__)


class SliceEncoder(nn.Module):
    """timm backbone over slices: [B, S, 1, h, w] -> [B, S, T, D2] (T = `num_tokens`, D2 = `out_dim`).

    Args:
        cfg: the slice-encoder section of the config.
        img_size: (h, w) of each slice, i.e. `data.slice_size`.
        load_weights: load `cfg.weights` if set (False when a full checkpoint will overwrite them).
    """

    def __init__(self, cfg: SliceEncoderConfig, img_size: tuple[int, int], load_weights: bool = True) -> None:
        super().__init__()
        size = tuple(int(v) for v in img_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"SliceEncoder img_size must be (h, w) with positive ints, got {img_size!r}")
        side = math.isqrt(cfg.num_tokens) if cfg.num_tokens >= 1 else 0
        if side < 1 or side * side != cfg.num_tokens:
            raise ValueError(
                f"slice_encoder.num_tokens must be a perfect square (1, 4, 9, 16, ...), got {cfg.num_tokens}"
            )
        if cfg.in_chans not in (1, 3) or cfg.chunk_size < 1:
            raise ValueError(
                f"slice_encoder.in_chans must be 1 or 3 and chunk_size >= 1, got {cfg.in_chans}, {cfg.chunk_size}"
            )
        kwargs = dict(cfg.model_kwargs)
        if _takes_img_size(cfg.model_name):
            kwargs.setdefault("img_size", size)
        pretrained = {}
        if load_weights and cfg.weights:
            sd = read_state_dict(cfg.weights, "slice encoder weights")
            pretrained = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
        check_model_name(cfg.model_name)
        try:
            self.backbone = timm.create_model(
                cfg.model_name, in_chans=cfg.in_chans, num_classes=0, global_pool="", **kwargs, **pretrained
            )
        except TypeError as e:  # a keyword the architecture does not take
            raise ConfigError(f"slice_encoder.model_kwargs {dict(cfg.model_kwargs)} do not fit timm model "
                              f"{cfg.model_name!r}: {e}") from e
        except RuntimeError as e:  # timm: weights that do not fit it
            raise ConfigError(f"cannot build timm model {cfg.model_name!r} (weights {cfg.weights!r}): {e}") from e
        if pretrained:
            check_complete(self.backbone, sd, cfg.weights, cfg.model_name)
            logger.info("loaded slice encoder weights from %s", cfg.weights)
        if cfg.gradient_checkpointing:
            _enable_grad_checkpointing(self.backbone, cfg.model_name)
        pcfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        mean = torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        if cfg.in_chans == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        if cfg.normalize == "none":
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        self.register_buffer("mean", mean.view(1, -1, 1, 1)[:, : cfg.in_chans], persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1)[:, : cfg.in_chans], persistent=False)
        self.img_size = size
        self.in_chans = cfg.in_chans
        self.chunk_size = cfg.chunk_size
        self.num_tokens = cfg.num_tokens
        self.side = side
        self.out_dim = int(self.backbone.num_features)

    # ----------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Real slices [N, 1, h, w] -> tokens [N, T, D2] (one backbone call; no chunking)."""
        if self.in_chans == 3:
            x = repeat(x, "n 1 h w -> n c h w", c=3)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.backbone.forward_features(x)
        if feats.ndim == 3:
            grid = self._token_grid(feats.shape[1] - int(getattr(self.backbone, "num_prefix_tokens", 0)))
            feats = feats[:, feats.shape[1] - grid[0] * grid[1]:]
            fmap = rearrange(feats, "n (gh gw) c -> n c gh gw", gh=grid[0], gw=grid[1])
        elif feats.ndim == 4:
            nhwc = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
            fmap = rearrange(feats, "n h w c -> n c h w") if nhwc else feats
        else:
            raise ValueError(f"timm backbone returned features of shape {list(feats.shape)}; "
                             "expected [N, L, C] or [N, C, h, w]")
        pooled = F.adaptive_avg_pool2d(fmap, (self.side, self.side))
        return rearrange(pooled, "n c th tw -> n (th tw) c")

    def forward(self, slices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """slices [B, S, 1, h, w], mask [B, S] bool (True = real) -> tokens [B, S, T, D2]; padded = 0."""
        self._check(slices, mask)
        b, s = mask.shape
        real = slices[mask]  # [R, 1, h, w]
        out = slices.new_zeros(b, s, self.num_tokens, self.out_dim)
        if real.shape[0] == 0:
            return out
        feats = torch.cat([self.encode(chunk) for chunk in real.split(self.chunk_size)], dim=0)
        out = out.to(feats.dtype)
        out[mask] = feats
        return out

    def pooled(self, slices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """slices [B, S, 1, h, w], mask [B, S] -> one vector per slice [B, S, D2] (mean over T)."""
        return reduce(self(slices, mask), "b s t d -> b s d", "mean")

    # ----------------------------------------------------------------------------------------

    def _token_grid(self, n: int) -> tuple[int, int]:
        grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == n:
            return int(grid[0]), int(grid[1])
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot lay {n} patch tokens of {type(self.backbone).__name__} on a 2D grid")
        return side, side

    def _check(self, slices: torch.Tensor, mask: torch.Tensor) -> None:
        h, w = self.img_size
        if slices.ndim != 5 or slices.shape[2] != 1 or tuple(slices.shape[3:]) != (h, w):
            raise ValueError(f"SliceEncoder expected slices [B, S, 1, {h}, {w}] (data.slice_size), "
                             f"got {list(slices.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(slices.shape[:2]):
            raise ValueError(f"SliceEncoder expected a bool mask {list(slices.shape[:2])}, "
                             f"got {mask.dtype} {list(mask.shape)}")


def check_complete(backbone: nn.Module, sd: dict[str, torch.Tensor], path: str, model_name: str) -> None:
    """Every tensor of `backbone` must come from the file `sd` (timm loads non-strictly when the
    classifier is dropped, which would leave a partly random encoder silently). Keys are compared
    after the model family's own `checkpoint_filter_fn` (layout conversion); file keys of heads the
    backbone does not have (`head`, `attn_pool`, ...: no parameters here) are ignored. Raises
    `ValueError` listing the missing and unexpected keys."""
    import sys

    filt = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = filt(dict(sd), backbone)
        except Exception:  # noqa: BLE001  a layout the filter does not know: compare the keys as given
            pass
    own = backbone.state_dict()

    def dropped(key: str) -> bool:
        top = getattr(backbone, key.split(".")[0], None)
        return top is None or (isinstance(top, nn.Module) and not any(True for _ in top.parameters()))

    if not any(k in own for k in sd):
        raise ValueError(f"no tensor of slice encoder weights {path} matched {model_name!r} "
                         f"(file keys start with {sorted(sd)[:3]}, expected e.g. {sorted(own)[:3]})")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not dropped(k)]
    if missing or unexpected:
        raise ValueError(f"slice encoder weights {path} do not fit {model_name!r}: {len(missing)} missing keys "
                         f"{missing[:20]}, {len(unexpected)} unexpected keys {unexpected[:20]} (expected timm's layout)")


def _enable_grad_checkpointing(backbone: nn.Module, model_name: str) -> None:
    """timm's own activation checkpointing (non-reentrant by default in timm >= 1.0); ValueError if unsupported."""
    setter = getattr(backbone, "set_grad_checkpointing", None)
    if setter is None:
        raise ValueError(f"slice_encoder.gradient_checkpointing: timm model {model_name!r} has no "
                         "set_grad_checkpointing; set it to false or pick another model_name")
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as e:  # timm: `assert not enable, '... not supported'`
        raise ValueError(f"slice_encoder.gradient_checkpointing: timm model {model_name!r} does not support "
                         f"gradient checkpointing ({e}); set it to false or pick another model_name") from e
    logger.info("slice encoder %s: gradient checkpointing on", model_name)


def check_model_name(model_name: str) -> None:
    """ConfigError unless `model_name` is a timm architecture known locally (an optional `.tag`
    allowed): a hub name (`hf-hub:...`, `timm/...`) would make timm reach for the network."""
    source = model_name.split(":", 1)[0] if ":" in model_name else ""
    if source or "/" in model_name:
        raise ConfigError(f"slice_encoder.model_name {model_name!r} names a model hub; nothing is downloaded. Give a "
                          "timm architecture name (e.g. vit_base_patch16_224) and its weights file in "
                          "slice_encoder.weights")
    if not timm.is_model(model_name):
        near = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:8]
        raise ConfigError(f"slice_encoder.model_name {model_name!r} is not a timm architecture"
                          + (f"; similar names: {near}" if near else ""))


def _takes_img_size(model_name: str) -> bool:
    """True for timm models whose constructor needs the input size (ViT-like patch embeddings)."""
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError):
        cfg = None
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))
