"""Reading volumes and datasets, and making batches.

    load_volume(path, size=(D, H, W), modality="auto") -> float32 tensor [1, D, H, W] in [0, 1]
    load_study(path | [paths], cfg) -> Study (volume + slice views)
    read_records(source, kind="auto") -> list of manifest dicts
    DataError (a ValueError) for every bad input; its message names the file or record.

The volume and reader names are imported on first use, so `import medvlm3d` (and every CLI
`--help`) does not pay for importing MONAI and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from medvlm3d.data.errors import ConfigError, DataError

_LAZY = {
    "load_volume": "medvlm3d.data.volume",
    "load_study": "medvlm3d.data.volume",
    "slice_views": "medvlm3d.data.volume",
    "Study": "medvlm3d.data.volume",
    "read_records": "medvlm3d.data.readers",
    "read_records_report": "medvlm3d.data.readers",
    "detect_kind": "medvlm3d.data.readers",
    "get_format": "medvlm3d.data.readers",
    "DATASETS": "medvlm3d.data.formats",
    "DatasetFormat": "medvlm3d.data.formats",
    "validate_record": "medvlm3d.data.readers",
    "write_manifest": "medvlm3d.data.readers",
    "ReadReport": "medvlm3d.data.readers",
    "validate_dataset": "medvlm3d.data.validate",
}

__all__ = ["DataError", "ConfigError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medvlm3d.data' has no attribute {name!r}")
