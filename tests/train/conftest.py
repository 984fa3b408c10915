"""Fixtures of the training-recipe tests (tests/train/test_recipe*.py).

`phantom`: the shared phantom studies of tests/conftest.py as {"all", "ten", "four": manifest
path, "tok": tokenizer folder}; `fresh_accelerate`: resets Accelerate's process-wide singletons
after a test (the recipe modules use it for every test through `pytestmark`).

`dist_data` ({"manifest": 12 records, "tok", "root": a scratch folder}) and `dist_reference` (the
run folder of one in-process run, batch 2) are shared by the launch tests (test_distributed.py,
test_multinode.py; launch_helpers.py): P processes x batch 1 must match that one run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medvlm3d.data.readers import write_manifest
from launch_helpers import overrides


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


@pytest.fixture(scope="session")
def dist_data(tmp_path_factory, phantom_manifest, phantom_records, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")  # the subset sits beside the studies (inside the data root)
    return {"manifest": write_manifest(phantom_records[:12], phantom_manifest.parent / "twelve.jsonl"),
            "tok": tiny_tokenizer_dir,
            "root": root}


@pytest.fixture(scope="session")
def dist_reference(dist_data) -> Path:
    """One process, batch 2 (= 2 processes x batch 1), stage 2 (LoRA + distillation + slice loss)."""
    from accelerate.state import AcceleratorState, GradientState

    from medvlm3d.config import load_config
    from medvlm3d.train.recipe import run_training

    out = dist_data["root"] / "one"
    try:
        run_training(load_config("tiny", overrides(dist_data, out, 2), layers=["stage2_finetune"]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return out
