"""`medvlm3d preprocess`: read every study of a dataset once, preprocess it as a run config says and
write it into shards (data/shards.py) that training and eval read with `data.preprocessed`.

    studies = list_studies(source, data_cfg)            -> [StudyRef]: distinct studies, in record order
    summary = run_preprocess(source, cfg, out, shard_size=64, on_error="skip",
                             rank=0, world=1, barrier=None, progress=False) -> Summary

Work split: study k goes to shard k // shard_size; process `rank` of `world` writes the shards
i with i % world == rank, in order. Each shard is written whole, then renamed into place, so a
process that dies leaves no half shard and a rerun skips the shards already there. After
`barrier()` rank 0 merges the shard headers into index.json (`merge_index`, which any process
can redo). What a shard holds depends only on its studies and the settings, never on `world`:
the output is byte-identical whatever the process count (one torch thread per process).

Each study goes through the same path as training: `volume.load_study` (readers, orientation,
intensity, resize, slices) and, when the selectors read the slices alone
(`SelectionPlan.for_cache`), the data-side selection (`select.step.choose`: pre-selection,
Vote-MI teacher, picks), stored with the study so that the loader runs no Vote-MI.

A study that fails to load is recorded in its shard (and the index) with its message
(`on_error="skip"`), or stops the run with a DataError naming the file (`on_error="stop"`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import ConfigError, DataError
from .shards import merge_index, settings, shard_entries, shard_path, study_key, write_shard

log = logging.getLogger(__name__)


@dataclass
class StudyRef:
    key: str
    id: str
    image: Any
    rescale: tuple[float, float] | None


@dataclass
class Summary:
    studies: int = 0
    shards: int = 0
    done: int = 0  # studies written by this process
    skipped: int = 0  # studies in shards that were already there
    failed: int = 0  # studies recorded as errors by this process
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0  # this process's peak resident memory (ru_maxrss)
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.studies} studies in {self.shards} shards: done {self.done}, skipped (already there) "
                f"{self.skipped}, failed {self.failed}, {self.bytes_written / 1e9:.3f} GB written "
                f"in {self.seconds:.1f} s, peak RSS {self.peak_rss_mib:.0f} MiB")


def list_studies(source: str | os.PathLike[str], data_cfg: Any, on_error: str = "skip") -> list[StudyRef]:
    """The distinct studies (by image path(s) and rescale) of every split of `source`, in the
    order of their first record."""
    from .dataset import _rescale
    from .readers import read_records_report, resolve_source

    kind, split = resolve_source(source, data_cfg.kind, None, train=False)
    report = read_records_report(source, kind, data_root=data_cfg.data_root or None, split=split,
                                 vqa_mode=data_cfg.vqa_mode, ct_rate_target=data_cfg.ct_rate_target,
                                 skip_bad_records=on_error == "skip", allow_outside_root=data_cfg.allow_outside_root)
    for where, msg in report.errors:
        log.warning("record %s skipped: %s", where, msg)
    seen: dict[str, StudyRef] = {}
    for i, rec in enumerate(report.records):
        rid = str(rec.get("id", f"#{i}"))
        if not rec.get("image"):
            raise DataError(f"record {rid!r}: 'image' is missing or empty")
        rescale = _rescale(rec, rid)
        key = study_key(rec["image"], rescale)
        seen.setdefault(key, StudyRef(key, rid, rec["image"], rescale))
    return list(seen.values())


def _study_tensors(ref: StudyRef, data_cfg: Any, plan: Any, j: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Study j of its shard -> ({"j/name": tensor}, {name: shape})."""
    from .select.step import choose
    from .volume import Study, load_study

    study = load_study(ref.image, data_cfg, train=False, rescale=ref.rescale)
    t = {f.name: getattr(study, f.name) for f in dataclasses.fields(Study) if f.name != "native_depth"}
    t["native_depth"] = torch.tensor(study.native_depth, dtype=torch.long)
    if plan is not None:
        t |= choose(dict(t), plan, 0)
    return {f"{j}/{k}": v for k, v in t.items()}, {k: list(v.shape) for k, v in t.items()}


