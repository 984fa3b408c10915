"""`medvlm3d preprocess` and `data.preprocessed`: round trip, settings check, bad volumes, rerun,
byte-identical output for 1 and 2 processes (data/preprocess.py, data/shards.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medvlm3d.cli import main as cli_main
from medvlm3d.config import config_dir
from medvlm3d.data.dataset import StudyDataset
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.data.preprocess import run_preprocess
from medvlm3d.data.select.step import SelectionPlan
from medvlm3d.data.shards import ShardCache, shard_path
from medvlm3d.model.llm import load_tokenizer
from launch_helpers import free_port, tree  # tests/train (pytest.ini pythonpath)

SIZES = ["data.size=[8,16,16]", "data.slice_size=[16,16]"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvlm3d.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("pp_phantoms"), 5, seed=3, shape=(12, 24, 24))


def dataset(cfg, records, selection=True, train=False) -> StudyDataset:
    plan = SelectionPlan.from_config(cfg.model, teacher=True) if selection else None
    return StudyDataset(records, cfg.data, load_tokenizer(cfg.model.llm), 2, train=train, selection=plan)


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize("extra", [[], ["model.preselect_k=4", "model.variant=2d_only"]])
def test_round_trip_equals_raw(phantoms, phantom_records, tiny_cfg, tmp_path, extra) -> None:
    """Every sample read from the shards equals the one read from the NIfTI files, exactly,
    teacher, pre-selection and picks included (stored, not recomputed)."""
    from medvlm3d.data.readers import read_records

    cfg = tiny_cfg(*SIZES, *extra)
    s = run_preprocess(phantoms, cfg, tmp_path / "pp", shard_size=2)
    records = read_records(phantoms)
    n_studies = len({json.dumps(r["image"]) for r in records})
    assert (s.studies, s.shards, s.done, s.failed, s.skipped) == (n_studies, 3, n_studies, 0, 0)
    raw = dataset(cfg, records)
    cached = dataset(tiny_cfg(*SIZES, *extra, f"data.preprocessed={tmp_path / 'pp'}"), records)
    assert cached.shards is not None and cached.shards.has_selection
    calls = []
    select = cached.selection.select
    cached.selection.select = lambda *a, **k: calls.append(1) or select(*a, **k)
    for i in range(0, len(records), 3):
        same(raw[i], cached[i])
        assert "teacher" in cached[i]
    assert calls == []  # no Vote-MI on the loader side
    no_plan = dataset(tiny_cfg(*SIZES, *extra, f"data.preprocessed={tmp_path / 'pp'}"), records, selection=False)
    same(dataset(cfg, records, selection=False)[1], no_plan[1])


def test_other_settings_are_refused_naming_keys(phantoms, tiny_cfg, tmp_path) -> None:
    run_preprocess(phantoms, tiny_cfg(*SIZES), tmp_path / "pp", shard_size=4)
    with pytest.raises(ConfigError, match=r"data\.size.*model\.vote_mi\.num_picks") as e:
        dataset(tiny_cfg("data.size=[8,16,24]", "data.slice_size=[16,16]", "model.vote_mi.num_picks=2",
                         f"data.preprocessed={tmp_path / 'pp'}"), [])
    assert "data.slice_size" not in str(e.value) and "[8, 16, 24]" in str(e.value)
    ok = dataset(tiny_cfg(*SIZES, 'model.vote_mi.teacher="off"', f"data.preprocessed={tmp_path / 'pp'}"), [])
    assert ok.shards.has_selection  # a run without the teacher reads a cache made with one
    with pytest.raises(ConfigError, match="teacher: cache 'picks' vs run 'votes'"):
        dataset(tiny_cfg(*SIZES, "model.vote_mi.teacher=votes", f"data.preprocessed={tmp_path / 'pp'}"), [])
    with pytest.raises(ConfigError, match="no index.json"):
        dataset(tiny_cfg(*SIZES, f"data.preprocessed={tmp_path / 'nothing'}"), [])


@pytest.fixture()
def with_bad_volume(phantoms, tmp_path) -> tuple[Path, str]:
    """A copy of the phantom dataset whose second study's volume is truncated."""
    root = Path(shutil.copytree(phantoms.parent, tmp_path / "data"))
    bad = sorted((root / "volumes").glob("*.nii.gz"))[1]
    bad.write_bytes(bad.read_bytes()[:200])
    return root / phantoms.name, str(bad)


def test_bad_volume_recorded_and_skipped(with_bad_volume, tiny_cfg, tmp_path) -> None:
    from medvlm3d.data.readers import read_records

    manifest, bad = with_bad_volume
    cfg = tiny_cfg(*SIZES)
    s = run_preprocess(manifest, cfg, tmp_path / "pp", shard_size=2)
    assert s.failed == 1 and s.done == s.studies - 1
    cache = ShardCache(tmp_path / "pp")
    (err,) = cache.errors.values()
    assert err["image"] == bad and bad in err["error"]
    records = read_records(manifest)
    ds = dataset(tiny_cfg(*SIZES, f"data.preprocessed={tmp_path / 'pp'}"), records)
    i = next(i for i, r in enumerate(records) if r["image"] == bad)
    with pytest.raises(DataError, match=f"{records[i]['id']}.*failed when preprocessed"):
        ds[i]


