"""THE run configuration: `RunConfig` and its loader.

A config is read from YAML (always `yaml.safe_load`), optionally inheriting from another YAML
through a top-level `base:` key, then patched by `key=value` overrides such as
`model.tgis.tau=3` or `train.max_steps=50`. Every key is checked against the dataclass fields:
an unknown key raises `ConfigError` naming it and listing the valid keys.

    RunConfig(data: DataConfig, model: ModelConfig, train: TrainConfig, eval: EvalConfig,
              plugins: tuple[str, ...])

Each section's dataclass lives in its component module (DataConfig in data/dataset.py,
ModelConfig in model/config.py composing Encoder3DConfig from model/encoder3d.py, TGISConfig
from model/tgis.py, ..., TrainConfig in train/config.py, EvalConfig in eval/runner.py); all are
re-exported here, so `from medvlm3d.config import TGISConfig` works. Those modules never import
this one. Shared checks and coercion: `medvlm3d.config_fields`.

A paper config (configs/med2e3.yaml, ...) holds its stages' hyper-parameters itself, under a
top-level `stages:` mapping from stage name to that stage's keys (lr, epochs, batch, schedule,
losses, trainable policy). Selecting a stage (a layer named like a shipped stage overlay, e.g.
`--stage stage1_align`, or `train.stage=...`) applies the paper's block INSTEAD of the generic
configs/stage*.yaml; any other layer that sets one of `STAGE_KEYS` on such a config is a
ConfigError (an explicit `train.lr=...` override still wins, last). See `_select_stage`.

Derived values are set once: `model.encoder3d.img_size` is `data.size` (a YAML may repeat it
only with the same value, as old checkpoints' config.yaml do; it is not written back).

`plugins: [my_pkg.my_module, path/to/file.py]` are imported before the sections are built, so
a component registered in a user's own file (an encoder, a selector, a dataset format) works
with only its name in the YAML. A `.py` path is relative to the YAML that names it (to the
working directory for an override); plugins of every layer (base, layers, overrides) load.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml

from medvlm3d.config_fields import MAX_SIDE, PLANES, PRESETS, coerce, from_dict, preset_names, to_dict
from medvlm3d.data.dataset import DataConfig
from medvlm3d.data.errors import ConfigError
from medvlm3d.eval.runner import EvalConfig
from medvlm3d.model.config import VARIANTS, ModelConfig
from medvlm3d.model.encoder3d import Encoder3DConfig
from medvlm3d.model.inter_slice import InterSliceConfig
from medvlm3d.model.llm import LLMConfig, LoRAConfig
from medvlm3d.model.projector import ProjectorConfig
from medvlm3d.model.slice_encoder import SliceEncoderConfig
from medvlm3d.model.tgis import TGISConfig
from medvlm3d.model.trainable import TrainablePolicy
from medvlm3d.data.select.base import VoteMIConfig
from medvlm3d.train.config import TrainConfig

__all__ = [
    "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "Encoder3DConfig",
    "SliceEncoderConfig", "InterSliceConfig", "TGISConfig", "VoteMIConfig", "ProjectorConfig",
    "LLMConfig", "LoRAConfig", "TrainablePolicy", "ConfigError", "PLANES", "PRESETS", "VARIANTS",
    "MAX_SIDE", "load_config", "save_config", "to_dict", "from_dict", "config_dir", "apply_overrides",
    "deep_merge", "import_plugins", "preset_names", "STAGE_KEYS",
]


def _get(raw: dict[str, Any], path: str) -> Any:
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plugins: tuple[str, ...] = ()  # modules or .py files imported before the sections are built

    # derived key -> its source: set in __post_init__, refused in YAML unless equal, never saved
    DERIVED: ClassVar[dict[str, str]] = {"model.encoder3d.img_size": "data.size"}

    def __post_init__(self) -> None:
        self.model.encoder3d.img_size = tuple(self.data.size)

    @classmethod
    def check_raw(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Drop each derived key equal to its source; a different value is a ConfigError."""
        out = raw
        for key, source in cls.DERIVED.items():
            given = _get(raw, key)
            if given is None:
                continue
            src = _get(raw, source)
            want = coerce(src, tuple[int, ...], source) if src is not None else DataConfig.size
            if coerce(given, tuple[int, ...], key) != tuple(want):
                raise ConfigError(
                    f"{key} is derived from {source} ({list(want)}); remove {key} (got {given!r}) "
                    f"or set {source}"
                )
            out = copy.deepcopy(out)
            *parents, leaf = key.split(".")
            node = out
            for p in parents:
                node = node[p]
            del node[leaf]
        return out


