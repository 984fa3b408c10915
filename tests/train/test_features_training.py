"""`medvlm3d encode` and `data.features` (model/features.py): stage 1 trained from the encoded
features gives the losses of stage 1 trained from the volumes; features of other encoder weights,
or of an encoder trainable in the stage, are refused; 1 and 2 processes write the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medvlm3d.config import config_dir
from medvlm3d.data.errors import ConfigError
from medvlm3d.model.checkpoint import load_pretrained
from medvlm3d.model.features import FeatureStore, run_encode
from medvlm3d.train.recipe import build_stage_model, run_training

from launch_helpers import free_port, tree
from recipe_helpers import history, tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/train/conftest.py
COMMON = ("train.max_steps=3", "train.batch_size=2")


@pytest.fixture(scope="module")
def encoded(phantom, tmp_path_factory) -> dict[str, Path]:
    """A stage-1 start checkpoint and its fp32 features over the six phantom studies (3 shards)."""
    from accelerate.utils import set_seed

    root = tmp_path_factory.mktemp("encoded")
    set_seed(0)
    _, vlm = build_stage_model(tiny(phantom, root / "x", "stage1_align", "four", *COMMON))
    vlm.save_pretrained(str(root / "ckpt"))
    s = run_encode(load_pretrained(root / "ckpt"), phantom["all"], root / "feats", dtype="fp32", shard_size=2)
    assert s.done == s.studies > 0 and s.failed == 0
    return {"ckpt": root / "ckpt", "feats": root / "feats"}


def test_stage1_from_features_equals_stage1_from_volumes(phantom, encoded, tmp_path, monkeypatch) -> None:
    start = f"train.init_from={encoded['ckpt']}"
    run_training(tiny(phantom, tmp_path / "raw", "stage1_align", "ten", *COMMON, start))
    found = []
    encode = FeatureStore.encode
    monkeypatch.setattr(FeatureStore, "encode", lambda self, *a: found.append(encode(self, *a)) or found[-1])
    run_training(tiny(phantom, tmp_path / "ft", "stage1_align", "ten", *COMMON, start,
                      f"data.features={encoded['feats']}"))
    assert len(found) == 2 * 3 and all(f is not None for f in found)  # both encoders, every step, no miss
    raw, feats = history(tmp_path / "raw"), history(tmp_path / "ft")
    assert len(raw) == 3 and all(v is not None for v in raw)
    assert feats == pytest.approx(raw, abs=1e-6, rel=0)


def test_features_replace_the_encoders(phantom, encoded) -> None:
    """With the features, a batch's visual tokens are those of the encoders, and no encoder runs."""
    from medvlm3d.config import load_config
    from medvlm3d.train.data import build_train_data

    vlm = load_pretrained(encoded["ckpt"])
    cfg = load_config("tiny", [f"data.train={phantom['ten']}", f"model.llm.tokenizer={encoded['ckpt'] / 'tokenizer'}"],
                      layers=["stage1_align"])
    ds, collate = build_train_data(cfg, vlm.tokenizer, vlm.num_visual_tokens)
    from medvlm3d.data.batch import Batch

    batch = Batch.from_dict(collate([ds[0], ds[9]]))
    with torch.no_grad():
        want = vlm.prepare_inputs(batch)[0]
        assert vlm.use_features(str(encoded["feats"])) == ("encoder3d", "slice_encoder")

        def boom(*_a, **_k):
            raise AssertionError("an encoder ran")

        vlm.encoder3d.forward = vlm.slice_encoder.forward = boom
        got = vlm.prepare_inputs(batch)[0]
    assert vlm.features.misses == 0 and vlm.features.hits == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_other_encoder_weights_are_refused(encoded) -> None:
    vlm = load_pretrained(encoded["ckpt"])
    with torch.no_grad():
        next(vlm.slice_encoder.parameters()).add_(1e-3)
    with pytest.raises(ConfigError, match=r"encoder\.slice_encoder\.sha256") as e:
        vlm.use_features(str(encoded["feats"]))
    assert "encoder3d" not in str(e.value) and "medvlm3d encode" in str(e.value)
    with pytest.raises(ConfigError, match="no index.json"):
        FeatureStore(encoded["feats"] / "nothing")
    import dataclasses

    from medvlm3d.model.features import feature_settings

    vlm = load_pretrained(encoded["ckpt"])
    other = feature_settings(vlm, dataclasses.replace(vlm.cfg.data, hu_window=(0.0, 80.0)), "")
    with pytest.raises(ConfigError, match=r"differing keys: data\.hu_window: cache .* vs run \[0\.0, 80\.0\] \(run `medvlm3d encode`"):
        FeatureStore(encoded["feats"], other)


def test_features_of_a_trainable_encoder_are_refused(encoded) -> None:
    vlm = load_pretrained(encoded["ckpt"])
    vlm.encoder3d.requires_grad_(True)
    with pytest.raises(ConfigError, match="encoder3d is trainable"):
        vlm.use_features(str(encoded["feats"]))


@pytest.mark.slow
def test_encode_byte_identical_for_1_and_2_processes(phantom, encoded, tmp_path) -> None:
    args = ["--checkpoint", str(encoded["ckpt"]), "--data", str(phantom["all"]), "--shard-size", "2",
            "--dtype", "bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "medvlm3d", "encode", "--out", str(tmp_path / "p1"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(config_dir() / "accelerate" / "cpu_ddp.yaml"), "--num_processes", "2",
                          "--main_process_port", str(free_port()), "-m", "medvlm3d", "encode",
                          "--out", str(tmp_path / "p2"), *args],
                         cwd=config_dir().parent, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "encode rank 1/2" in two.stdout and "encode rank 0/2" in two.stdout
    a, b = tree(tmp_path / "p1"), tree(tmp_path / "p2")
    assert len(a) == 4 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    assert FeatureStore(tmp_path / "p2").settings["features.dtype"] == "bf16"
