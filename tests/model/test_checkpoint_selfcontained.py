"""Self-contained checkpoints (model/checkpoint.py): the TG-IS text tower (tgis.text_source=hf)
is stored in the checkpoint, so removing the folder it came from changes nothing; an external
base LLM (frozen or LoRA-trained, not stored) is named in checkpoint.json, and its absence is one
clear DataError. A LoRA adapter over an external LLM whose vocabulary grew (`<image>`) stays
LoRA-sized: the new rows are stored alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medvlm3d.data.errors import DataError
from medvlm3d.model.checkpoint import init_from_checkpoint, load_pretrained, save_pretrained
from medvlm3d.model.medvlm import build_model


def test_the_text_tower_is_stored_and_the_source_folder_is_not_needed(tmp_path: Path, tiny_cfg, tiny_bert) -> None:
    source = tmp_path / "bert"
    shutil.copytree(tiny_bert, source)
    torch.manual_seed(0)
    cfg = tiny_cfg("model.tgis.text_source=hf", f"model.tgis.text_encoder={source}")
    model = build_model(cfg)
    out = save_pretrained(model, tmp_path / "ckpt")
    assert json.loads((out / "checkpoint.json").read_text())["text_encoder"] == "text_encoder"
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "text_encoder" / "tokenizer_config.json").is_file()
    shutil.rmtree(source)  # the folder the run named is gone
    questions = ["is there a lesion in the liver", "which organ"]
    want = model.text_encoder(questions)
    loaded = load_pretrained(out)
    assert torch.equal(loaded.text_encoder(questions), want)
    stage = init_from_checkpoint(cfg, out)  # a next stage whose config names the gone folder
    assert torch.equal(stage.text_encoder(questions), want)


def test_a_missing_external_base_llm_is_one_clear_error(tmp_path: Path, tiny_cfg) -> None:
    torch.manual_seed(0)
    base = build_model(tiny_cfg("model.trainable.llm=full"))
    external = tmp_path / "base_llm"
    base.llm.save_pretrained(external)
    base.tokenizer.save_pretrained(external)
    model = build_model(tiny_cfg(f"model.llm.path={external}", "model.trainable.llm=lora"))
    out = save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["llm_layout"] == "external+adapter" and meta["external_llm"] == str(external)
    assert load_pretrained(out) is not None  # the folder is there: it loads
    shutil.rmtree(external)
    for call in (lambda: load_pretrained(out), lambda: init_from_checkpoint(tiny_cfg(), out)):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert str(external) in msg and "checkpoint.json" in msg and "missing" in msg and "\n" not in msg


@pytest.mark.parametrize("tied", [False, True])
def test_a_lora_adapter_over_a_grown_vocabulary_stays_lora_sized(tmp_path: Path, tiny_cfg, tied: bool) -> None:
    import transformers as tf
    from safetensors import safe_open

    from medvlm3d.model import checkpoint as ckpt

    torch.manual_seed(0)
    external = tmp_path / "base_llm"  # 300 tokens: the tokenizer's ~400 make the table grow
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
    )).save_pretrained(external)
    model = build_model(tiny_cfg(f"model.llm.path={external}", "model.trainable.llm=lora"))
    out = save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert all("lora_" in k for k in fh.keys())  # no whole embed_tokens / lm_head tables
    with safe_open(str(out / "adapter" / ckpt.GROWN_ROWS), "pt") as fh:
        grown = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    n_new = len(model.tokenizer) - 300
    assert grown == ({"input": (n_new, 32)} if tied else {"input": (n_new, 32), "output": (n_new, 32)})
    ids = torch.tensor([[5, 6, len(model.tokenizer) - 1]])  # the last id: a grown row
    want = model.llm(input_ids=ids).logits
    assert torch.equal(load_pretrained(out).llm(input_ids=ids).logits, want)
    (out / "adapter" / ckpt.GROWN_ROWS).unlink()  # without the rows, the grown token's row is a new draw
    assert not torch.equal(load_pretrained(out).llm(input_ids=ids).logits, want)
