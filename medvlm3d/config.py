"""The run configuration: `RunConfig` and its loader (YAML, `base:` inheritance, `key=value`
overrides, strict unknown-key errors).

Transitional: the dataclasses still live in `medvlm3d/data/config.py` and are re-exported
here; import every config type from `medvlm3d.config`.
"""

from medvlm3d.data.config import *  # noqa: F401,F403
from medvlm3d.data.config import (  # noqa: F401
    PLANES, PRESETS, ConfigError, apply_overrides, config_dir, deep_merge, from_dict, load_config,
    save_config, to_dict,
)