# --------------------------------------------------------------------------------------------
# plugins


def _plugin_module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
    return f"medvlm3d_plugin_{path.stem}_{digest}"


def import_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin once: a dotted module name, or a `.py` file (an absolute path here)."""
    for name in plugins:
        try:
            if str(name).endswith(".py"):
                path = Path(name)
                mod_name = _plugin_module_name(path)
                if mod_name in sys.modules:
                    continue
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                spec = importlib.util.spec_from_file_location(mod_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            else:
                importlib.import_module(str(name))
        except (ImportError, SyntaxError, OSError) as e:
            raise ConfigError(f"plugins: cannot import {name!r}: {type(e).__name__}: {e}") from e


def _plugin_list(value: Any, relative_to: Path, where: str) -> list[str]:
    """The `plugins` value as a list, each `.py` path made absolute against `relative_to`."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"plugins ({where}) must be a list of module names or .py paths, got {value!r}")
    return [str((relative_to / v).resolve()) if v.endswith(".py") else v for v in value]


def _union(a: Sequence[str], b: Sequence[str]) -> list[str]:
    return list(a) + [x for x in b if x not in a]


# --------------------------------------------------------------------------------------------
# reading


def config_dir() -> Path:
    """The folder of YAML configs shipped with the package."""
    return Path(str(resources.files("medvlm3d.configs")))