def study_failed(entry: dict[str, Any], ref: StudyRef, e: DataError, on_error: str, summary: Summary) -> dict[str, Any]:
    """A study that failed to load: its shard entry with the error (on_error skip), or a DataError (stop)."""
    if on_error == "stop":
        raise DataError(f"stopped at record {ref.id!r} ({ref.image}): {e}") from e
    log.warning("record %s: %s", ref.id, e)
    summary.failed += 1
    summary.errors.append(f"{ref.id}: {e}")
    return entry | {"error": str(e)}


def check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "stop"):
        raise ConfigError(f"--on-error must be skip or stop, got {on_error!r}")


def _write_one(i: int, refs: list[StudyRef], root: Path, data_cfg: Any, plan: Any, on_error: str,
               summary: Summary) -> None:
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    for j, ref in enumerate(refs):
        entry: dict[str, Any] = {"key": ref.key, "id": ref.id, "image": ref.image}
        try:
            t, shapes = _study_tensors(ref, data_cfg, plan, j)
        except DataError as e:
            entries.append(study_failed(entry, ref, e, on_error, summary))
            continue
        tensors |= t
        entries.append(entry | {"offset": j, "shapes": shapes})
        summary.done += 1
    summary.bytes_written += write_shard(shard_path(root, i), entries, tensors)


@contextmanager
def launched_ranks() -> Iterator[tuple[int, int, Callable[[], Any] | None]]:
    """(rank, world, barrier) of this process: under `accelerate launch` / torchrun a gloo process
    group (only a barrier is needed: gloo works on CPU and GPU nodes alike), torn down on exit;
    otherwise (0, 1, None). The `preprocess` and `encode` verbs run `run_sharded` inside it."""
    from medvlm3d.train.recipe import launched_distributed

    if not launched_distributed():
        yield 0, 1, None
        return
    import torch.distributed as dist

    dist.init_process_group(backend="gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), dist.barrier
    finally:
        dist.destroy_process_group()


def run_sharded(refs: list[StudyRef], out: str | os.PathLike[str], s: dict[str, Any], shard_size: int,
                write_one: Callable[[int, list[StudyRef], Path, Summary], None], rank: int = 0, world: int = 1,
                barrier: Callable[[], None] | None = None, progress: bool = False, desc: str = "preprocess") -> Summary:
    """The shared work split of `preprocess` and `encode` (model/features.py): study k goes to shard
    k // shard_size, rank r writes shards i % world == r by `write_one(i, refs_i, root, summary)`
    (which must write the shard atomically, `write_shard`), skipping the finished ones; after
    `barrier()` rank 0 merges the index with settings `s`."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    t0 = time.perf_counter()
    root = Path(out)
    n_shards = -(-len(refs) // shard_size)
    summary = Summary(studies=len(refs), shards=n_shards)
    mine = list(range(rank, n_shards, world))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"{desc} (rank 0 of {world})", unit="shard")
    for i in mine:
        refs_i = refs[i * shard_size:(i + 1) * shard_size]
        if shard_entries(shard_path(root, i)) is not None:
            summary.skipped += len(refs_i)
        else:
            write_one(i, refs_i, root, summary)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if barrier is not None:
        barrier()
    if rank == 0:
        merge_index(root, n_shards, s, shard_size)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return summary


def run_preprocess(source: str | os.PathLike[str], cfg: Any, out: str | os.PathLike[str], shard_size: int = 64,
                   on_error: str = "skip", rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
                   progress: bool = False) -> Summary:
    """See the module docstring. `cfg`: a RunConfig (its data and model sections are read)."""
    from .select.step import SelectionPlan

    check_on_error(on_error)
    data_cfg = dataclasses.replace(cfg.data, cache_dir="", preprocessed="", augment=False)
    plan = SelectionPlan.for_cache(cfg.model)
    s = settings(data_cfg, plan.settings if plan is not None else None)
    refs = list_studies(source, data_cfg, on_error)
    if not refs:
        raise DataError(f"{source}: no studies to preprocess")
    return run_sharded(refs, out, s, shard_size,
                       lambda i, refs_i, root, summary: _write_one(i, refs_i, root, data_cfg, plan, on_error, summary),
                       rank=rank, world=world, barrier=barrier, progress=progress)
