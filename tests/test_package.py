"""The package installs as one namespace and reads every shipped config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medvlm3d
from medvlm3d.config import ConfigError, RunConfig, config_dir, load_config

REPO = Path(__file__).resolve().parents[1]


def shipped_yamls() -> list[Path]:
    return sorted(p for p in config_dir().rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", shipped_yamls(), ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_unknown_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.tgis\.tauu.*tau, top_k"):
        load_config("demo", ["model.tgis.tauu=3"])


def test_overrides_are_typed() -> None:
    cfg = load_config("demo", ["model.tgis.tau=2.5", "data.size=[16,32,32]", "train.max_steps=3"])
    assert cfg.model.tgis.tau == 2.5 and cfg.data.size == (16, 32, 32) and cfg.train.max_steps == 3
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config("demo", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="model.variant"):
        load_config("demo", ["model.variant=4d"])


def test_bare_top_level_names_are_not_importable(tmp_path: Path) -> None:
    for name in ("model", "data", "train"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, name
    assert medvlm3d.load_config is load_config


@pytest.mark.slow
def test_non_editable_install_imports(tmp_path: Path) -> None:
    """`pip install .` (not -e) gives a working package with its configs as package data."""
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    code = (
        "import medvlm3d, medvlm3d.config as c; "
        "assert medvlm3d.__file__.startswith(%r), medvlm3d.__file__; "
        "print(c.load_config('demo').model.variant)" % str(target)
    )
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "2e3"


def test_float_overrides_accept_exponent_notation() -> None:
    assert load_config("demo", ["train.lr=3e-3"]).train.lr == 3e-3


def test_bare_off_reaches_a_string_choice_as_off() -> None:
    # YAML 1.1 reads `teacher: off` as False; the choice must still be "off", and typos still fail.
    assert load_config("tiny", ["model.vote_mi.teacher=off"]).model.vote_mi.teacher == "off"
    assert load_config({"model": {"vote_mi": {"teacher": False}}}).model.vote_mi.teacher == "off"
    with pytest.raises(ConfigError, match="vote_mi.teacher"):
        load_config("tiny", ["model.vote_mi.teacher=on"])
