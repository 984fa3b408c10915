"""Slice selection on the data side: `SELECTORS` (see base.py) and the per-study step (step.py).

Every module of this folder is imported here, so that dropping a file registers its selector.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import SELECTORS, Selector, SliceSelection, build_selector

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["SELECTORS", "Selector", "SliceSelection", "build_selector"]
