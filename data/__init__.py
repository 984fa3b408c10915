"""Reading volumes and datasets, and making batches.

    load_volume(path, size=(D, H, W), modality="auto") -> float32 tensor [1, D, H, W] in [0, 1]
    read_records(source, kind="auto") -> list of manifest dicts
"""

from medvlm3d.data.errors import ConfigError, DataError

__all__ = ["DataError", "ConfigError"]
