"""The run config: shipped YAMLs, strict keys, derived values, plugins, finite and sane values,
and the import rule that keeps `medvlm3d.config` free of cycles."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvlm3d.config import ConfigError, RunConfig, config_dir, load_config, save_config, to_dict
from medvlm3d.model.encoder3d import ENCODERS3D

REPO = Path(__file__).resolve().parents[1]


def shipped_yamls() -> list[Path]:
    return sorted(p for p in config_dir().rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", shipped_yamls(), ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.encoder3d.img_size == cfg.data.size


def test_unknown_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.tgis\.tauu.*tau, top_k"):
        load_config("demo", ["model.tgis.tauu=3"])
    with pytest.raises(ConfigError, match=r"'colour'.*data, model, train, eval, plugins"):
        load_config("demo", ["colour=red"])


def test_overrides_are_typed() -> None:
    cfg = load_config("demo", ["model.tgis.tau=2.5", "data.size=[16,32,32]", "train.max_steps=3"])
    assert cfg.model.tgis.tau == 2.5 and cfg.data.size == (16, 32, 32) and cfg.train.max_steps == 3
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config("demo", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="model.variant"):
        load_config("demo", ["model.variant=4d"])


def test_float_overrides_accept_exponent_notation() -> None:
    assert load_config("demo", ["train.lr=3e-3"]).train.lr == 3e-3


def test_bare_off_reaches_a_string_choice_as_off() -> None:
    # YAML 1.1 reads `teacher: off` as False; the choice must still be "off", and typos still fail.
    assert load_config("tiny", ["model.vote_mi.teacher=off"]).model.vote_mi.teacher == "off"
    assert load_config({"model": {"vote_mi": {"teacher": False}}}).model.vote_mi.teacher == "off"
    with pytest.raises(ConfigError, match="vote_mi.teacher"):
        load_config("tiny", ["model.vote_mi.teacher=on"])


# ------------------------------------------------------------------------------ derived img_size


def test_img_size_is_derived_from_data_size() -> None:
    cfg = load_config("demo", ["data.size=[16,48,48]"])
    assert cfg.model.encoder3d.img_size == (16, 48, 48)
    # a preset's own img_size gives way too (vit3d_m3d is 32x256x256)
    cfg = load_config("demo", ["model.encoder3d.preset=vit3d_m3d", "data.size=[32,64,64]"])
    assert cfg.model.encoder3d.img_size == (32, 64, 64) and cfg.model.encoder3d.hidden_size == 768


def test_conflicting_img_size_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.encoder3d\.img_size is derived from data\.size \(\[16, 32, 32\]\)"):
        load_config("tiny", ["model.encoder3d.img_size=[32,64,64]"])
    with pytest.raises(ConfigError, match=r"derived from data\.size"):  # against data.size's default
        load_config({"model": {"encoder3d": {"img_size": [16, 32, 32]}}})


def test_old_config_with_equal_img_size_loads_and_is_not_saved_again(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    old = to_dict(cfg)
    old["model"]["encoder3d"]["img_size"] = list(cfg.data.size)  # as old checkpoints' config.yaml
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    again = load_config(tmp_path / "old.yaml")
    assert again == cfg
    save_config(again, tmp_path / "new.yaml")
    saved = yaml.safe_load((tmp_path / "new.yaml").read_text(encoding="utf-8"))
    assert "img_size" not in saved["model"]["encoder3d"] and saved["data"]["size"] == [16, 32, 32]
    assert load_config(tmp_path / "new.yaml") == cfg


# ------------------------------------------------------------------------------ finite, sane values


@pytest.mark.parametrize("override,key", [
    ("train.lr=nan", "train.lr"), ("model.tgis.tau=inf", "model.tgis.tau"), ("train.lr=.inf", "train.lr"),
    ("train.max_steps=inf", "train.max_steps"), ("data.hu_window=[-1000, .nan]", "data.hu_window"),
    ("train.lr_per_component={llm: .nan}", "train.lr_per_component.llm"),
])
def test_nan_and_inf_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key.replace('.', r'[.]')} must be a finite number"):
        load_config("tiny", [override])


@pytest.mark.parametrize("override,key", [
    ("data.size=[100000,100000,100000]", "data.size"), ("data.slice_size=[4096,4096]", "data.slice_size"),
])
def test_oversize_shapes_are_refused_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key.replace('.', r'[.]')} must be \d integers in 1\.\.2048"):
        load_config("tiny", [override])
    assert load_config("tiny", [f"{key}=[2048{',2048' * (2 if key == 'data.size' else 1)}]"])


# ------------------------------------------------------------------------------ plugins

PLUGIN = '''
from torch import nn
from medvlm3d.model.encoder3d import ENCODERS3D


class Toy(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.out_dim, self.grid = cfg.hidden_size, (1, 1, 1)


@ENCODERS3D.register("{name}")
def _toy(cfg):
    return Toy(cfg)
'''


@pytest.fixture(autouse=True)
def _forget_plugins(monkeypatch: pytest.MonkeyPatch):
    """Each test's registrations and plugin modules are undone after it (names stay exact elsewhere)."""
    monkeypatch.setattr(ENCODERS3D, "_builders", dict(ENCODERS3D._builders))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("medvlm3d_plugin_", "toy_plugin_")):
            del sys.modules[name]


