"""Fixtures of the training-recipe tests (tests/train/test_recipe*.py).

`phantom`: the shared phantom studies of tests/conftest.py as {"all", "ten", "four": manifest
path, "tok": tokenizer folder}; `fresh_accelerate`: resets Accelerate's process-wide singletons
after a test (the recipe modules use it for every test through `pytestmark`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medvlm3d.data.readers import write_manifest


@pytest.fixture(scope="session")
def phantom(tmp_path_factory, phantom_manifest, phantom_records, tiny_tokenizer_dir) -> dict[str, Path]:
    """The shared phantom studies (tests/conftest.py) with a 10-record and a 4-record subset."""
    root = phantom_manifest.parent  # beside the studies: their paths stay inside the manifest's folder
    return {"all": phantom_manifest, "ten": write_manifest(phantom_records[:10], root / "ten.jsonl"),
            "four": write_manifest(phantom_records[:4], root / "four.jsonl"), "tok": tiny_tokenizer_dir}


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
