"""3D encoders: shapes, grids, argument checks, presets, and weight loading (safe formats only)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from monai.networks.nets import ViT
from safetensors.torch import save_file

from medvlm3d.config import ConfigError, Encoder3DConfig
from medvlm3d.model.encoder3d import (
    ENCODERS3D,
    build_encoder3d,
    create_encoder3d,
    load_encoder3d_weights,
    map_m3d_clip_keys,
    resnet_grid,
)

VIT = dict(arch="vit", img_size=(16, 32, 32), patch_size=(4, 16, 16), hidden_size=32, num_layers=1, num_heads=2,
           mlp_dim=64)
RESNET = dict(arch="resnet", img_size=(16, 32, 32), resnet_layers=(1, 1, 1, 1), resnet_widths=(4, 8, 8, 16))


def vit_cfg(**kw) -> Encoder3DConfig:
    return Encoder3DConfig(**{**VIT, **kw})


def test_registry_names():
    assert ENCODERS3D.names() == ["resnet", "vit"]
    with pytest.raises(ConfigError, match=r"encoder3d\.arch must be one of \['resnet', 'vit'\], got 'swin'"):
        Encoder3DConfig(arch="swin")
    with pytest.raises(ValueError, match="unknown 3D encoder 'swin'"):
        ENCODERS3D.build("swin", vit_cfg())


def test_vit_tokens_shape_and_grid():
    enc = build_encoder3d(vit_cfg())
    assert enc.grid == (4, 2, 2) and enc.out_dim == 32
    out = enc(torch.rand(2, 1, 16, 32, 32))
    assert out.shape == (2, 16, 32)
    assert not hasattr(enc.net, "cls_token")


def test_vit_rejects_indivisible_img_size():
    with pytest.raises(ValueError, match=r"img_size \(16, 30, 32\) must be divisible by encoder3d.patch_size"):
        build_encoder3d(vit_cfg(img_size=(16, 30, 32)))
    with pytest.raises(ValueError, match="divisible by encoder3d.num_heads"):
        build_encoder3d(vit_cfg(num_heads=3))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_forward_rejects_wrong_volume_shape(arch):
    enc = build_encoder3d(Encoder3DConfig(**(VIT if arch == "vit" else RESNET)))
    with pytest.raises(ValueError, match=r"expected a volume \[B, 1, 16, 32, 32\].*got \[1, 1, 16, 32, 16\]"):
        enc(torch.rand(1, 1, 16, 32, 16))
    with pytest.raises(ValueError, match="expected a volume"):
        enc(torch.rand(1, 16, 32, 32))


def test_resnet_tokens_match_feature_map():
    enc = build_encoder3d(Encoder3DConfig(**RESNET)).eval()
    assert enc.grid == (1, 2, 2) and enc.out_dim == 16
    x = torch.rand(2, 1, 16, 32, 32)
    tokens = enc(x)
    assert tokens.shape == (2, 4, 16)
    # reference: the feature map of layer4 computed stage by stage, flattened row-major (d, h, w)
    n = enc.net
    fmap = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.act(n.bn1(n.conv1(x))))))))
    assert fmap.shape == (2, 16, 1, 2, 2)
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("size", [(16, 32, 32), (17, 33, 8), (5, 48, 20)])
@pytest.mark.parametrize("stem", [(1, True), (2, False), (2, True)], ids=["monai", "strided", "strided+pool"])
def test_resnet_grid_formula_matches_network(size, stem):
    stride, max_pool = stem
    cfg = Encoder3DConfig(**{**RESNET, "img_size": size, "resnet_conv1_stride": stride, "resnet_max_pool": max_pool})
    enc = build_encoder3d(cfg).eval()
    assert enc.grid == resnet_grid(size, stride, max_pool)
    with torch.no_grad():
        out = enc(torch.rand(1, 1, *size))
    assert out.shape == (1, enc.grid[0] * enc.grid[1] * enc.grid[2], 16)


def test_resnet_strided_stem_keeps_the_grid_and_drops_the_pool():
    enc = build_encoder3d(Encoder3DConfig(**{**RESNET, "resnet_conv1_stride": 2, "resnet_max_pool": False}))
    assert enc.grid == build_encoder3d(Encoder3DConfig(**RESNET)).grid == (1, 2, 2)
    assert enc.net.conv1.stride == (2, 2, 2) and enc.net.no_max_pool
    with pytest.raises(ConfigError, match=r"resnet_conv1_stride must be one of \[1, 2\], got 3"):
        Encoder3DConfig(**{**RESNET, "resnet_conv1_stride": 3})
    with pytest.raises(ValueError, match="resnet_conv1_stride must be 1 or 2"):
        resnet_grid((16, 32, 32), 4)


def test_resnet_rejects_bad_stages():
    with pytest.raises(ValueError, match="must each be 4 positive integers"):
        build_encoder3d(Encoder3DConfig(**{**RESNET, "resnet_layers": (1, 1, 1)}))


def test_create_encoder3d_preset_and_overrides():
    enc = create_encoder3d("vit3d_tiny", img_size=(16, 32, 32), hidden_size=32, num_layers=1, num_heads=2)
    assert enc.grid == (4, 2, 2) and enc.out_dim == 32
    with pytest.raises(ValueError, match=r"encoder3d\.preset: unknown preset 'nope'"):
        create_encoder3d("nope")
    with pytest.raises(ValueError, match=r"unknown config key 'encoder3d\.depth'"):
        create_encoder3d("vit3d_tiny", depth=3)


def test_load_own_weights_from_safetensors(tmp_path):
    src, dst = build_encoder3d(vit_cfg()), build_encoder3d(vit_cfg())
    path = tmp_path / "enc.safetensors"
    save_file(src.state_dict(), str(path))  # keys with the wrapper's "net." prefix
    report = load_encoder3d_weights(dst, path)
    assert report["unexpected"] == [] and report["missing"] == []
    x = torch.rand(1, 1, 16, 32, 32)
    torch.testing.assert_close(src(x), dst(x))
    # a bare MONAI state dict (no "net." prefix) in a torch file loads too
    torch.save(src.net.state_dict(), tmp_path / "bare.pt")
    dst2 = build_encoder3d(vit_cfg())
    load_encoder3d_weights(dst2, tmp_path / "bare.pt")
    torch.testing.assert_close(src(x), dst2(x))


def test_create_encoder3d_loads_weights(tmp_path):
    src = build_encoder3d(vit_cfg())
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    kw = {k: v for k, v in VIT.items() if k != "arch"}
    enc = create_encoder3d("vit3d_tiny", weights=str(tmp_path / "w.safetensors"), **kw)
    torch.testing.assert_close(enc.net.norm.weight, src.net.norm.weight)


def test_load_weights_errors(tmp_path):
    enc = build_encoder3d(vit_cfg())
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_encoder3d_weights(enc, missing)
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no key of 3D encoder weights .*other.safetensors matched"):
        load_encoder3d_weights(enc, tmp_path / "other.safetensors")
    wrong = build_encoder3d(vit_cfg(hidden_size=16))
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="do not fit the configured encoder"):
        load_encoder3d_weights(enc, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="key_map must be"):
        load_encoder3d_weights(enc, tmp_path / "wrong.safetensors", key_map="clip")


@dataclasses.dataclass
class _Arbitrary:
    payload: str = "x"


def test_refuses_pickle_only_file(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Arbitrary()}, path)
    with pytest.raises(ValueError, match="evil.pt.*weights_only=True"):
        load_encoder3d_weights(build_encoder3d(vit_cfg()), path)


def _m3d_clip_state_dict() -> tuple[ViT, dict[str, torch.Tensor]]:
    """An M3D-CLIP-like model: perceptron patch embedding, cls token, wrapped whole-model keys."""
    ref = ViT(1, (16, 32, 32), (4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2,
              proj_type="perceptron", classification=True).eval()
    sd = {f"module.vision_encoder.{k}": v for k, v in ref.state_dict().items()}
    sd["module.vision_encoder.blocks.0.cross_attn.out_proj.weight"] = torch.zeros(32, 32)  # stale (old MONAI)
    sd["module.mm_vision_proj.weight"] = torch.zeros(32, 32)
    sd["module.language_encoder.embeddings.word_embeddings.weight"] = torch.zeros(10, 32)
    del ref.classification_head  # M3D's ViT has none in forward: it returns the normed tokens
    return ref, sd


def test_m3d_clip_key_map(tmp_path, caplog):
    ref, sd = _m3d_clip_state_dict()
    path = tmp_path / "m3d_clip.safetensors"
    save_file(sd, str(path))
    enc = build_encoder3d(vit_cfg(weights_key_map="m3d_clip")).eval()
    assert hasattr(enc.net, "cls_token") and not hasattr(enc.net, "classification_head")
    with caplog.at_level(logging.WARNING):
        report = load_encoder3d_weights(enc, path, key_map="m3d_clip")
    assert report["missing"] == [] and report["unexpected"] == []
    x = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        expected = ref(x)[0][:, 1:]  # M3D-LaMed's "patch" features of the last layer
        got = enc(x)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_m3d_clip_map_prefixes_and_cls_drop(tmp_path, caplog):
    _, sd = _m3d_clip_state_dict()
    lamed = {k.replace("module.vision_encoder.", "model.vision_tower.vision_tower."): v for k, v in sd.items()}
    enc = build_encoder3d(vit_cfg())  # built without a cls token
    mapped = map_m3d_clip_keys(lamed, enc.net.state_dict())
    assert "patch_embedding.patch_embeddings.weight" in mapped
    assert mapped["patch_embedding.patch_embeddings.weight"].shape == (32, 1, 4, 16, 16)
    assert not any("cross_attn." in k and "norm" not in k for k in mapped)
    assert not any(k.startswith(("mm_vision_proj", "language_encoder", "classification_head")) for k in mapped)
    save_file(lamed, str(tmp_path / "lamed.safetensors"))
    with caplog.at_level(logging.WARNING):
        report = load_encoder3d_weights(enc, tmp_path / "lamed.safetensors", key_map="m3d_clip")
    assert report["unexpected"] == ["cls_token"]
    assert "cls token" in caplog.text


# ------------------------------------------------------------------------- gradient checkpointing

CKPT_CASES = {
    "vit": dict(VIT, num_layers=2, dropout=0.1),  # dropout: the recomputation must replay the same masks
    "vit-cls": dict(VIT, num_layers=2, weights_key_map="m3d_clip"),
    "resnet": RESNET,
}


def _ckpt_pair(case: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same encoder with checkpointing off and on, same weights, both in training mode."""
    torch.manual_seed(0)
    off = build_encoder3d(Encoder3DConfig(**CKPT_CASES[case]))
    on = build_encoder3d(Encoder3DConfig(**CKPT_CASES[case], gradient_checkpointing=True))
    on.load_state_dict(off.state_dict())
    assert on.grad_checkpointing and not off.grad_checkpointing
    return off.train(), on.train()


