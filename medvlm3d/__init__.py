"""medvlm3d: vision-language models for 3D medical images (CT, MRI).

Public API:
    load_config(path_or_name, overrides=()) -> RunConfig
    build_model(cfg) -> MedVLM            (imports torch lazily)
    load_pretrained(dir) -> MedVLM
    DataError, ConfigError                (both subclass ValueError)

Volumes and datasets: `medvlm3d.data.load_volume`, `medvlm3d.data.read_records`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medvlm3d.data.errors import ConfigError, DataError

if TYPE_CHECKING:
    from medvlm3d.config import RunConfig, load_config

__version__ = "0.1.0"
__all__ = ["load_config", "build_model", "load_pretrained", "DataError", "ConfigError", "RunConfig"]


def build_model(cfg: Any, **kwargs: Any) -> Any:
    """Build the composite model from a `RunConfig` (or its `ModelConfig`)."""
    from medvlm3d.model.medvlm import build_model as _build

    return _build(cfg, **kwargs)


def load_pretrained(path: str, **kwargs: Any) -> Any:
    """Rebuild a model from a checkpoint folder written by `save_pretrained`."""
    from medvlm3d.model.checkpoint import load_pretrained as _load

    return _load(path, **kwargs)


def __getattr__(name: str) -> Any:
    # `load_config` and `RunConfig` import every component's config module (torch, MONAI, timm):
    # done on first use, so `import medvlm3d` and `medvlm3d --help` stay fast.
    if name in ("load_config", "RunConfig"):
        import medvlm3d.config

        return getattr(medvlm3d.config, name)
    raise AttributeError(f"module 'medvlm3d' has no attribute {name!r}")
