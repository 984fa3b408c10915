"""Pre-encoded features on disk: the persistent version of the frozen-encoder memo (model/feature_cache.py).

`medvlm3d encode --checkpoint <dir> --data <source> --out <dir>` runs the checkpoint's frozen
encoders once over every study and writes their outputs into shards, with the work split,
atomic shards, skip-finished and index merge of `medvlm3d preprocess` (data/preprocess.py:
`run_sharded`; data/shards.py):

    <dir>/shards/shard-00000.safetensors   the features of the shard's studies, deduplicated:
        encoder3d/keys [R3, 16] uint8      encoder3d/feats [R3, N3, D3]    one row per image (volume [1, D, H, W])
        slice_encoder/keys [R2, 16] uint8  slice_encoder/feats [R2, T, D2] one row per real slice ([1, h, w])
    <dir>/index.json   data/shards.py's index; its settings hold the preprocessing fields, the
        SHA-256 of each encoder's weights (`encoder.<name>.sha256`) and `features.dtype`.

A row is keyed by `feature_cache.row_keys` of the encoder's input exactly as the model receives it
(one volume row; one real slice): training looks its inputs up by content, so a feature is used
only for the very input it was computed from, whatever the batch, its padding or the slice
pre-selection. `FeatureStore.encode(name, *inputs)` returns the encoder's output for a batch
([N, N3, D3] or [N, S, T, D2], padded slices 0, as the encoders give), or None when a row is
missing (the model then runs the encoder: a miss costs time, never correctness).

`FeatureStore(root, wanted)` refuses a folder whose settings differ from the run's (ConfigError
naming each key: another checkpoint's encoders, other preprocessing); `MedVLM.use_features`
refuses features for an encoder that is trainable in the stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.model.feature_cache import row_keys

log = logging.getLogger(__name__)

ENCODERS = ("encoder3d", "slice_encoder")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NUMPY = {"BF16": ("<i2", torch.bfloat16), "F16": ("<f2", torch.float16), "F32": ("<f4", torch.float32)}  # safetensors


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def feature_settings(vlm: Any, data_cfg: Any, dtype: str) -> dict[str, Any]:
    """The settings a features folder depends on: the preprocessing of `data_cfg`, each present
    encoder's weight hash and the stored dtype."""
    from medvlm3d.data.shards import settings

    s = settings(data_cfg)
    for name in ENCODERS:
        if getattr(vlm, name, None) is not None:
            s[f"encoder.{name}.sha256"] = weights_hash(getattr(vlm, name))
    s["features.dtype"] = dtype
    return s


