"""Training from `medvlm3d preprocess` shards (data.preprocessed) gives the losses of training from
the volumes themselves, step for step (the stored Vote-MI teacher included)."""

from __future__ import annotations

import pytest

from medvlm3d.data.preprocess import run_preprocess
from medvlm3d.train.recipe import run_training

from recipe_helpers import history, tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/train/conftest.py


def test_stage2_from_shards_equals_stage2_from_volumes(phantom, tmp_path) -> None:
    common = ("train.max_steps=3", "train.batch_size=2", "train.distill_weight=0.5")
    run_preprocess(phantom["four"], tiny(phantom, tmp_path / "x", "stage2_finetune", "four", *common),
                   tmp_path / "shards", shard_size=1)
    run_training(tiny(phantom, tmp_path / "raw", "stage2_finetune", "four", *common))
    run_training(tiny(phantom, tmp_path / "pp", "stage2_finetune", "four", *common,
                      f"data.preprocessed={tmp_path / 'shards'}"))
    raw, cached = history(tmp_path / "raw"), history(tmp_path / "pp")
    assert len(raw) == 3 and all(v is not None for v in raw)
    assert cached == raw
