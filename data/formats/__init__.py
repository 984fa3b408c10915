"""Dataset formats, one file each, registered in `DATASETS` (data/formats/base.py).

    manifest  (order 10)  a .jsonl manifest (DESIGN.md), the native format
    m3d_cap   (order 20)  M3D_Cap.json + report .txt files
    m3d_vqa   (order 30)  an M3D-VQA .csv
    ct_rate   (order 40)  a CT-RATE root (radiology_text_reports/, NIfTI volumes)

`data.kind: auto` asks the formats in ascending (order, name) -- the order above, then any added
format (default order 100) -- and reads with the first whose `detect(source)` says yes.

Importing this package imports every module in this folder, so adding a format is one new file
here that registers a `DatasetFormat` subclass with `@DATASETS.register("<name>")`; a format
defined elsewhere (a test, a `plugins:` module) registers the same way once imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import DATASETS, DatasetFormat, describe_formats, detection_order

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATASETS", "DatasetFormat", "describe_formats", "detection_order"]
