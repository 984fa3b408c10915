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
