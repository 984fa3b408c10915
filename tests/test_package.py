"""The package installs as one namespace; `import medvlm3d` stays light. (Config tests: test_config.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medvlm3d
from medvlm3d.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_bare_top_level_names_are_not_importable(tmp_path: Path) -> None:
    for name in ("model", "data", "train"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, name
    assert medvlm3d.load_config is load_config


def test_setup_lists_every_subpackage() -> None:
    """Every source folder with an __init__.py is in setup.py's PACKAGES: a folder left out is
    absent from a non-editable install (train/stages once was, and only `pip install -e` worked)."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    listed = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PACKAGES")
    skip = {"tests", "bench", "examples", "docs", "build", "mutants", ".venv"}
    folders = {str(f.parent.relative_to(REPO)) for f in REPO.rglob("__init__.py")
               if not skip.intersection(f.relative_to(REPO).parts) and not f.relative_to(REPO).parts[0].startswith(".")}
    assert folders == set(listed.values()), sorted(folders ^ set(listed.values()))


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
        "import medvlm3d.train.stages, medvlm3d.data.formats, medvlm3d.data.select, medvlm3d.eval.metrics; "
        "print(c.load_config('demo', overrides=['train.stage=stage1_align']).model.variant)" % str(target)
    )
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "2e3"


def test_import_medvlm3d_does_not_import_torch(tmp_path: Path) -> None:
    """The config types live beside torch code; `medvlm3d.load_config` is imported on first use."""
    code = "import sys, medvlm3d; assert 'torch' not in sys.modules and 'medvlm3d.config' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
