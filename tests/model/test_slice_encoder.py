"""SliceEncoder: token shapes for CNN and ViT backbones, masking, chunking, weights, argument checks."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from medvlm3d.config import SliceEncoderConfig
from medvlm3d.model.slice_encoder import SliceEncoder
from medvlm3d.data.errors import ConfigError

TINY_VIT = dict(model_name="vit_tiny_patch16_224",
                model_kwargs=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2))
TINY_RESNET = dict(model_name="resnet18", model_kwargs=dict(layers=[1, 1, 1, 1]))


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _count_rows(module: torch.nn.Module) -> list[int]:
    """Record the batch size of every call of `module` (the stem: forward_features skips top hooks)."""
    rows: list[int] = []
    module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows


def test_resnet_shapes_and_padding_zero():
    enc = SliceEncoder(SliceEncoderConfig(**TINY_RESNET, num_tokens=4), (32, 32)).eval()
    assert enc.out_dim == 512 and enc.num_tokens == 4
    mask = _mask([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = enc(torch.rand(2, 4, 1, 32, 32), mask)
    assert out.shape == (2, 4, 4, 512)
    assert torch.all(out[~mask] == 0) and out[mask].abs().sum() > 0
    assert enc.pooled(torch.rand(2, 4, 1, 32, 32), mask).shape == (2, 4, 512)


def test_vit_drops_prefix_tokens_and_pools_grid():
    enc = SliceEncoder(SliceEncoderConfig(**TINY_VIT, num_tokens=4), (32, 32)).eval()
    assert enc.out_dim == 32 and enc.backbone.num_prefix_tokens == 1
    x = torch.rand(1, 2, 1, 32, 32)
    out = enc(x, _mask([[1, 1]]))
    assert out.shape == (1, 2, 4, 32)
    # reference: patch tokens (4x4 grid) averaged over 2x2 blocks -> 4 tokens, row-major
    with torch.no_grad():
        feats = enc.backbone.forward_features((x[0] - enc.mean) / enc.std)[:, 1:]  # [2, 16, 32]
    grid = feats.reshape(2, 4, 4, 32)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    bottom_right = grid[:, 2:, 2:].mean(dim=(1, 2))
    torch.testing.assert_close(out[0, :, 0], top_left)
    torch.testing.assert_close(out[0, :, 3], bottom_right)


def test_vit_non_square_slices_and_rgb_repeat():
    enc = SliceEncoder(SliceEncoderConfig(**TINY_VIT, num_tokens=1, in_chans=3), (32, 48)).eval()
    assert enc.backbone.patch_embed.grid_size == (4, 6)
    out = enc(torch.rand(1, 3, 1, 32, 48), _mask([[1, 1, 0]]))
    assert out.shape == (1, 3, 1, 32)


def test_chunking_matches_one_chunk_and_skips_padding():
    torch.manual_seed(0)
    big = SliceEncoder(SliceEncoderConfig(**TINY_RESNET, chunk_size=64), (32, 32)).eval()
    small = SliceEncoder(SliceEncoderConfig(**TINY_RESNET, chunk_size=2), (32, 32)).eval()
    small.load_state_dict(big.state_dict())
    rows_big, rows_small = _count_rows(big.backbone.conv1), _count_rows(small.backbone.conv1)
    x = torch.rand(2, 4, 1, 32, 32)
    mask = _mask([[1, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        a, b = big(x, mask), small(x, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert rows_big == [5] and rows_small == [2, 2, 1]  # 5 real slices, never the 3 padded ones
    rows_big.clear()
    out = big(x, torch.zeros(2, 4, dtype=torch.bool))
    assert rows_big == [] and out.shape == (2, 4, 4, 512) and torch.all(out == 0)


def test_padded_content_does_not_leak():
    enc = SliceEncoder(SliceEncoderConfig(**TINY_RESNET), (32, 32)).eval()
    x = torch.rand(1, 3, 1, 32, 32)
    y = x.clone()
    y[0, 2] = 100.0  # padded slice content changes
    mask = _mask([[1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(enc(x, mask), enc(y, mask))


def test_gradients_flow_to_backbone():
    enc = SliceEncoder(SliceEncoderConfig(**TINY_VIT), (32, 32))
    enc(torch.rand(1, 2, 1, 32, 32), _mask([[1, 0]])).sum().backward()
    assert enc.backbone.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "timm/vit_tiny_patch16_224",
                                  "local-dir:/models/vit"])
def test_a_hub_model_name_is_a_config_error_and_nothing_is_fetched(name, monkeypatch):
    import timm

    def no_network(*_a, **_k):
        raise AssertionError("timm.create_model was reached")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(ConfigError, match="names a model hub; nothing is downloaded"):
        SliceEncoder(SliceEncoderConfig(model_name=name), (32, 32))


@pytest.mark.parametrize("kwargs", [{"no_such_kwarg": 1}, {"depth": 1, "embed_dims": 32}])
def test_bad_model_kwargs_are_a_config_error_naming_the_key(kwargs):
    with pytest.raises(ConfigError, match=r"slice_encoder.model_kwargs .* do not fit timm model 'vit_tiny_patch16_224'"):
        SliceEncoder(SliceEncoderConfig(model_name="vit_tiny_patch16_224", model_kwargs=kwargs), (32, 32))


def test_a_tagged_timm_name_is_accepted():
    from medvlm3d.model.slice_encoder import check_model_name

    check_model_name("vit_tiny_patch16_224.augreg_in21k")  # a pretrained tag, no hub
    with pytest.raises(ConfigError, match="similar names"):
        check_model_name("vit_tiny_patch16_999")


@pytest.mark.parametrize("tokens", [2, 5, 8])
def test_rejects_non_square_num_tokens(tokens):
    with pytest.raises(ValueError, match="num_tokens must be a perfect square"):
        SliceEncoder(SliceEncoderConfig(**TINY_RESNET, num_tokens=tokens), (32, 32))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"img_size must be \(h, w\)"):
        SliceEncoder(SliceEncoderConfig(**TINY_RESNET), (32, 32, 32))
    with pytest.raises(ConfigError, match="'no_such_net' is not a timm architecture"):
        SliceEncoder(SliceEncoderConfig(model_name="no_such_net"), (32, 32))
    enc = SliceEncoder(SliceEncoderConfig(**TINY_RESNET), (32, 32))
    with pytest.raises(ValueError, match=r"expected slices \[B, S, 1, 32, 32\].*got \[1, 2, 1, 16, 16\]"):
        enc(torch.rand(1, 2, 1, 16, 16), _mask([[1, 1]]))
    with pytest.raises(ValueError, match="expected a bool mask"):
        enc(torch.rand(1, 2, 1, 32, 32), torch.ones(1, 2))
    with pytest.raises(ValueError, match="expected a bool mask"):
        enc(torch.rand(1, 2, 1, 32, 32), _mask([[1, 1, 1]]))


def test_loads_local_weights_and_adapts_in_chans(tmp_path):
    src = timm.create_model("resnet18", pretrained=False, num_classes=10, layers=[1, 1, 1, 1])  # RGB + head
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))
    enc = SliceEncoder(SliceEncoderConfig(**TINY_RESNET, weights=str(path)), (32, 32))
    torch.testing.assert_close(enc.backbone.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    torch.testing.assert_close(enc.backbone.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    skipped = SliceEncoder(SliceEncoderConfig(**TINY_RESNET, weights=str(path)), (32, 32), load_weights=False)
    assert not torch.equal(skipped.backbone.layer4[0].conv1.weight, src.layer4[0].conv1.weight)


def test_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        SliceEncoder(SliceEncoderConfig(**TINY_RESNET, weights=str(tmp_path / "nowhere.safetensors")), (32, 32))
    save_file({"unrelated.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no tensor of slice encoder weights .*other.safetensors matched"):
        SliceEncoder(SliceEncoderConfig(**TINY_RESNET, weights=str(tmp_path / "other.safetensors")), (32, 32))
    torch.save({"obj": object.__new__(SliceEncoderConfig)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="pickled.pt.*weights_only=True"):
        SliceEncoder(SliceEncoderConfig(**TINY_RESNET, weights=str(tmp_path / "pickled.pt")), (32, 32))


# ------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_gradient_checkpointing_same_output_and_grads_and_recomputes(spec):
    torch.manual_seed(0)
    off = SliceEncoder(SliceEncoderConfig(**spec), (32, 32)).train()
    on = SliceEncoder(SliceEncoderConfig(**spec, gradient_checkpointing=True), (32, 32)).train()
    on.load_state_dict(off.state_dict())
    assert on.backbone.grad_checkpointing and not off.backbone.grad_checkpointing
    block = (lambda e: e.backbone.blocks[0]) if "vit" in spec["model_name"] else (lambda e: e.backbone.layer1[0])
    calls = {"off": [], "on": []}
    for name, enc in (("off", off), ("on", on)):
        # a pre-hook: the recomputation in backward stops early, before any forward hook would run
        block(enc).register_forward_pre_hook(lambda m, a, name=name: calls[name].append(1))
    x, mask = torch.rand(1, 3, 1, 32, 32), _mask([[1, 1, 0]])
    outs, grads = {}, {}
    for name, enc in (("off", off), ("on", on)):
        out = enc(x, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[name] = out.detach()
        grads[name] = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
    assert (len(calls["off"]), len(calls["on"])) == (1, 2)  # forward, + recomputation in backward
    assert torch.allclose(outs["on"], outs["off"], atol=1e-6)
    assert sorted(grads["on"]) == sorted(grads["off"]) and len(grads["on"]) > 4
    for n in grads["off"]:
        assert torch.allclose(grads["on"][n], grads["off"][n], atol=1e-6), n


def test_gradient_checkpointing_unsupported_model_is_a_clear_error():
    with pytest.raises(ValueError, match="'dla46_c' does not support gradient checkpointing"):
        SliceEncoder(SliceEncoderConfig(model_name="dla46_c", gradient_checkpointing=True), (32, 32))
    SliceEncoder(SliceEncoderConfig(model_name="dla46_c"), (32, 32))  # fine without the flag
