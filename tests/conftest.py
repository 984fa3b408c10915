"""Shared fixtures: a few phantom studies, a tokenizer trained on their text, and the tiny
config (configs/tiny.yaml) pointed at that tokenizer. Session-scoped, built once (~1 s)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from medvlm3d.config import RunConfig, load_config


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvlm3d.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("phantoms"), 6, seed=0, shape=(16, 32, 32))


@pytest.fixture(scope="session")
def phantom_records(phantom_manifest: Path) -> list[dict]:
    from medvlm3d.data.readers import read_records

    return read_records(phantom_manifest)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, phantom_records: list[dict]) -> Path:
    from medvlm3d.data.synthetic import corpus_texts
    from medvlm3d.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_texts(phantom_records), out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tiny_tokenizer_dir: Path) -> Callable[..., RunConfig]:
    """tiny_cfg("model.variant=3d_only", ...) -> the tiny RunConfig with these overrides."""

    def make(*overrides: str) -> RunConfig:
        return load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer BERT folder (model + WordPiece tokenizer) standing in for M3D-CLIP's text tower."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    out = tmp_path_factory.mktemp("bert")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
                                              *[f"##{c}" for c in letters]]) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=57, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(out)
    return out