class FeatureStore:
    """Reads a features folder: `encode(name, *inputs)` -> the stored outputs, or None on a miss."""

    def __init__(self, root: str | os.PathLike[str], wanted: dict[str, Any] | None = None) -> None:
        from medvlm3d.data.shards import ShardCache, check_settings, shard_path

        self.root = Path(root)
        index = ShardCache(self.root, None, what="data.features")  # reads and checks index.json
        self.settings = index.settings
        if wanted is not None:  # any stored dtype will do
            check_settings(self.settings, {**wanted, "features.dtype": self.settings.get("features.dtype")},
                           str(self.root), what="data.features", fix="medvlm3d encode")
        self.names = tuple(n for n in ENCODERS if f"encoder.{n}.sha256" in self.settings)
        n_shards = int(json.loads((self.root / "index.json").read_text(encoding="utf-8"))["n_shards"])
        self._files = [shard_path(self.root, i) for i in range(n_shards)]
        self._where: dict[str, dict[bytes, tuple[int, int]]] = {n: {} for n in self.names}
        from safetensors import safe_open

        for i, path in enumerate(self._files):
            with safe_open(str(path), framework="pt") as f:
                for name in self.names:
                    keys = f.get_tensor(f"{name}/keys")
                    for r, k in enumerate(keys.numpy()):
                        self._where[name].setdefault(bytes(k), (i, r))
        self._feats: dict[tuple[str, int], Any] = {}  # memory maps, opened on first use in each process
        self.hits = self.misses = 0

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers and spawned processes map their own
        return {**self.__dict__, "_feats": {}}

    def _map(self, name: str, i: int) -> Any:
        """`<name>/feats` of shard i as a read-only numpy memory map (bf16 as int16): a batch reads
        only its own rows, and the page cache is shared by every process of the node."""
        if (name, i) not in self._feats:
            import numpy as np

            with open(self._files[i], "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                info = json.loads(f.read(n))[f"{name}/feats"]
            start, _ = info["data_offsets"]
            self._feats[(name, i)] = (np.memmap(self._files[i], dtype=NUMPY[info["dtype"]][0], mode="r",
                                                offset=8 + n + start, shape=tuple(info["shape"])),
                                      NUMPY[info["dtype"]][1])
        return self._feats[(name, i)]

    def _rows(self, name: str, keys: list[bytes]) -> torch.Tensor | None:
        where = self._where[name]
        found = [where.get(k) for k in keys]
        if any(w is None for w in found):
            self.misses += 1
            return None
        self.hits += 1
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for p, (i, r) in enumerate(found):  # type: ignore[misc]
            by_shard.setdefault(i, ([], []))[0].append(p)
            by_shard[i][1].append(r)
        out = None
        for i, (pos, rows) in by_shard.items():
            arr, dtype = self._map(name, i)
            part = torch.from_numpy(arr[rows]).view(dtype)  # a copy of these rows only
            if out is None:
                out = part.new_empty(len(keys), *part.shape[1:])
            out[pos] = part
        return out

    def encode(self, name: str, *inputs: torch.Tensor) -> torch.Tensor | None:
        """encoder3d(volumes [N,1,D,H,W]) -> [N, N3, D3]; slice_encoder(slices [N,S,1,h,w], mask [N,S])
        -> [N, S, T, D2] (0 at padding); in the inputs' dtype and device. None: some row is missing."""
        if name not in self.names:
            return None
        x = inputs[0]
        if name == "encoder3d":
            rows = self._rows(name, row_keys(x))
            return None if rows is None else rows.to(device=x.device, dtype=x.dtype)
        mask = inputs[1].to(torch.bool)
        rows = self._rows(name, row_keys(x[mask]))
        if rows is None:
            return None
        out = x.new_zeros(*mask.shape, *rows.shape[1:])
        out[mask.to(x.device)] = rows.to(device=x.device, dtype=x.dtype)
        return out


def attach_features(vlm: Any, root: str) -> FeatureStore:
    """The store of `root` for `vlm` (MedVLM.use_features): a ConfigError when it was made from
    other encoder weights or preprocessing, or when it holds features of an encoder trainable here."""
    store = FeatureStore(root, feature_settings(vlm, vlm.cfg.data, ""))
    for name in store.names:
        if any(p.requires_grad for p in getattr(vlm, name).parameters()):
            raise ConfigError(f"data.features {root} holds {name} features, but {name} is trainable in this "
                              f"stage (model.trainable.{name}); features stand only for a frozen encoder")
    if vlm.cfg.data.augment:
        log.warning("data.features with data.augment on: augmented volumes are not in %s, so their "
                    "encoders run as without features", root)
    vlm.train(vlm.training)  # a frozen encoder's stochastic layers held in eval mode, as when encoded
    return store


def _encode_shard(vlm: Any, data_cfg: Any, dtype: torch.dtype, on_error: str) -> Callable[..., None]:
    """The `write_one` of `run_sharded`: encode each study of a shard, then write the shard."""
    from medvlm3d.data.preprocess import study_failed
    from medvlm3d.data.shards import shard_path, write_shard
    from medvlm3d.data.volume import load_study

    enc_dtype = next(p for p in vlm.parameters() if p.is_floating_point()).dtype
    device = vlm.device

    def write_one(i: int, refs: Sequence[Any], root: Path, summary: Any) -> None:
        rows: dict[str, dict[bytes, torch.Tensor]] = {n: {} for n in ENCODERS}
        entries: list[dict[str, Any]] = []
        for j, ref in enumerate(refs):
            entry: dict[str, Any] = {"key": ref.key, "id": ref.id, "image": ref.image}
            try:
                study = load_study(ref.image, data_cfg, train=False, rescale=ref.rescale)
            except DataError as e:
                entries.append(study_failed(entry, ref, e, on_error, summary))
                continue
            with torch.no_grad():
                for v in study.volume.to(enc_dtype):  # one image at a time, as FeatureCache computes
                    if vlm.encoder3d is not None:
                        (k,) = row_keys(v[None])
                        rows["encoder3d"].setdefault(k, vlm.encoder3d(v[None].to(device))[0])
                for s in study.slices.to(enc_dtype):  # [S, 1, h, w]
                    if vlm.slice_encoder is not None:
                        feats = vlm.slice_encoder(s[None].to(device), torch.ones(1, s.shape[0], dtype=torch.bool,
                                                                              device=device))[0]
                        for k, f in zip(row_keys(s), feats):
                            rows["slice_encoder"].setdefault(k, f)
            entries.append(entry | {"offset": j, "shapes": {"volume": list(study.volume.shape),
                                                            "slices": list(study.slices.shape)}})
            summary.done += 1
        tensors: dict[str, torch.Tensor] = {}
        for name in ENCODERS:
            if getattr(vlm, name) is None:
                continue
            keys = sorted(rows[name])  # content order: the same whatever the process count
            tensors[f"{name}/keys"] = torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 16)
            tensors[f"{name}/feats"] = (torch.stack([rows[name][k] for k in keys]).to("cpu", dtype) if keys
                                        else torch.zeros(0, dtype=dtype))
        summary.bytes_written += write_shard(shard_path(root, i), entries, tensors)

    return write_one


def run_encode(vlm: Any, source: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "bf16",
               shard_size: int = 64, on_error: str = "skip", rank: int = 0, world: int = 1,
               barrier: Callable[[], None] | None = None, progress: bool = False) -> Any:
    """Encode every study of `source` with `vlm`'s encoders (its config's data section sets the
    preprocessing) into `out` -> data.preprocess.Summary. See the module docstring."""
    from medvlm3d.data.preprocess import check_on_error, list_studies, run_sharded

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_on_error(on_error)
    vlm.eval()
    data_cfg = dataclasses.replace(vlm.cfg.data, cache_dir="", preprocessed="", features="", augment=False)
    refs = list_studies(source, data_cfg, on_error)
    if not refs:
        raise DataError(f"{source}: no studies to encode")
    s = feature_settings(vlm, data_cfg, dtype)
    return run_sharded(refs, out, s, shard_size, _encode_shard(vlm, data_cfg, DTYPES[dtype], on_error),
                       rank=rank, world=world, barrier=barrier, progress=progress, desc="encode")
