"""`medvlm3d estimate`: parameter counts from a meta-device build, ZeRO sharding, activation
formulas, and the command line."""

from __future__ import annotations

import time

import pytest

from medvlm3d.cli import main
from medvlm3d.config import load_config
from medvlm3d.data.errors import ConfigError
from medvlm3d.train.estimate import GiB, estimate_memory
from medvlm3d.train.memory import ALL, LayerShape, layer_bytes


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    return tiny_cfg()


def test_counts_equal_a_real_build(tiny) -> None:
    from medvlm3d.model.medvlm import build_model
    from medvlm3d.model.trainable import count_parameters

    real = count_parameters(build_model(tiny).components())
    est = estimate_memory(tiny, dtype="fp32")["params"]
    assert set(est) == set(real)
    for name, row in real.items():
        assert est[name]["total"] == row["total"] and est[name]["trainable"] == row["trainable"], name
        assert est[name]["frozen"] == row["total"] - row["trainable"]
    assert est["llm"]["frozen"] > 0 and est["llm"]["trainable"] > 0  # LoRA


def test_fp32_weights_are_four_bytes_per_parameter(tiny) -> None:
    r = estimate_memory(tiny, gpus=1, dtype="fp32")
    p = r["params"]["total"]
    assert r["memory"][2]["weights"] == pytest.approx(4 * p["total"] / GiB)
    assert r["memory"][2]["optimizer"] == pytest.approx(8 * p["trainable"] / GiB)
    bf = estimate_memory(tiny, gpus=1, dtype="bf16")["memory"][2]
    assert bf["weights"] + bf["gradients"] + bf["optimizer"] == pytest.approx(
        (2 * p["total"] + 14 * p["trainable"]) / GiB)  # 16 bytes per trainable, 2 per frozen parameter


def test_zero3_shards_weights_and_zero2_does_not(tiny) -> None:
    one = estimate_memory(tiny, gpus=1, dtype="bf16")["memory"]
    eight = estimate_memory(tiny, gpus=8, dtype="bf16")["memory"]
    assert eight[3]["weights"] == pytest.approx(one[3]["weights"] / 8)
    assert eight[2]["weights"] == pytest.approx(one[2]["weights"])
    for stage in (2, 3):
        assert eight[stage]["optimizer"] == pytest.approx(one[stage]["optimizer"] / 8)
        assert eight[stage]["gradients"] == pytest.approx(one[stage]["gradients"] / 8)
        assert eight[stage]["activations"] == pytest.approx(one[stage]["activations"])  # not sharded
    assert eight[3]["zero3_gather"] > 0 and one[3]["zero3_gather"] == 0


def test_checkpointing_lowers_activations_and_frozen_encoders_keep_none(tiny_cfg) -> None:
    r = estimate_memory(tiny_cfg(), batch=4, dtype="bf16")
    acts, ckpt = r["activations"]["no_ckpt"], r["activations"]["ckpt"]
    assert ckpt["llm"] < acts["llm"] and ckpt["total"] < acts["total"]
    assert acts["encoder3d"] > 0 and acts["slice_encoder"] > 0  # tiny trains its encoders
    frozen = estimate_memory(load_config("tiny", [f"model.llm.tokenizer={tiny_cfg().model.llm.tokenizer}"],
                                         layers=["stage1_align"]), batch=4, dtype="bf16")["activations"]["no_ckpt"]
    assert frozen["encoder3d"] == 0 and frozen["slice_encoder"] == 0
    assert frozen["projector"] > 0 and frozen["llm"] > 0  # the frozen LLM still passes gradients back
    assert frozen["llm"] < acts["llm"]  # ... but keeps no linear inputs
    double = estimate_memory(tiny_cfg(), batch=8, dtype="bf16")["activations"]["no_ckpt"]
    assert double["total"] == 2 * acts["total"]


def test_layer_formula_reduces_to_korthikanti_without_dropout() -> None:
    s, h, a = 128, 256, 8
    gpt = LayerShape(seq=s, hidden=h, heads=a, q_dim=h, kv_dim=h, ffn=4 * h, fused=False)
    layer_norm_stats = 2 * s * 8
    assert layer_bytes(gpt, 2, ALL) - layer_norm_stats == 32 * s * h + 2 * a * s * s
    fused = LayerShape(seq=s, hidden=h, heads=a, q_dim=h, kv_dim=h, ffn=4 * h, fused=True)
    assert layer_bytes(fused, 2, ALL) < layer_bytes(gpt, 2, ALL)  # no s^2 attention matrix


