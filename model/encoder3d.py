"""3D encoders (MONAI networks) that turn a volume into a grid of tokens.

    volume [B, 1, D, H, W]  ->  tokens [B, d*h*w, out_dim]   (row-major (d, h, w) order)

`D, H, W` must equal `Encoder3DConfig.img_size`. Every encoder module has the attributes
`grid = (d, h, w)` (the token grid, computed from the config) and `out_dim`.

Registered architectures (`ENCODERS3D`, chosen by `Encoder3DConfig.arch`):

- ``"vit"``: `monai.networks.nets.ViT` (conv patch embedding); grid = img_size // patch_size.
  Tokens are the ViT's final (layer-normed) hidden states without any cls token, as M3D-LaMed
  reads M3D-CLIP's tower (select_layer -1, "patch" features). When
  `weights_key_map == "m3d_clip"` the ViT carries a cls token like M3D-CLIP's (its classification
  head is removed), so that pretrained weights give the features they were trained to give.
  Note: MONAI's `TransformerBlock` owns a `norm_cross_attn` LayerNorm that is never used without
  cross-attention, so plain DDP needs `find_unused_parameters=True`.
- ``"resnet"``: `monai.networks.nets.ResNet` (basic blocks, `feed_forward=False`) whose global
  average pool is replaced by `nn.Identity`, so its own forward returns the flattened last
  feature map `[B, C*d*h*w]`, which is unflattened to `[B, d*h*w, C]`. The grid follows from the
  strides (`resnet_grid`): conv1 stride `resnet_conv1_stride` (MONAI's default 1), max-pool stride
  2 unless `resnet_max_pool` is false, layers 2-4 stride 2; each stride-2 step gives `ceil(n / 2)`.
  A stride-2 conv1 without the max-pool gives the same grid at a quarter of the cost on a CPU.

`Encoder3DConfig.gradient_checkpointing` (attribute `grad_checkpointing`, as timm names it): in
training with grad enabled, the ViT's transformer blocks (resp. the ResNet's layer1..layer4) run
under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`, i.e. their activations are
recomputed in backward; the forward is MONAI's own, re-spelled part by part, so outputs and
gradients are those of `self.net(volume)`. BatchNorm running statistics are restored after the
recomputation, so they are updated once per step as without checkpointing.

`load_encoder3d_weights` (model/encoder3d_weights.py, re-exported here) reads a safetensors
file or a weights-only torch file (never unpickles arbitrary objects) and can map M3D-CLIP /
M3D-LaMed vision-tower keys onto the MONAI ViT.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from monai.networks.nets import ResNet, ViT
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from medvlm3d.config_fields import PRESETS, check_choice, check_positive, from_dict
from medvlm3d.model.encoder3d_weights import (  # noqa: F401  (re-exported: weights live there)
    load_encoder3d_weights,
    map_m3d_clip_keys,
    read_state_dict,
)
from medvlm3d.registry import Registry


@dataclass
class Encoder3DConfig:
    """3D encoder over [B, 1, D, H, W] -> tokens [B, N3, hidden_size]; a RunConfig sets img_size = data.size."""

    arch: str = "vit"  # ENCODERS3D name: vit | resnet (| a plugin's)
    img_size: tuple[int, int, int] = (32, 64, 64)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    resnet_layers: tuple[int, ...] = (1, 1, 1, 1)
    resnet_widths: tuple[int, ...] = (16, 32, 64, 128)
    resnet_conv1_stride: int = 1  # 1 (MONAI's default) or 2: with resnet_max_pool false, the same grid, 4x cheaper
    resnet_max_pool: bool = True
    weights: str = ""
    weights_key_map: str = ""  # "" | m3d_clip
    gradient_checkpointing: bool = False  # recompute ViT blocks / ResNet stages in backward (saves memory)

    def __post_init__(self) -> None:
        check_choice("encoder3d.arch", self.arch, ENCODERS3D.names())
        check_positive("encoder3d.img_size", self.img_size, 3)
        check_positive("encoder3d.patch_size", self.patch_size, 3)
        check_choice("encoder3d.weights_key_map", self.weights_key_map, ("", "m3d_clip"))
        check_choice("encoder3d.resnet_conv1_stride", self.resnet_conv1_stride, (1, 2))


_VIT = dict(arch="vit", patch_size=(4, 16, 16))
PRESETS[Encoder3DConfig] = {  # vit3d_m3d: M3D-CLIP's vision tower, 32x256x256 -> 8x16x16 = 2,048 tokens
    "vit3d_m3d": dict(_VIT, img_size=(32, 256, 256), hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "vit3d_small": dict(_VIT, img_size=(32, 256, 256), hidden_size=384, num_layers=6, num_heads=6, mlp_dim=1536),
    "vit3d_tiny": dict(_VIT, img_size=(32, 64, 64), hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128),
    "resnet3d_tiny": dict(arch="resnet", img_size=(32, 64, 64), resnet_layers=(1, 1, 1, 1),
                          resnet_widths=(16, 32, 64, 128)),
}


ENCODERS3D = Registry("3D encoder")


class ViTEncoder3D(nn.Module):
    """MONAI 3D ViT: volume [B, 1, D, H, W] -> patch tokens [B, N3, hidden_size].

    N3 = d*h*w with (d, h, w) = img_size // patch_size.
    """

    def __init__(self, cfg: Encoder3DConfig) -> None:
        super().__init__()
        img, patch = tuple(int(v) for v in cfg.img_size), tuple(int(v) for v in cfg.patch_size)
        if len(img) != 3 or len(patch) != 3 or any(i % p for i, p in zip(img, patch)):
            raise ValueError(f"encoder3d.img_size {img} must be divisible by encoder3d.patch_size {patch}")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"encoder3d.hidden_size ({cfg.hidden_size}) must be divisible by encoder3d.num_heads ({cfg.num_heads})"
            )
        if not 0.0 <= cfg.dropout <= 1.0:
            raise ValueError(f"encoder3d.dropout must be in [0, 1], got {cfg.dropout}")
        cls_token = cfg.weights_key_map == "m3d_clip"
        self.net = ViT(
            in_channels=1,
            img_size=img,
            patch_size=patch,
            hidden_size=cfg.hidden_size,
            mlp_dim=cfg.mlp_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            dropout_rate=cfg.dropout,
            spatial_dims=3,
            classification=cls_token,
        )
        if cls_token:  # keep the cls token (MONAI's forward prepends it), drop the unused head
            del self.net.classification_head
        self.img_size = img
        self.grid: tuple[int, int, int] = tuple(i // p for i, p in zip(img, patch))  # type: ignore[assignment]
        self.out_dim = int(cfg.hidden_size)
        self.grad_checkpointing = bool(cfg.gradient_checkpointing)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B, 1, D, H, W] -> tokens [B, d*h*w, out_dim]."""
        _check_volume(volume, self.img_size)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = self._checkpointed_net(volume)
        else:
            x, _ = self.net(volume)
        if hasattr(self.net, "cls_token"):
            x = x[:, 1:]
        return x

    def _checkpointed_net(self, volume: torch.Tensor) -> torch.Tensor:
        """MONAI `ViT.forward` (monai 1.6) with each block checkpointed -> normed hidden states [B, L, C].

        Our ViT has no classification head (cls token, if any, is still prepended) and the
        per-block hidden states MONAI also returns are not needed, so they are not kept.
        """
        net = self.net
        x = net.patch_embedding(volume)
        if hasattr(net, "cls_token"):
            x = torch.cat((net.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in net.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return net.norm(x)


class ResNetEncoder3D(nn.Module):
    """MONAI 3D ResNet (basic blocks): volume [B, 1, D, H, W] -> tokens [B, d*h*w, widths[-1]]."""

    def __init__(self, cfg: Encoder3DConfig) -> None:
        super().__init__()
        layers, widths = tuple(cfg.resnet_layers), tuple(cfg.resnet_widths)
        if len(layers) != 4 or len(widths) != 4 or min(layers + widths) < 1:
            raise ValueError(
                "encoder3d.resnet_layers and encoder3d.resnet_widths must each be 4 positive integers "
                f"(MONAI's ResNet has 4 stages), got {layers} and {widths}"
            )
        self.net = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=int(cfg.resnet_conv1_stride),
            no_max_pool=not cfg.resnet_max_pool,
            feed_forward=False,
        )
        self.net.avgpool = nn.Identity()  # MONAI's forward then returns the flattened last map
        self.img_size = tuple(int(v) for v in cfg.img_size)
        self.grid = resnet_grid(self.img_size, cfg.resnet_conv1_stride, cfg.resnet_max_pool)
        self.out_dim = int(widths[-1])  # basic block: expansion 1
        self.grad_checkpointing = bool(cfg.gradient_checkpointing)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B, 1, D, H, W] -> tokens [B, d*h*w, out_dim]."""
        _check_volume(volume, self.img_size)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            flat = self._checkpointed_net(volume)
        else:
            flat = self.net(volume)  # [B, C*d*h*w], flattened from [B, C, d, h, w]
        d, h, w = self.grid
        return rearrange(flat, "b (c d h w) -> b (d h w) c", c=self.out_dim, d=d, h=h, w=w)

    def _checkpointed_net(self, volume: torch.Tensor) -> torch.Tensor:
        """MONAI `ResNet.forward` (monai 1.6) with layer1..layer4 checkpointed -> [B, C*d*h*w].

        avgpool is our `nn.Identity` and `fc` is None (`feed_forward=False`), as in `__init__`.
        """
        net = self.net
        x = net.act(net.bn1(net.conv1(volume)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = checkpoint(layer, x, use_reentrant=False,
                           context_fn=lambda layer=layer: (contextlib.nullcontext(), _keep_bn_stats(layer)))
        x = net.avgpool(x)
        return x.view(x.size(0), -1)


@contextlib.contextmanager
def _keep_bn_stats(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of `module` on exit (used around a recomputation)."""
    saved = [(buf, buf.clone()) for m in module.modules() if isinstance(m, _BatchNorm)
             for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def resnet_grid(img_size: tuple[int, ...], conv1_stride: int = 1, max_pool: bool = True) -> tuple[int, int, int]:
    """Last feature-map size of MONAI's ResNet for `img_size`.

    conv1 (k7, p3, stride `conv1_stride` of 1 or 2) maps n to ceil(n / stride); the max-pool (k3, p1,
    stride 2), when present, and layers 2-4 (conv k3 p1 stride 2) each map n to ceil(n / 2).
    """
    if conv1_stride not in (1, 2):
        raise ValueError(f"encoder3d.resnet_conv1_stride must be 1 or 2, got {conv1_stride}")
    halvings = 3 + int(max_pool) + int(conv1_stride == 2)
    return tuple(math.ceil(int(n) / 2**halvings) for n in img_size)  # type: ignore[return-value]


def _check_volume(volume: torch.Tensor, img_size: tuple[int, ...]) -> None:
    if volume.ndim != 5 or volume.shape[1] != 1 or tuple(volume.shape[2:]) != tuple(img_size):
        raise ValueError(
            f"3D encoder expected a volume [B, 1, {', '.join(map(str, img_size))}] (encoder3d.img_size), "
            f"got {list(volume.shape)}"
        )


@ENCODERS3D.register("vit")
def _build_vit(cfg: Encoder3DConfig) -> nn.Module:
    return ViTEncoder3D(cfg)


@ENCODERS3D.register("resnet")
def _build_resnet(cfg: Encoder3DConfig) -> nn.Module:
    return ResNetEncoder3D(cfg)


def build_encoder3d(cfg: Encoder3DConfig) -> nn.Module:
    """Build the encoder named by `cfg.arch` (randomly initialised; see `load_encoder3d_weights`)."""
    return ENCODERS3D.build(cfg.arch, cfg)


def create_encoder3d(preset_name: str, **overrides: Any) -> nn.Module:
    """timm-style factory: `create_encoder3d("vit3d_tiny", hidden_size=32)`.

    The preset's fields (`PRESETS[Encoder3DConfig]` above) come first, then the overrides; an
    unknown preset or field is a ConfigError. If the config names `weights`, they are loaded.
    """
    cfg = from_dict(Encoder3DConfig, {"preset": preset_name, **overrides}, prefix="encoder3d")
    module = build_encoder3d(cfg)
    if cfg.weights:
        load_encoder3d_weights(module, cfg.weights, cfg.weights_key_map)
    return module
