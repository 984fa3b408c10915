"""Exception types of medvlm3d.

`DataError` is raised for every bad input (a corrupt volume, a missing file, a malformed record).
`ConfigError` is raised for a bad configuration (an unknown key, a value out of range).
Both subclass `ValueError`, and their message always names the file, record or key at fault.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file or record and says what was expected."""


class ConfigError(ValueError):
    """Bad configuration. The message names the key and lists what is valid."""
