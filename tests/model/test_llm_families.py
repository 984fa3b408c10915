"""LLM families beyond the built-in llama/qwen2/phi3 (model/llm_family.py, model/llm.py): tiny
random models of each family, made from transformers' config classes and saved to a folder (no
download), then used as `model.llm.path` is: the memory estimate on the meta device, LoRA
`target_modules: auto`, the scale visual tokens enter at (Gemma scales its embeddings), and
the eager-attention fallback (Gemma2 refuses sdpa)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

from medvlm3d.config import load_config
from medvlm3d.data.errors import ConfigError
from medvlm3d.model.llm import LLMConfig, LoRAConfig, apply_lora, build_llm, load_tokenizer
from medvlm3d.model.llm_family import auto_lora_targets, embedding_rms, linear_names, lora_targets
from medvlm3d.train.estimate import estimate_memory

LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # name -> (config, the targets `auto` must choose)
    "llama": (lambda: tf.LlamaConfig(**SMALL), LLAMA_LIKE),
    "mistral": (lambda: tf.MistralConfig(**SMALL), LLAMA_LIKE),
    "qwen2": (lambda: tf.Qwen2Config(**SMALL), LLAMA_LIKE),
    "gemma": (lambda: tf.GemmaConfig(**SMALL, head_dim=8), LLAMA_LIKE),
    "gemma2": (lambda: tf.Gemma2Config(**SMALL, head_dim=8), LLAMA_LIKE),
    "gemma3": (lambda: tf.Gemma3TextConfig(**SMALL, head_dim=8), LLAMA_LIKE),
    "phi3": (lambda: tf.Phi3Config(**SMALL), ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=256),
             ["c_attn", "c_fc", "c_proj"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (make, _) in FAMILIES.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        tf.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").save_pretrained(folder)
        out[name] = folder
    return out


def _llm(folder: Path, tok_dir: Path, **kw) -> tuple[torch.nn.Module, object]:
    cfg = LLMConfig(path=str(folder), tokenizer=str(tok_dir), **kw)
    tok = load_tokenizer(cfg)
    return build_llm(cfg, tok), tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_estimate_runs_on_meta_and_auto_picks_the_family_targets(family, folders, tiny_tokenizer_dir) -> None:
    # the tokenizer (~400 tokens) is larger than the model's 300: the embeddings grow on meta
    cfg = load_config("tiny", [f"model.llm.path={folders[family]}", f"model.llm.tokenizer={tiny_tokenizer_dir}",
                               "model.trainable.llm=lora", "model.llm.lora.target_modules=auto"])
    r = estimate_memory(cfg)
    assert r["params"]["llm"]["total"] > 0 and 0 < r["params"]["llm"]["trainable"] < r["params"]["llm"]["total"]
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(FAMILIES[family][0]())
    assert auto_lora_targets(meta) == FAMILIES[family][1]


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gemma"])
def test_auto_lora_covers_every_linear_layer_but_the_head(family, folders, tiny_tokenizer_dir) -> None:
    model, _ = _llm(folders[family], tiny_tokenizer_dir, attn_implementation="eager")
    peft = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="auto"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "base_layer")}
    assert wrapped == set(FAMILIES[family][1]) and "lm_head" not in wrapped
    # every linear layer of the decoder has its adapter (Phi-3 once got 10,240 of 28,672 parameters)
    linear = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in FAMILIES[family][1]
              and not hasattr(m, "base_layer") and type(m).__name__ in ("Linear", "Conv1D")]
    assert len(linear) == 0  # none left unwrapped
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("family, names, listed", [
    ("phi3", ("q_proj", "k_proj", "v_proj", "o_proj"), "qkv_proj"),   # Llama names on Phi-3: no silent partial LoRA
    ("gpt2", ("q_proj",), "c_attn"),                                    # Conv1D layers are listed
    ("llama", ("query_key_value",), "gate_proj"),
])
def test_a_target_matching_nothing_is_a_config_error(family, names, listed, folders, tiny_tokenizer_dir) -> None:
    model, _ = _llm(folders[family], tiny_tokenizer_dir, attn_implementation="eager")
    with pytest.raises(ConfigError) as e:
        lora_targets(model, names)
    assert listed in str(e.value) and "auto" in str(e.value)
    assert listed in linear_names(model)
    with pytest.raises(ConfigError, match="stands alone"):
        lora_targets(model, ("auto", "q_proj"))


@pytest.mark.parametrize("family, names, left", [
    ("llama", ("q_proj", "v_proj"), "gate_proj"),   # attention only: the MLP types are named in the warning
    ("phi3", ("qkv_proj",), "down_proj"),
])
def test_a_target_matching_some_layer_types_warns_with_what_is_left(family, names, left, folders,
                                                                   tiny_tokenizer_dir, caplog) -> None:
    model, _ = _llm(folders[family], tiny_tokenizer_dir, attn_implementation="eager")
    with caplog.at_level(logging.WARNING):
        assert lora_targets(model, names) == list(names)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "without LoRA" in r.getMessage()]
    assert len(warned) == 1 and left in warned[0].getMessage() and str(list(names)) in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lora_targets(model, auto_lora_targets(model))
    assert "without LoRA" not in caplog.text


@pytest.mark.parametrize("family, scaled", [("gemma", True), ("gemma2", True), ("llama", False), ("gpt2", False)])
def test_visual_tokens_enter_at_the_scale_the_embedding_module_outputs(family, scaled, folders,
                                                                       tiny_tokenizer_dir) -> None:
    model, _ = _llm(folders[family], tiny_tokenizer_dir, attn_implementation="eager")
    table = model.get_input_embeddings().weight
    raw = float(table.float().pow(2).mean().sqrt())
    ids = torch.arange(table.shape[0])
    out = model.get_input_embeddings()(ids)
    assert embedding_rms(model) == pytest.approx(float(out.float().pow(2).mean().sqrt()), rel=1e-5)
    ratio = embedding_rms(model) / raw
    assert ratio == pytest.approx(math.sqrt(32) if scaled else 1.0, rel=1e-3)


def test_gemma2_falls_back_to_eager_attention_with_a_warning(folders, tiny_tokenizer_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        model, tok = _llm(folders["gemma2"], tiny_tokenizer_dir, attn_implementation="sdpa")
    assert model.config._attn_implementation == "eager"
    assert "model.llm.attn_implementation=sdpa" in caplog.text
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, len(tok))
    caplog.clear()
    _llm(folders["llama"], tiny_tokenizer_dir, attn_implementation="sdpa")  # sdpa is kept where supported
    assert "attn_implementation" not in caplog.text