def _plugin_yaml(tmp_path: Path, name: str, plugin_entry: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"base: tiny\nplugins: [{plugin_entry}]\nmodel:\n  encoder3d: {{arch: {name}}}\n", encoding="utf-8")
    return path


def test_a_plugin_file_registers_a_component_named_in_the_yaml(tmp_path: Path) -> None:
    name = "toy_plugin_file_enc"
    with pytest.raises(ConfigError, match=rf"encoder3d\.arch must be one of .*got '{name}'"):
        load_config("tiny", [f"model.encoder3d.arch={name}"])  # not registered without the plugin
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy_enc.py").write_text(PLUGIN.format(name=name), encoding="utf-8")
    cfg = load_config(_plugin_yaml(tmp_path, name, "plugins/toy_enc.py"))  # relative to the YAML's folder
    assert cfg.model.encoder3d.arch == name and name in ENCODERS3D
    assert ENCODERS3D.build(name, cfg.model.encoder3d).out_dim == cfg.model.encoder3d.hidden_size
    # saved with the config (as an absolute path) and imported again by a fresh process
    out = tmp_path / "ckpt"
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["plugins"] == [str((tmp_path / "plugins" / "toy_enc.py").resolve())]
    assert load_config(out / "config.yaml") == cfg  # a second import in-process is skipped, not an error
    code = f"from medvlm3d.config import load_config; print(load_config({str(out / 'config.yaml')!r}).model.encoder3d.arch)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == name


def test_a_plugin_module_name_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "toy_plugin_module_enc"
    (tmp_path / "toy_plugin_mod_x.py").write_text(PLUGIN.format(name=name), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("tiny", ["plugins=[toy_plugin_mod_x]", f"model.encoder3d.arch={name}"])
    assert cfg.plugins == ("toy_plugin_mod_x",) and cfg.model.encoder3d.arch == name


def test_a_missing_plugin_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins: cannot import '.*nope_plugin\.py'"):
        load_config(_plugin_yaml(tmp_path, "vit", "nope_plugin.py"))
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_pkg_xyz\.mod'"):
        load_config("tiny", ["plugins=[no_such_pkg_xyz.mod]"])


# ------------------------------------------------------------------------------ import rule


def _module_imports(name: str) -> tuple[Path, list[str]]:
    """File of module `name` and the medvlm3d modules its top level imports (TYPE_CHECKING aside)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    path = Path(spec.origin)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            found += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return path, [m for m in found if m.startswith("medvlm3d.") and _is_module(m)]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `from medvlm3d.x import NAME`: NAME is not a module
        return False


def test_modules_imported_by_the_config_never_import_it_back() -> None:
    """Component modules own their configs; importing `medvlm3d.config` back would be a cycle."""
    todo, seen = ["medvlm3d.config"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path, deps = _module_imports(name)
        if name != "medvlm3d.config":
            assert "medvlm3d.config" not in deps, f"{path} imports medvlm3d.config at its top level"
        todo += deps
    assert {"medvlm3d.model.tgis", "medvlm3d.data.dataset", "medvlm3d.train.config"} <= seen
