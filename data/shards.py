"""Preprocessed-study shards: the writer, the index and the memory-mapped reader of `data.preprocessed`.

A cache folder written by `medvlm3d preprocess` (data/preprocess.py):

    <dir>/shards/shard-00000.safetensors   N studies each; study j of the shard holds the tensors
        j/volume [n_img, 1, D, H, W] float32   j/slices [n_img, S, 1, h, w] float32
        j/slice_plane, j/slice_index [n_img, S] long   j/slice_pos [n_img, S] float32
        j/native_depth [n_img] long
        j/preselect [n_img, k] long, j/teacher [n_img, S'] float32, j/slice_keep [n_img, P] long
            (the data-side selection, data/select/step.py; only when it depends on the slices alone)
      and in its header metadata "shard": JSON {version, entries: list of {key, id, image, offset, shapes} or
      {key, id, image, error} (a study that failed to load)}, so that a shard is self-describing
      and published by one atomic rename.
    <dir>/index.json   merged from the shard headers (any process can redo it, `merge_index`):
        {version, settings {flat key -> value}, settings_hash, shard_size, n_shards,
         studies {key -> {id, shard, offset, shapes}}, errors {key -> {id, image, error}}}

`settings(cfg)` are the preprocessing fields of `data` plus what the stored selection depends on
(`model.vote_mi.*`, `model.preselector`, `model.preselect_k`); `ShardCache.open` refuses a cache
whose settings differ from the run's with a ConfigError naming each differing key.
A study's key is `study_key(image, rescale)`: the record's image path(s), made absolute, and the
CT rescale of its metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError, DataError
from .transforms import PREPROCESS_FIELDS

SHARD_VERSION = 1
INDEX = "index.json"
STUDY_FIELDS = ("volume", "slices", "slice_plane", "slice_index", "slice_pos", "native_depth")
CHOSEN_FIELDS = ("preselect", "teacher", "slice_keep", "slice_context")


def shard_path(root: str | os.PathLike[str], i: int) -> Path:
    return Path(root) / "shards" / f"shard-{i:05d}.safetensors"


def study_key(image: Any, rescale: Sequence[float] | None = None) -> str:
    """A study's key in the index: its image path(s) made absolute, plus the CT rescale."""
    images = [image] if isinstance(image, (str, os.PathLike)) else list(image)
    paths = [os.path.abspath(os.fspath(p)) for p in images]
    return json.dumps([paths, None if rescale is None else [float(v) for v in rescale]])


def settings(data_cfg: Any, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat settings a cache depends on: the preprocessing fields of `data_cfg` (DataConfig),
    plus `selection` (`SelectionPlan.settings`) when the cache stores a selection."""
    out: dict[str, Any] = {"version": SHARD_VERSION}
    out |= {f"data.{f}": getattr(data_cfg, f) for f in PREPROCESS_FIELDS}
    out |= selection or {}
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from index.json


def settings_hash(s: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()


def write_shard(path: Path, entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> int:
    """One shard, atomically (temporary sibling then rename) -> bytes written. The bytes depend
    only on `entries` and `tensors` (safetensors sorts its keys)."""
    from medvlm3d.io import atomic_file

    # one metadata key: safetensors writes its metadata map in hash order, so several keys would
    # come out in a different order from one process to the next
    meta = {"shard": json.dumps({"version": SHARD_VERSION, "entries": entries}, sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path.stat().st_size


def shard_entries(path: Path) -> list[dict[str, Any]] | None:
    """The entries of a finished shard, or None when it is absent or unreadable (then redone)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["shard"])["entries"]
    except Exception:  # a shard cut short by a crash outside atomic_file: written again
        return None


def merge_index(root: str | os.PathLike[str], n_shards: int, s: dict[str, Any], shard_size: int) -> dict[str, Any]:
    """index.json from the headers of shards 0..n_shards-1 (all must be finished), atomically."""
    from medvlm3d.io import atomic_write_json

    studies: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for i in range(n_shards):
        entries = shard_entries(shard_path(root, i))
        if entries is None:
            raise DataError(f"{shard_path(root, i)}: shard missing or unreadable; run preprocess again")
        for e in entries:
            if "error" in e:
                errors[e["key"]] = {"id": e["id"], "image": e["image"], "error": e["error"]}
            else:
                studies[e["key"]] = {"id": e["id"], "shard": i, "offset": e["offset"], "shapes": e["shapes"]}
    index = {"version": SHARD_VERSION, "settings": s, "settings_hash": settings_hash(s), "shard_size": shard_size,
             "n_shards": n_shards, "studies": dict(sorted(studies.items())), "errors": dict(sorted(errors.items()))}
    atomic_write_json(Path(root) / INDEX, index, indent=None, sort_keys=True)
    return index


