"""Real-weight key layouts (issue 18): M3D-CLIP's vision tower, SigLIP-L/16-256 in timm's layout,
a BERT folder for the TG-IS text feature.

At real size the checkpoints' names and shapes come from the reference architectures built on
the meta device (no memory, no download): M3D-CLIP's vision tower is MONAI's ViT with M3D-CLIP's
config (perceptron patch embedding, cls token; the whole-model checkpoint prefixes it with
`vision_encoder.` beside `language_encoder.` (BERT-base), `mm_vision_proj.`, `mm_language_proj.`,
`logit_scale`); SigLIP-L is timm's `vit_large_patch16_siglip_256` with its MAP head. Every key our
model needs must be consumed, none missing, same shapes. At small width the same layouts are
written to files and loaded through our loaders, and a missing key is an error that names it.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import ViT
from safetensors.torch import load_file, save_file

from medvlm3d.config import ConfigError, load_config
from medvlm3d.model.encoder3d import build_encoder3d, load_encoder3d_weights, map_m3d_clip_keys
from medvlm3d.model.slice_encoder import SliceEncoder, SliceEncoderConfig, check_complete

SIGLIP = "vit_large_patch16_siglip_256"


def m3d_clip_checkpoint(size: tuple[int, int, int], hidden: int, mlp: int, layers: int, heads: int) -> dict:
    """Key names and shapes of M3D-CLIP's whole-model checkpoint (vision part built for real)."""
    vit = ViT(1, size, (4, 16, 16), hidden_size=hidden, mlp_dim=mlp, num_layers=layers, num_heads=heads,
              proj_type="perceptron", classification=True)
    sd = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("classification_head")}
    dev = next(iter(sd.values())).device
    sd |= {"mm_vision_proj.weight": torch.zeros(512, hidden, device=dev), "mm_vision_proj.bias": torch.zeros(512, device=dev),
           "language_encoder.embeddings.word_embeddings.weight": torch.zeros(30522, hidden, device=dev),
           "logit_scale": torch.zeros((), device=dev)}
    return sd


def test_m3d_clip_vision_tower_at_real_size_fills_every_key():
    enc_cfg = load_config("med2e3").model.encoder3d
    with torch.device("meta"):
        ckpt = m3d_clip_checkpoint(tuple(enc_cfg.img_size), 768, 3072, 12, 12)
        enc = build_encoder3d(enc_cfg)
    target = enc.net.state_dict()
    mapped = map_m3d_clip_keys(ckpt, target)
    missing = [k for k in target if k not in mapped and ".norm_cross_attn." not in k]
    assert missing == [] and sorted(k for k in mapped if k not in target) == []
    wrong = {k: (tuple(mapped[k].shape), tuple(v.shape)) for k, v in target.items() if k in mapped and mapped[k].shape != v.shape}
    assert wrong == {}
    assert tuple(mapped["patch_embedding.patch_embeddings.weight"].shape) == (768, 1, 4, 16, 16)
    assert tuple(mapped["patch_embedding.position_embeddings"].shape) == (1, 2048, 768)
    assert sum(v.numel() for v in target.values()) == pytest.approx(87.4e6, rel=1e-2)


def tiny_vit_cfg():
    return load_config("tiny", ["model.encoder3d.preset=vit3d_tiny", "model.encoder3d.hidden_size=32",
                                "model.encoder3d.num_layers=2", "model.encoder3d.num_heads=2", "model.encoder3d.mlp_dim=64",
                                "data.size=[16,32,32]", "model.encoder3d.weights_key_map=m3d_clip"]).model.encoder3d


def test_m3d_clip_checkpoint_loads_through_our_loader_and_a_missing_key_is_named(tmp_path):
    ckpt = m3d_clip_checkpoint((16, 32, 32), 32, 64, 2, 2)
    path = tmp_path / "pytorch_model.safetensors"
    save_file(ckpt, str(path))
    enc = build_encoder3d(tiny_vit_cfg())
    report = load_encoder3d_weights(enc, path, key_map="m3d_clip")
    assert [k for k in report["missing"] if ".norm_cross_attn." not in k] == []
    assert report["unexpected"] == []
    torch.testing.assert_close(enc.net.blocks[1].mlp.linear2.weight, ckpt["vision_encoder.blocks.1.mlp.linear2.weight"])
    del ckpt["vision_encoder.blocks.1.attn.qkv.weight"]
    save_file(ckpt, str(path))
    with pytest.raises(ValueError, match=r"lack 1 of the encoder's keys.*blocks\.1\.attn\.qkv\.weight"):
        load_encoder3d_weights(build_encoder3d(tiny_vit_cfg()), path, key_map="m3d_clip")


def test_siglip_large_timm_layout_at_real_size_fills_every_key():
    import timm

    with torch.device("meta"):
        released = timm.create_model(SIGLIP)  # the published layout, MAP head included
        ours = SliceEncoder(SliceEncoderConfig(model_name=SIGLIP, in_chans=3, num_tokens=256, normalize="none"),
                            (256, 256), load_weights=False)
    full, own = released.state_dict(), ours.backbone.state_dict()
    check_complete(ours.backbone, full, "released", SIGLIP)  # no missing key, only the head left over
    assert {k.split(".")[0] for k in full if k not in own} == {"attn_pool"}
    assert all(full[k].shape == v.shape for k, v in own.items())
    assert tuple(own["pos_embed"].shape) == (1, 256, 1024) and ours.out_dim == 1024
    assert math.isclose(sum(v.numel() for v in own.values()), 303.36e6, rel_tol=1e-3)


def test_siglip_file_loads_whole_or_names_what_is_missing(tmp_path):
    import timm

    kw = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    src = timm.create_model(SIGLIP, img_size=(32, 32), **kw)
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    cfg = dict(model_name=SIGLIP, in_chans=3, num_tokens=4, model_kwargs=kw)
    enc = SliceEncoder(SliceEncoderConfig(weights=str(path), **cfg), (32, 32))
    for k, v in enc.backbone.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k])
    sd = load_file(str(path))
    del sd["blocks.1.mlp.fc2.weight"]
    save_file(sd | {"blocks.0.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"1 missing keys \['blocks\.1\.mlp\.fc2\.weight'\], 1 unexpected keys "
                                         r"\['blocks\.0\.extra\.weight'\]"):
        SliceEncoder(SliceEncoderConfig(weights=str(path), **cfg), (32, 32))


def test_bert_folder_loads_every_key_or_names_the_missing_ones(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    from medvlm3d.model.llm import TextEncoder

    with torch.device("meta"):  # M3D-CLIP's language_encoder: BERT-base (bert-base-uncased's config)
        base = BertModel(BertConfig())
    assert tuple(base.pooler.dense.weight.shape) == (768, 768)  # pooler_output -> TG-IS text_proj 768 -> 3072
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    bert.save_pretrained(tmp_path)
    enc = TextEncoder(str(tmp_path), out_pooling="pooler")
    assert enc.out_dim == 16
    for k, v in enc.encoder.state_dict().items():
        torch.testing.assert_close(v, bert.state_dict()[k])
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("pooler.")}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing \['pooler\.dense\.(weight|bias)"):
        TextEncoder(str(tmp_path), out_pooling="pooler")
