"""Reading volumes and datasets, and making batches.

    load_volume(path, size=(D, H, W), modality="auto") -> float32 tensor [1, D, H, W] in [0, 1]
    load_study(path | [paths], cfg) -> Study (volume + slice views)
    read_records(source, kind="auto") -> list of manifest dicts
    DataError (a ValueError) for every bad input; its message names the file or record.
"""

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.data.readers import (
    ReadReport,
    detect_kind,
    read_records,
    read_records_report,
    validate_record,
    write_manifest,
)
from medvlm3d.data.volume import Study, load_study, load_volume, slice_views

__all__ = [
    "DataError",
    "ConfigError",
    "load_volume",
    "load_study",
    "slice_views",
    "Study",
    "read_records",
    "read_records_report",
    "detect_kind",
    "validate_record",
    "write_manifest",
    "ReadReport",
]