def _step(enc: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    out = enc(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Count calls of `module` (a pre-hook: a recomputation stops early, before any forward hook)."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_checkpointing_gives_same_output_grads_and_bn_stats(case):
    off, on = _ckpt_pair(case)
    x = torch.rand(2, 1, 16, 32, 32)
    out_off, g_off = _step(off, x)
    out_on, g_on = _step(on, x)
    assert torch.allclose(out_on, out_off, atol=1e-6)
    assert sorted(g_on) == sorted(g_off) and len(g_on) > 4
    for name in g_off:
        assert torch.allclose(g_on[name], g_off[name], atol=1e-6), name
    for (name, a), (_, b) in zip(off.named_buffers(), on.named_buffers()):  # BN stats updated once
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", ["vit", "resnet"])
def test_checkpointing_recomputes_blocks_only_when_training(case):
    off, on = _ckpt_pair(case)
    block = (lambda e: e.net.blocks[0]) if case.startswith("vit") else (lambda e: e.net.layer1)
    calls_off, calls_on = _count_calls(block(off)), _count_calls(block(on))
    x = torch.rand(1, 1, 16, 32, 32)
    _step(off, x)
    _step(on, x)
    assert (len(calls_off), len(calls_on)) == (1, 2)  # forward, + recomputation in backward
    calls_on.clear()
    with torch.no_grad():
        on(x)
    on.eval()(x).sum().backward()
    assert len(calls_on) == 2  # no_grad and eval: MONAI's own forward, run once each
