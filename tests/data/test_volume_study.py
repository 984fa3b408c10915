"""Tests of medvlm3d.data.volume studies and cache: native depth, train-only augmentation,
load_volume_from_config, and the safetensors cache (hit identical and faster, corrupt entry recovered).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import medvlm3d.data.volume as V
from medvlm3d.config import DataConfig
from medvlm3d.data.errors import DataError
from medvlm3d.data.volume import Study, build_transforms, load_study, load_volume, load_volume_from_config

from volume_helpers import nifti

# ---------------------------------------------------------------------------------- studies


def test_load_study_native_depth_varies_and_aligns(tmp_path: Path) -> None:
    a = nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (8, 8, 6)).astype(np.int16))
    b = nifti(tmp_path / "b.nii.gz", np.random.default_rng(1).integers(-1000, 1000, (8, 8, 10)).astype(np.int16))
    cfg = DataConfig(size=(4, 8, 8), slice_size=(8, 8), num_slices=-1, planes=("axial", "coronal"))
    sa, sb = load_study(a, cfg), load_study(b, cfg)
    assert sa.slices.shape == (1, 6 + 8, 1, 8, 8) and sb.slices.shape == (1, 10 + 8, 1, 8, 8)
    assert sa.native_depth == [6] and sb.native_depth == [10] and sa.volume.shape == (1, 1, 4, 8, 8)
    assert sb.slice_index[0, :10].tolist() == list(range(10)) and sb.slice_plane[0, 10:].tolist() == [1] * 8
    capped = load_study(b, DataConfig(size=(4, 8, 8), slice_size=(8, 8), num_slices=-1, max_slices=7))
    assert capped.slices.shape[1] == 7 and capped.native_depth == [10]
    both = load_study([a, b], cfg)  # one S per study: the first image's
    assert both.volume.shape == (2, 1, 4, 8, 8) and both.slices.shape == (2, 6 + 8, 1, 8, 8)
    assert both.native_depth == [6, 10] and both.slice_pos.shape == both.slice_plane.shape == (2, 14)
    fixed = load_study([a, b], DataConfig(size=(4, 8, 8), slice_size=(6, 6), num_slices=5))
    assert fixed.slices.shape == (2, 5, 1, 6, 6) and fixed.slice_index.dtype == torch.long
    with pytest.raises(DataError, match="missing.nii"):
        load_study([a, tmp_path / "missing.nii"], cfg)
    with pytest.raises(ValueError, match="DataConfig"):
        load_study(a, {"size": (4, 8, 8)})  # type: ignore[arg-type]


def test_augmentation_train_only_no_flip(tmp_path: Path) -> None:
    data = np.full((16, 16, 8), -1000, np.int16)
    data[2:5, 6:10, :] = 800  # a block on the patient's left (low x index = left in an identity/RAS affine)
    p = nifti(tmp_path / "left.nii.gz", data)
    cfg = DataConfig(size=(8, 16, 16), slice_size=(16, 16), num_slices=-1, augment=True)
    ev = load_study(p, cfg)
    assert torch.equal(ev.volume, load_study(p, cfg, train=False).volume)
    torch.manual_seed(0)
    tr1 = load_study(p, cfg, train=True)
    torch.manual_seed(0)
    assert torch.equal(tr1.volume, load_study(p, cfg, train=True).volume)  # seeded from torch
    for seed in range(6):
        torch.manual_seed(seed)
        tr = load_study(p, cfg, train=True)
        assert tr.volume.shape == ev.volume.shape and tr.slices.shape == ev.slices.shape
        assert 0.0 <= float(tr.volume.min()) and float(tr.volume.max()) <= 1.0
        for x in (tr.volume[0, 0], tr.slices[0, :, 0]):  # W grows to the right: the block stays left
            assert float(x[..., :8].sum()) > 3 * float(x[..., 8:].sum())
    assert len(build_transforms(cfg, train=True).transforms) > len(build_transforms(cfg, train=False).transforms)


def test_load_volume_from_config_matches(tmp_path: Path) -> None:
    p = nifti(tmp_path / "m.nii.gz", np.random.default_rng(2).integers(-1000, 1000, (10, 9, 8)).astype(np.int16))
    cfg = DataConfig(size=(4, 6, 6), hu_window=(-500.0, 500.0), num_slices=-1)
    assert torch.equal(load_volume_from_config(p, cfg), load_volume(p, size=(4, 6, 6), hu_window=(-500, 500)))
    assert torch.equal(load_study(p, cfg).volume[0], load_volume_from_config(p, cfg))


# ---------------------------------------------------------------------------------- cache


def test_cache_hit_identical_faster_and_corrupt_recovered(tmp_path: Path, monkeypatch) -> None:
    p = nifti(tmp_path / "c.nii.gz", np.random.default_rng(3).integers(-1000, 1000, (96, 96, 48)).astype(np.int16))
    cache = tmp_path / "cache"
    cfg = DataConfig(size=(16, 32, 32), slice_size=(32, 32), num_slices=-1, cache_dir=str(cache))
    nocache = DataConfig(size=(16, 32, 32), slice_size=(32, 32), num_slices=-1)
    cold_t, hit_t = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        ref = load_study(p, nocache)
        cold_t.append(time.perf_counter() - t0)
    first = load_study(p, cfg)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    for _ in range(3):
        t0 = time.perf_counter()
        hit = load_study(p, cfg)
        hit_t.append(time.perf_counter() - t0)
    for f in ("volume", "slices", "slice_plane", "slice_index", "slice_pos"):
        assert torch.equal(getattr(hit, f), getattr(ref, f)) and torch.equal(getattr(first, f), getattr(ref, f))
    assert hit.native_depth == ref.native_depth == [48]
    assert min(hit_t) < min(cold_t)
    monkeypatch.setattr(V, "_read", lambda *a, **k: pytest.fail("cache hit must not read the volume"))
    assert torch.equal(load_study(p, cfg).volume, ref.volume)
    monkeypatch.undo()
    files[0].write_bytes(b"\x00garbage" * 10)  # corrupt: deleted, recomputed, rewritten
    again = load_study(p, cfg)
    assert torch.equal(again.slices, ref.slices)
    assert V._cache_read(files[0]) is not None
    load_study(p, DataConfig(size=(16, 32, 32), slice_size=(32, 32), num_slices=-1, cache_dir=str(cache),
                             hu_window=(-500.0, 500.0)))
    assert len(list(cache.glob("*.safetensors"))) == 2  # the key holds the preprocessing fields
    study = load_study(p, cfg, train=True)  # augment off in cfg: the cached study as is
    assert isinstance(study, Study) and torch.equal(study.volume, ref.volume)
