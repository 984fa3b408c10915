"""A memo of frozen encoder outputs, keyed by the content of each image's inputs.

In stages 1 and 2 the 3D encoder and the slice encoder are usually frozen, and every epoch feeds
them the same studies: their outputs can be computed once. On the demo's 2-core CPU the frozen
slice encoder takes most of a stage-2 step (bench/bench_train.py prints the gain).

    cache = FeatureCache(max_bytes)
    out = cache.run("slice_encoder", module, slices, mask)   # slices [N, ...], mask [N, ...]
        -> module(slices, mask) [N, ...], computed only for the rows not seen before

Rows not seen before are computed in chunks of exactly `CHUNK_ROWS` rows (the last one padded with
copies of its first row), so every row goes through the same shapes whatever batch it came in,
and whether it came from the cache or not: a resumed run, whose cache starts empty, computes
exactly what the uninterrupted run had stored (tests/model/test_feature_cache.py checks that a
row's output does not depend on its chunk-mates or its place in the chunk; the batched forward of
a run without the cache may differ from it by rounding, ~1e-6). Chunks of 4 rather than single rows:
MONAI's 3D ResNet takes 17.7 ms a row in a chunk of 4 and 36.6 ms alone (1 thread).

Each row i of the batch is keyed by a SHA-256 digest of row i of every input (bytes, shape and
dtype): a key cannot go stale, whatever produced the batch (another study order, augmentation,
another padding). SHA-256 rather than BLAKE2: with the CPU's SHA instructions it hashes a 512 KB
volume 2.6x faster here (11 ms against 29 ms for 32 rows), and hashing is most of a cache hit.
Inputs shared by several cached functions are hashed once: `keys = row_keys(...)`, then
`run(..., keys=keys)` for each. (The slice-selection teacher is no longer cached here: it is
computed on the data side, data/select/, and cached with the preprocessed volume.)

A module is cached only when it is frozen (no parameter requires grad) and deterministic (no
dropout, drop-path or batch-norm in training mode; `MedVLM.train()` holds those layers of a
frozen encoder in eval mode): `check_cacheable` says why not. The cache does not
survive the process; with DeepSpeed ZeRO-3 it must stay off, since every rank must run
each partitioned module's forward together (`train/recipe.py` enables it).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medvlm3d.model.trainable import stochastic_layers

CHUNK_ROWS = 4  # rows per forward of the cached module (see the module docstring)


def check_cacheable(module: nn.Module) -> str:
    """'' when `module`'s outputs may be cached, else the reason they may not: it must have no
    trainable parameter, and no norm with running statistics or dropout / drop-path (p > 0) may
    be in training mode (`model.trainable.hold_frozen_in_eval` puts a frozen encoder's there)."""
    if any(p.requires_grad for p in module.parameters()):
        return "it has trainable parameters"
    for m in stochastic_layers(module):
        if not m.training:
            continue
        if isinstance(m, _NormBase):
            return f"{type(m).__name__} normalises with batch statistics (training mode)"
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else m.drop_prob
        if p > 0:
            return f"{type(m).__name__} drops with p={p} (training mode)"
    return ""


def row_keys(*tensors: torch.Tensor) -> list[bytes]:
    """One digest per row (dim 0) of the tensors together: [N] keys."""
    n = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != n for t in tensors):
        raise ValueError(f"FeatureCache: inputs must share dim 0, got {[tuple(t.shape) for t in tensors]}")
    if n == 0:
        return []
    rows = []  # per tensor: (the row header, the rows as one [N, -1] array: no copy)
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        flat = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).reshape(n, -1).numpy()
        rows.append((f"{tuple(t.shape[1:])}{t.dtype}".encode(), flat))
    keys = []
    for i in range(n):
        h = hashlib.sha256()
        for head, flat in rows:
            h.update(head)
            h.update(flat[i].data)
        keys.append(h.digest()[:16])
    return keys


class FeatureCache:
    """Outputs of frozen modules per input row, up to `max_bytes` in all (then new rows are
    computed and not stored). `hits` and `misses` count rows."""

    def __init__(self, max_bytes: int) -> None:
        if not (isinstance(max_bytes, int) and max_bytes > 0):
            raise ValueError(f"FeatureCache: max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[tuple[str, bytes], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def run(self, name: str, module: Callable[..., torch.Tensor], *inputs: torch.Tensor,
            keys: list[bytes] | None = None) -> torch.Tensor:
        """module(*inputs) [N, ...] with the rows already seen under `name` taken from the cache.
        `keys`: `row_keys` of these inputs, or of more tensors that include them (default: computed)."""
        keys = row_keys(*inputs) if keys is None else keys
        if len(keys) != int(inputs[0].shape[0]):
            raise ValueError(f"FeatureCache: {len(keys)} keys for {int(inputs[0].shape[0])} rows")
        found = [self._store.get((name, k)) for k in keys]
        miss = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        for start in range(0, len(miss), CHUNK_ROWS):
            rows = miss[start:start + CHUNK_ROWS]
            index = torch.tensor(rows + [rows[0]] * (CHUNK_ROWS - len(rows)), device=inputs[0].device)
            with torch.no_grad():  # always CHUNK_ROWS rows: an output never depends on its chunk
                out = module(*(t.index_select(0, index) for t in inputs)).detach()
            for j, i in enumerate(rows):
                row = out[j].clone()
                found[i] = row
                size = row.numel() * row.element_size()
                if self.bytes + size <= self.max_bytes:
                    self._store[(name, keys[i])] = row
                    self.bytes += size
        device = inputs[0].device
        return torch.stack([f.to(device) for f in found])  # type: ignore[union-attr]
