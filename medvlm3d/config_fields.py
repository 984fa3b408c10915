"""Shared machinery of the typed configs: field checks, YAML-value coercion, presets, dict I/O.

Torch-free and free of any component: every component module (model/encoder3d.py,
model/tgis.py, data/dataset.py, ...) imports its checks from here, and `medvlm3d.config`
composes the sections into `RunConfig`. A component module never imports `medvlm3d.config`.

    from_dict(cls, mapping, prefix) -> instance of dataclass `cls` (unknown key -> ConfigError)
    to_dict(instance) -> plain nested dict (tuples as lists), ready for `yaml.safe_dump`
    coerce(value, annotated_type, key) -> the YAML value converted to the field's type
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Sequence

from medvlm3d.data.errors import ConfigError

PLANES = ("axial", "coronal", "sagittal")
MAX_SIDE = 2048  # largest accepted side of data.size / data.slice_size (voxels or pixels)


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def check_positive(key: str, value: Sequence[int], n: int, upper: int | None = None) -> None:
    """`value` must be `n` positive integers (each <= `upper` when given)."""
    if len(value) != n or any(int(v) <= 0 for v in value):
        raise ConfigError(f"{key} must be {n} positive integers, got {value!r}")
    if upper is not None and any(int(v) > upper for v in value):
        raise ConfigError(f"{key} must be {n} integers in 1..{upper}, got {value!r}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated field type, recursing into dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(coerce(v, elem, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        args = typing.get_args(tp)
        elem = args[1] if len(args) == 2 else Any
        return {k: coerce(v, elem, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (no/yes) as a bool
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


# Named presets per section. A YAML section may say `preset: vit3d_m3d`; the preset's fields
# come first and the section's own keys override them. The owning module fills its entry, e.g.
# `PRESETS[Encoder3DConfig] = {...}` in model/encoder3d.py.
PRESETS: dict[type, dict[str, dict[str, Any]]] = {}


def preset_names(cls: type) -> list[str]:
    return sorted(PRESETS.get(cls, {}))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys (a `preset` key expands first).

    A class with a `check_raw(mapping) -> mapping` classmethod sees the raw mapping first (e.g.
    `RunConfig` refuses a derived key whose value disagrees with its source).
    """
    if hasattr(cls, "check_raw"):
        data = cls.check_raw(data)
    if "preset" in data:
        data = dict(data)
        name = data.pop("preset")
        table = PRESETS.get(cls, {})
        if name not in table:
            where = f"{prefix}.preset" if prefix else "preset"
            raise ConfigError(f"{where}: unknown preset {name!r}; known: {sorted(table)}")
        data = {**table[name], **data}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for `yaml.safe_dump`.

    Dotted paths in the class's `DERIVED` mapping (derived values) are left out.
    """

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(dataclasses.asdict(cfg))
    for path in getattr(cfg, "DERIVED", {}):
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out