def _resolve(path_or_name: str | Path, relative_to: Path | None = None) -> Path:
    p = Path(path_or_name)
    candidates = [p]
    if relative_to is not None:
        candidates.append(relative_to / p)
    if p.suffix not in (".yaml", ".yml"):
        candidates.append(config_dir() / f"{p}.yaml")
    else:
        candidates.append(config_dir() / p)
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in config_dir().glob("*.yaml"))
    raise ConfigError(f"config {str(path_or_name)!r} not found; give a YAML path or one of {shipped}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"config {path} inherits from itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    if "plugins" in raw:
        raw["plugins"] = _plugin_list(raw["plugins"], path.parent.resolve(), str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml(_resolve(base, path.parent), seen + (path,))
    return _merge_layer(merged, raw)


def _merge_layer(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """deep_merge, except that the `plugins` lists add up."""
    out = deep_merge(base, update)
    if "plugins" in base or "plugins" in update:
        out["plugins"] = _union(base.get("plugins") or [], update.get("plugins") or [])
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars or lists."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not a plain YAML scalar or list ({e})") from e
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


# the keys a paper config's `stages:` block owns: a layer may not change them behind its back
STAGE_KEYS = ("lr", "lr_per_component", "max_steps", "epochs", "batch_size", "grad_accum", "global_batch",
              "warmup_steps", "warmup_ratio", "weight_decay", "distill_weight", "distill_schedule",
              "slice_loss_weight", "contrastive_temperature")


def _stage_blocks(raw: dict[str, Any], where: str) -> dict[str, Any] | None:
    """Pop and check the `stages:` mapping of a config (None when it declares none)."""
    blocks = raw.pop("stages", None)
    if blocks is None:
        return None
    if not isinstance(blocks, dict) or not all(isinstance(v, dict) for v in blocks.values()):
        raise ConfigError(f"{where}: 'stages' must map a stage name to a mapping of its keys")
    stages = _stage_names()
    unknown = sorted(set(blocks) - set(stages))
    if unknown:
        raise ConfigError(f"{where}: stages {unknown} are not stages; valid: {stages}")
    return blocks


def _select_stage(raw: dict[str, Any], blocks: dict[str, Any], layers: Sequence[str | Path],
                  overrides: Sequence[str], where: str) -> dict[str, Any]:
    """Apply the paper config's own block for the selected stage; refuse layers that set STAGE_KEYS."""
    selected = None
    for layer in layers:
        path = _resolve(layer)
        if path.resolve().parent == config_dir().resolve() and path.stem in _stage_names():
            selected = path.stem  # the generic overlay is replaced by the paper's block, not merged
            continue
        layer_raw = _read_yaml(path)
        clash = sorted(k for k in (layer_raw.get("train") or {}) if k in STAGE_KEYS)
        if clash or (layer_raw.get("model") or {}).get("trainable") is not None:
            keys = [f"train.{k}" for k in clash] + (["model.trainable"] if "trainable" in (layer_raw.get("model") or {}) else [])
            raise ConfigError(
                f"{where} declares its own stage hyper-parameters under 'stages:' ({sorted(blocks)}); the layer "
                f"{path} would change {keys}. Select a stage by name (e.g. --stage stage1_align) and change a "
                f"value with an explicit override (e.g. train.lr=1e-4)")
        raw = _merge_layer(raw, layer_raw)
        selected = (layer_raw.get("train") or {}).get("stage", selected)
    for item in overrides:  # an explicit train.stage=... selects too (the last one wins)
        key, _, value = item.partition("=")
        if key.strip() == "train.stage":
            selected = value.strip()
    selected = selected or (raw.get("train") or {}).get("stage") or TrainConfig.stage
    if selected not in blocks:
        raise ConfigError(f"{where} declares stages {sorted(blocks)} under 'stages:'; {selected!r} is not one of them")
    raw = deep_merge(raw, blocks[selected])
    raw.setdefault("train", {})["stage"] = selected
    return raw


def load_config(
    path_or_name: str | Path | dict[str, Any] = "demo",
    overrides: Sequence[str] = (),
    layers: Sequence[str | Path] = (),
) -> RunConfig:
    """Read a run config from a YAML path, a shipped config name (e.g. "demo"), or a dict.

    `layers` are further YAMLs (paths or shipped names, e.g. a stage such as "stage1_align")
    deep-merged on top in order; `overrides` (`a.b=value`) are applied last. The `plugins` of
    all of them are imported before any section is built.
    """
    if isinstance(path_or_name, dict):
        raw = copy.deepcopy(dict(path_or_name))
        if "plugins" in raw:
            raw["plugins"] = _plugin_list(raw["plugins"], Path.cwd(), "the given mapping")
    else:
        raw = _read_yaml(_resolve(path_or_name))
    where = f"config {path_or_name!r}" if not isinstance(path_or_name, dict) else "the given config"
    blocks = _stage_blocks(raw, where)
    if blocks is not None:
        raw = _select_stage(raw, blocks, layers, overrides, where)
        layers = ()
    for layer in layers:
        raw = _merge_layer(raw, _read_yaml(_resolve(layer)))
    before = list(raw.get("plugins") or [])
    raw = apply_overrides(raw, overrides)
    if raw.get("plugins") != before and raw.get("plugins") is not None:
        raw["plugins"] = _union(before, _plugin_list(raw["plugins"], Path.cwd(), "overrides"))
    import_plugins(raw.get("plugins") or ())
    return from_dict(RunConfig, raw)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write `cfg` as YAML (derived keys left out; plugins kept, so loading re-imports them)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def _stage_names() -> list[str]:
    """The registered stages (train/stages/, plugins); imported on use, as train/stages imports this module's users."""
    from medvlm3d.train.stages import STAGES

    return STAGES.names()
