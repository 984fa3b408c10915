"""Training stages, by name (`train.stage`): one file per stage, registered in `STAGES`.

    get_stage(name) -> Stage        an instance of the registered stage (ConfigError when unknown)

Every module of this package is imported here, so dropping a file that registers a `Stage`
subclass in this folder (or in a `plugins:` module) adds a stage: its name in YAML selects it.
"""

from __future__ import annotations

import importlib
import pkgutil

from medvlm3d.train.stages.base import STAGES, LossContext, Stage, get_stage, summed

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["STAGES", "LossContext", "Stage", "get_stage", "summed"]