def test_bad_volume_stops_with_exit_2(with_bad_volume, tiny_tokenizer_dir, tmp_path, capsys) -> None:
    manifest, bad = with_bad_volume
    rc = cli_main(["preprocess", "--data", str(manifest), "--config", "tiny", "--out", str(tmp_path / "pp"),
                   "--on-error", "stop", f"model.llm.tokenizer={tiny_tokenizer_dir}", *SIZES])
    assert rc == 2
    assert bad in capsys.readouterr().err
    assert not (tmp_path / "pp" / "index.json").exists()


def test_rerun_skips_finished_shards(phantoms, tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg(*SIZES)
    first = run_preprocess(phantoms, cfg, tmp_path / "pp", shard_size=2)
    index = (tmp_path / "pp" / "index.json").read_bytes()
    kept = {i: shard_path(tmp_path / "pp", i).stat().st_mtime_ns for i in (0, 2)}
    shard_path(tmp_path / "pp", 1).unlink()  # as if the rank writing shard 1 had died
    (tmp_path / "pp" / "index.json").unlink()
    again = run_preprocess(phantoms, cfg, tmp_path / "pp", shard_size=2)
    assert (again.done, again.skipped) == (2, first.studies - 2)
    assert {i: shard_path(tmp_path / "pp", i).stat().st_mtime_ns for i in (0, 2)} == kept
    assert (tmp_path / "pp" / "index.json").read_bytes() == index


def test_rank_shares_are_disjoint(phantoms, tiny_cfg, tmp_path) -> None:
    """Two ranks run one after the other (no barrier) write disjoint shards; rank 0's merge needs all."""
    cfg = tiny_cfg(*SIZES)
    with pytest.raises(DataError, match="shard-00001"):
        run_preprocess(phantoms, cfg, tmp_path / "pp", shard_size=2, rank=0, world=2)
    assert sorted(p.name for p in (tmp_path / "pp" / "shards").iterdir()) == ["shard-00000.safetensors",
                                                                            "shard-00002.safetensors"]
    s = run_preprocess(phantoms, cfg, tmp_path / "pp", shard_size=2, rank=1, world=2)
    assert (s.done, s.skipped) == (2, 0)


@pytest.mark.slow
def test_byte_identical_for_1_and_2_processes(phantoms, tiny_tokenizer_dir, tmp_path) -> None:
    args = ["--data", str(phantoms), "--config", "tiny", "--shard-size", "2",
            f"model.llm.tokenizer={tiny_tokenizer_dir}", *SIZES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "medvlm3d", "preprocess", "--out", str(tmp_path / "p1"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(config_dir() / "accelerate" / "cpu_ddp.yaml"), "--num_processes", "2",
                          "--main_process_port", str(free_port()), "-m", "medvlm3d", "preprocess",
                          "--out", str(tmp_path / "p2"), *args],
                         cwd=config_dir().parent, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "preprocess rank 1/2" in two.stdout and "preprocess rank 0/2" in two.stdout
    a, b = tree(tmp_path / "p1"), tree(tmp_path / "p2")
    assert len(a) == 4 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_settings_of_a_plan_without_stored_selection(tiny_cfg) -> None:
    """A selector that reads the sample index or labels is never stored (each run selects)."""
    assert SelectionPlan.for_cache(tiny_cfg("model.vote_mi.selector=random").model) is None
    plan = SelectionPlan.for_cache(tiny_cfg().model)
    assert plan is not None and plan.keep and plan.settings["model.vote_mi.selector"] == "votek"
    assert dataclasses.asdict(tiny_cfg().model.vote_mi)["num_picks"] == plan.settings["model.vote_mi.num_picks"]


def test_shard_views_share_memory_and_batch_like_raw(phantoms, phantom_records, tiny_cfg, tmp_path) -> None:
    """Read from shards, a study's slices (axial only, slice_size = (H, W)) are its volume's
    memory, read-only; the collated batch equals the one from the NIfTI files."""
    from medvlm3d.data.collate import Collator
    from medvlm3d.data.readers import read_records

    cfg = tiny_cfg(*SIZES)
    run_preprocess(phantoms, cfg, tmp_path / "pp", shard_size=2)
    records = read_records(phantoms)
    raw = dataset(cfg, records)
    cached = dataset(tiny_cfg(*SIZES, f"data.preprocessed={tmp_path / 'pp'}"), records)
    s = cached[0]
    assert s["slices"].data_ptr() == s["volume"].data_ptr()
    collate = Collator(raw.tokenizer.pad_token_id)
    a, b = collate([raw[i] for i in range(3)]), collate([cached[i] for i in range(3)])
    assert b["slices"].data_ptr() == b["volumes"].data_ptr()
    same({k: v for k, v in a.items() if k != "records"}, {k: v for k, v in b.items() if k != "records"})