def check_settings(stored: dict[str, Any], wanted: dict[str, Any], where: str, what: str = "data.preprocessed",
                   fix: str = "medvlm3d preprocess") -> None:
    """ConfigError naming every key whose value differs between a cache and the run. The
    selection keys (`model.*`) are compared only when both sides have them: a cache without a
    stored selection, or a run without one, selects as it loads; a run with the teacher off
    takes a cache made with any teacher mode."""
    both_select = any(k.startswith("model.") for k in stored) and any(k.startswith("model.") for k in wanted)
    keys = sorted(k for k in set(stored) | set(wanted) if both_select or not k.startswith("model."))
    if wanted.get("model.vote_mi.teacher") == "off" and "model.vote_mi.teacher" in keys:  # the run reads no teacher; the picks do not depend on it
        keys.remove("model.vote_mi.teacher")
    diff = [f"{k}: cache {stored.get(k, '<absent>')!r} vs run {wanted.get(k, '<absent>')!r}"
            for k in keys if stored.get(k, "<absent>") != wanted.get(k, "<absent>")]
    if diff:
        raise ConfigError(f"{what} {where} was made with other settings; differing keys: "
                          f"{'; '.join(diff)} (run `{fix}` again with this config)")


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class MappedShard:
    """One shard file as zero-copy tensors: `get_tensor(name)` is a view of a read-only memory
    map of the file, so a study costs no read and no copy until its bytes are used (the
    collator then copies them once, into the batch). The views must not be written to (the
    page is read-only: a write would crash): every transform returns new tensors."""

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # absent, unreadable or empty
            raise DataError(f"{path}: cannot map the shard ({type(e).__name__}: {e}); run preprocess again") from e
        try:
            (n,) = struct.unpack("<Q", self._map[:8])
            self._header = json.loads(self._map[8:8 + n])
        except (struct.error, ValueError) as e:
            raise DataError(f"{path}: not a safetensors shard ({type(e).__name__}: {e})") from e
        self._start = 8 + n

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self._header[name]
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        with warnings.catch_warnings():  # "buffer is not writable": read-only on purpose (above)
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=self._start + begin)
        return flat.view(info["shape"])


def axial_view(volume: torch.Tensor) -> torch.Tensor:
    """volume [n_img, 1, D, H, W] -> its axial slices [n_img, D, 1, H, W] as a view (no copy):
    what `slice_views` gives for planes (axial,), num_slices 0 and slice_size (H, W)."""
    return volume.transpose(1, 2)


class ShardCache:
    """Reads studies from a preprocessed folder: `get(key) -> (tensors, chosen)`, where tensors
    holds STUDY_FIELDS and chosen the stored selection (may be empty), as views of the
    memory-mapped shard (`MappedShard`). When a study's stored slices equal its volume's axial
    rows (axial plane only, num_slices 0, slice_size = (H, W): the real-size configs), `slices`
    is `axial_view(volume)`, the same memory, and the collator copies it once for both. Shard files are mapped on first use, once per process
    (DataLoader workers each map their own)."""

    def __init__(self, root: str | os.PathLike[str], wanted: dict[str, Any] | None = None,
                 what: str = "data.preprocessed") -> None:
        """`wanted`: the run's `settings(...)`; a cache made with other ones is a ConfigError.
        `what`: the config key that named the folder (data.features: a `medvlm3d encode` folder)."""
        self.root = Path(root)
        index_file = self.root / INDEX
        if not index_file.is_file():
            verb = "encode" if what == "data.features" else "preprocess"
            raise ConfigError(f"{what} {self.root}: no {INDEX}; run `medvlm3d {verb} --out {self.root}`")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            self.studies: dict[str, Any] = index["studies"]
            self.errors: dict[str, Any] = index["errors"]
            self.settings: dict[str, Any] = index["settings"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index_file}: not a {what} index ({type(e).__name__}: {e})") from e
        if wanted is not None:
            check_settings(self.settings, wanted, str(self.root))
        self.has_selection = any(k.startswith("model.") for k in self.settings)
        self._open: dict[int, Any] = {}
        self._same: dict[str, bool] = {}  # study key -> slices equal the volume's axial view
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no open handles travel
        return {**self.__dict__, "_open": {}}

    def _shard(self, i: int) -> Any:
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if i not in self._open:
            self._open[i] = MappedShard(shard_path(self.root, i))
        return self._open[i]

    def get(self, key: str, where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if key in self.errors:
            raise DataError(f"{where}: failed when preprocessed: {self.errors[key]['error']}")
        entry = self.studies.get(key)
        if entry is None:
            raise DataError(f"{where}: not in data.preprocessed {self.root} (study {key}); preprocess this dataset")
        f, j = self._shard(int(entry["shard"])), int(entry["offset"])
        tensors = {name: f.get_tensor(f"{j}/{name}") for name in STUDY_FIELDS}
        axial = axial_view(tensors["volume"])
        same = self._same.get(key)
        if same is None:  # compared once per study and process (a read, no copy)
            same = self._same[key] = tuple(axial.shape) == tuple(tensors["slices"].shape) and bool(
                torch.equal(axial, tensors["slices"]))
        if same:  # the slices ARE the volume's axial rows: one tensor, so the batch copies it once
            tensors["slices"] = axial
        chosen = {name: f.get_tensor(f"{j}/{name}") for name in CHOSEN_FIELDS if name in entry["shapes"]}
        return tensors, chosen
