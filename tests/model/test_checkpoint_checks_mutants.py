"""model/checkpoint_checks.py behaviours that mutation testing (bench/mutation.sh) found unpinned:
the exact text of each message, the file sniffing by magic bytes, tied LLM weights, and an HF
folder whose shapes all fit."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.model import checkpoint_checks as cc

PICKLE = "; it is a pickle (a torch .bin / .pt renamed?), which medvlm3d never unpickles"
ZIP = "; it is a zip archive (a torch.save file renamed?), which medvlm3d never unpickles"


def test_first_line() -> None:
    assert cc.first_line(ValueError("  boom\nsecond line  ")) == "ValueError: boom"
    assert cc.first_line(KeyError()) == "KeyError"
    assert cc.first_line(OSError("x" * 400)) == "OSError: " + "x" * 300


@pytest.mark.parametrize(
    ("head", "said"),
    [(b"\x80\x02rest", PICKLE), (b"\x80\x03rest", PICKLE), (b"\x80\x04rest", PICKLE), (b"\x80\x05rest", PICKLE),
     (b"\x80\x06rest", ""), (b"\x00\x03rest", ""), (b"PK\x03\x04rest", ZIP), (b"hello", "")],
    ids=["p2", "p3", "p4", "p5", "p6", "not-0x80", "zip", "text"],
)
def test_sniff_by_magic_bytes(tmp_path: Path, head: bytes, said: str) -> None:
    (tmp_path / "f").write_bytes(head)
    assert cc._sniff(tmp_path / "f") == said


def test_sniff_of_an_unreadable_path_says_nothing(tmp_path: Path) -> None:
    assert cc._sniff(tmp_path / "absent") == ""
    assert cc._sniff(tmp_path) == ""  # a folder: open() fails


def test_run_config_must_be_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'config.yaml'))}: is a directory, not a "
                       r"regular file; expected config\.yaml as a regular file$"):
        cc.read_run_config(tmp_path)


def test_unreadable_run_config_message(tmp_path: Path, monkeypatch) -> None:
    import medvlm3d.config

    def broken(*args, **kwargs):
        raise ValueError("bad bytes\nmore")

    monkeypatch.setattr(medvlm3d.config, "load_config", broken)
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError) as info:
        cc.read_run_config(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'config.yaml'}: unreadable run config (ValueError: bad bytes); "
                               "expected the YAML written by save_pretrained")


def test_unreadable_tensors_message(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))

    def broken(*args, **kwargs):
        raise RuntimeError("short read\nat offset 8")

    monkeypatch.setattr(cc, "load_file", broken)
    with pytest.raises(DataError) as info:
        cc.load_tensors(path)
    assert str(info.value) == (f"{path}: cannot read its tensors (RuntimeError: short read); expected a complete "
                               ".safetensors file")


def test_state_mismatch_message_lists_every_kind() -> None:
    model = nn.Sequential(nn.Linear(2, 3))
    state = {"0.weight": torch.zeros(4, 2), "0.extra": torch.zeros(1)}  # wrong shape, bias missing, one extra
    with pytest.raises(DataError) as info:
        cc.check_state(model, state, Path("m.safetensors"))
    assert str(info.value) == (
        "m.safetensors does not match its config.yaml: 1 tensor(s) of the wrong shape: 0.weight (expected [3, 2], "
        "found [4, 2]); 1 missing: ['0.bias']; 1 unexpected: ['0.extra']; expected the tensors of the model that "
        "config describes (was the file copied from another run?)")
    assert cc._shape_lines([("a", (1,), (2,)), ("b", (3,), (4,))]) == \
        "a (expected [1], found [2]), b (expected [3], found [4])"


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight  # stored once, as HF stores tied embeddings


def test_llm_keys_tied_weights_count_once(tmp_path: Path) -> None:
    llm = _Tied()
    save_file({"emb.weight": torch.zeros(5, 3)}, str(tmp_path / "model.safetensors"))
    cc.check_llm_keys(llm, tmp_path)  # head.weight shares emb.weight's storage: not missing
    save_file({"emb.weight": torch.zeros(5, 3), "other": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(DataError) as info:
        cc.check_llm_keys(llm, tmp_path)
    assert str(info.value) == (f"{tmp_path}: its weights do not match the LLM of config.yaml: 0 missing [], "
                               "1 unexpected ['other']; expected the folder written by save_pretrained")


def test_llm_shape_mismatches_is_empty_when_all_fit_or_unknown(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llm", safe_serialization=True)
    assert cc.llm_shape_mismatches(tmp_path / "llm") == ""
    os.remove(tmp_path / "llm" / "config.json")
    assert cc.llm_shape_mismatches(tmp_path / "llm") == ""  # no config to compare with
