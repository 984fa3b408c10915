"""save_pretrained behaviours that mutation testing (bench/mutation.sh) found unpinned: what
checkpoint.json says for each layout, save_base_llm always / never, an external LLM under a LoRA
policy, the safetensors metadata, what model.safetensors leaves out, the saved config's LLM path
and the log line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import medvlm3d

from medvlm3d.config import load_config
from medvlm3d.data.errors import DataError
from medvlm3d.model import checkpoint as ckpt
from medvlm3d.model.checkpoint_checks import read_run_config
from medvlm3d.model.medvlm import MedVLM, build_model


def _meta(root: Path) -> dict:
    return json.loads((root / "checkpoint.json").read_text())


def _names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_adapter_layout_meta_file_and_log(trained: MedVLM, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=ckpt.log.name)
    root = ckpt.save_pretrained(trained, tmp_path / "ck")
    assert [r.getMessage() for r in caplog.records if r.name == ckpt.log.name] == [
        f"saved checkpoint to {root} (base+adapter)"]
    assert _meta(root) == {"format_version": 1, "llm_layout": "base+adapter", "external_llm": "", "text_encoder": "",
                           "num_visual_tokens": trained.num_visual_tokens, "variant": trained.cfg.model.variant}
    with safe_open(str(root / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        keys = set(fh.keys())
    assert keys and not any(k.startswith("llm.") for k in keys)
    assert read_run_config(root).model.llm.path == ""


def test_save_base_llm_never_keeps_only_the_adapter(trained: MedVLM, tmp_path: Path) -> None:
    root = ckpt.save_pretrained(trained, tmp_path / "ck", save_base_llm="never")
    assert "llm" not in _names(root) and "adapter" in _names(root)
    assert _meta(root)["llm_layout"] == "external+adapter" and _meta(root)["external_llm"] == ""


@pytest.fixture(scope="module")
def frozen_external(trained: MedVLM, tiny_tokenizer_dir: Path, tmp_path_factory) -> MedVLM:
    """A model whose frozen LLM comes from an HF folder (the merged `trained` LLM)."""
    llm_dir = ckpt.save_pretrained(trained, tmp_path_factory.mktemp("m") / "merged", merge_lora=True) / "llm"
    torch.manual_seed(1)
    return build_model(load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", f"model.llm.path={llm_dir}",
                                            "model.trainable.llm=frozen"]))


def test_save_base_llm_always_copies_an_external_llm(frozen_external: MedVLM, tmp_path: Path) -> None:
    root = ckpt.save_pretrained(frozen_external, tmp_path / "ck", save_base_llm="always")
    assert "llm" in _names(root) and "adapter" not in _names(root)
    assert _meta(root)["llm_layout"] == "base" and _meta(root)["external_llm"] == ""
    assert read_run_config(root).model.llm.path == ""


def test_external_llm_under_a_lora_policy_is_named(frozen_external: MedVLM, tiny_tokenizer_dir: Path,
                                                    tmp_path: Path) -> None:
    llm_dir = frozen_external.cfg.model.llm.path
    model = build_model(load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", f"model.llm.path={llm_dir}",
                                             "model.trainable.llm=lora"]))
    root = ckpt.save_pretrained(model, tmp_path / "ck")
    assert "llm" not in _names(root) and "adapter" in _names(root)
    assert _meta(root)["llm_layout"] == "external+adapter" and _meta(root)["external_llm"] == llm_dir


def test_question_encoder_is_not_stored(tiny_tokenizer_dir: Path, tiny_bert: Path, tmp_path: Path) -> None:
    model = build_model(load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", "model.tgis.text_source=hf",
                                             f"model.tgis.text_encoder={tiny_bert}"]))
    assert any(k.startswith("text_encoder.") for k in model.state_dict())
    keys = set(ckpt.non_llm_state_dict(model))
    assert keys and not any(k.startswith(("text_encoder.", "llm.")) for k in keys)


# --------------------------------------------------------------------------------------------
# load_pretrained of what was saved


def test_load_keeps_the_adapter_trainable_and_ignores_encoder_weight_paths(trained: MedVLM, tmp_path: Path) -> None:
    root = ckpt.save_pretrained(trained, tmp_path / "ck")
    cfg = root / "config.yaml"
    text = cfg.read_text()
    assert text.count("    weights: ''\n") == 2  # encoder3d and slice_encoder
    cfg.write_text(text.replace("    weights: ''\n", f"    weights: {tmp_path / 'gone.safetensors'}\n"))
    loaded = medvlm3d.load_pretrained(root)  # the checkpoint holds the encoders: the paths are not read
    assert loaded.llm.peft_config["default"].inference_mode is False  # trainable.llm == lora
    torch.testing.assert_close(loaded.encoder3d.state_dict(), trained.encoder3d.state_dict())


def test_wrong_tensors_message_names_model_safetensors(trained: MedVLM, tmp_path: Path) -> None:
    root = ckpt.save_pretrained(trained, tmp_path / "ck")
    state = load_file(str(root / "model.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(root / "model.safetensors"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'model.safetensors'))} does not match its config"):
        medvlm3d.load_pretrained(root)


def test_question_encoder_checkpoint_loads(tiny_tokenizer_dir: Path, tiny_bert: Path, tmp_path: Path) -> None:
    model = build_model(load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", "model.tgis.text_source=hf",
                                             f"model.tgis.text_encoder={tiny_bert}"]))
    loaded = medvlm3d.load_pretrained(ckpt.save_pretrained(model, tmp_path / "ck"))
    torch.testing.assert_close(loaded.tgis.state_dict(), model.tgis.state_dict())


def test_device_map_load_logs_where_the_modules_went(trained: MedVLM, tmp_path: Path, caplog) -> None:
    root = ckpt.save_pretrained(trained, tmp_path / "ck", merge_lora=True)
    caplog.set_level(logging.INFO, logger=ckpt.log.name)
    loaded = medvlm3d.load_pretrained(root, dtype=torch.float16, device_map="auto")
    assert loaded.cfg.model.llm.dtype == "float16"
    assert f"loaded {root} with device_map='auto'; non-LLM modules on cpu" in [
        r.getMessage() for r in caplog.records if r.name == ckpt.log.name]