def test_real_size_builds_on_meta_quickly() -> None:
    import medvlm3d.model.medvlm  # noqa: F401  (imports are not the build)

    cfg = load_config("real_0p5b", layers=["stage2_finetune"])
    t0 = time.perf_counter()
    r = estimate_memory(cfg, gpus=8, zero=3, batch=1)
    assert time.perf_counter() - t0 < 10
    assert 0.3e9 < r["params"]["llm"]["total"] < 0.5e9
    assert r["params"]["encoder3d"]["trainable"] == 0 and r["params"]["llm"]["trainable"] > 0
    assert r["tokens"] == {"3d": 256, "2d": 256, "per_image": 512, "encoder3d_grid_tokens": 2048, "slices": 32,
                           "slice_tokens": 256, "text": 512, "sequence": 1024}
    assert r["dtype"] == "bf16" and r["activations"]["no_ckpt"]["encoder3d"] == 0
    assert 0 < r["memory"][3]["total_ckpt"] < r["memory"][3]["total"] < 20


def test_llm_from_a_config_json_folder(tmp_path, tiny) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    hf = Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    cfg = load_config("tiny", [f"model.llm.path={tmp_path}", "model.trainable.llm=full"])
    r = estimate_memory(cfg)
    with torch.device("meta"):
        expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf).parameters())
    assert r["params"]["llm"]["total"] == expected == r["params"]["llm"]["trainable"]
    assert "config.json" in r["llm_source"]
    with pytest.raises(ConfigError, match="does not exist"):
        estimate_memory(load_config("tiny", [f"model.llm.path={tmp_path / 'missing'}"]))


def test_cli_prints_the_table(capsys, tiny) -> None:
    code = main(["estimate", "--config", "tiny", "--gpus", "4", "--zero", "2", "--batch", "2",
                 f"model.llm.tokenizer={tiny.model.llm.tokenizer}"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("parameters", "encoder3d", "visual tokens per image", "ZeRO-2*", "ZeRO-3", "optimizer states",
                 "activations (ckpt)", "total (ckpt)", "4 GPU(s)"):
        assert text in out, text


@pytest.mark.parametrize("args, message", [
    (["--zero", "1"], "--zero must be 2 or 3"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--dtype", "fp8"], "--dtype must be bf16 or fp32"),
    (["no_such.key=1"], "unknown config key"),
])
def test_cli_bad_arguments_exit_2(capsys, args, message) -> None:
    assert main(["estimate", "--config", "tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_api_bad_arguments(tiny) -> None:
    with pytest.raises(ValueError, match="gpus"):
        estimate_memory(tiny, gpus=0)
    with pytest.raises(ValueError, match="zero"):
        estimate_memory(tiny, zero=1)
    with pytest.raises(ValueError, match="dtype"):
        estimate_memory(tiny, dtype="fp16")
    with pytest.raises(ValueError, match="RunConfig"):
        estimate_memory({"model": {}})


def test_med2e3_as_shipped_sizes_its_bert_tower(capsys) -> None:
    """`medvlm3d estimate --config med2e3` (the README's command) runs with the text tower's folder
    unset: the tower is sized as BERT-base, frozen, and the output says so."""
    from medvlm3d.train.estimate import build_meta_model

    cfg = load_config("med2e3", layers=["stage2_finetune"])
    assert cfg.model.tgis.text_source == "hf" and not cfg.model.tgis.text_encoder
    model, source = build_meta_model(cfg)
    tower = sum(p.numel() for p in model.text_encoder.parameters())
    assert 109_000_000 < tower < 110_000_000 and not any(p.requires_grad for p in model.text_encoder.parameters())
    assert "BERT-base" in source
    assert main(["estimate", "--config", "med2e3", "--gpus", "8", "--zero", "3", "--batch", "2"]) == 0
    assert "total" in capsys.readouterr().out
