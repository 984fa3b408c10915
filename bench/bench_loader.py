"""The training loader alone, reading `medvlm3d preprocess` shards: samples/s per worker.

    python bench/bench_loader.py                          # demo size and real size, 0 and 1 workers
    python bench/bench_loader.py --workers 0 1 2 --samples 256 --studies 16

For each size (demo: data.size 32x64x64, slices 64x64; real: 32x256x256, slices 256x256, the
med2e3 sizes), writes --studies phantom studies (`medvlm3d synth`'s generator), preprocesses them
with `run_preprocess` (Vote-MI teacher and picks stored), then iterates the stage-2 DataLoader of
the demo config (`train.data.study_data` + `make_loader`: StudyDataset from the shards, the
Collator, batch --batch, the sampler's random order) for --samples samples after one warm-up
batch, and prints samples/s and samples/s per worker (num_workers 0 counts the main process as
the one worker). No model runs: this is the loader's ceiling. One torch thread per process; the
shard files are in the page cache after the first pass (as in any epoch after the first).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"demo": ["data.size=[32,64,64]", "data.slice_size=[64,64]"],
         "real": ["data.size=[32,256,256]", "data.slice_size=[256,256]"]}


def prepare(root: Path, name: str, studies: int) -> tuple[list[str], int]:
    """Phantoms + tokenizer + shards for size `name` -> (config overrides, shard bytes)."""
    from medvlm3d.config import load_config
    from medvlm3d.data.preprocess import run_preprocess
    from medvlm3d.train.demo import make_data

    if not (root / "tokenizer").exists():
        make_data(root, studies, 1)
    manifest = root / "data" / "train" / "manifest.jsonl"
    overrides = [f"data.train={manifest}", f"model.llm.tokenizer={root / 'tokenizer'}", *SIZES[name]]
    cfg = load_config("demo", overrides, layers=["stage2_finetune"])
    summary = run_preprocess(manifest, cfg, root / f"shards_{name}", shard_size=8)
    return [*overrides, f"data.preprocessed={root / f'shards_{name}'}"], summary.bytes_written


def measure(overrides: list[str], workers: int, batch: int, samples: int) -> float:
    """samples/s of the stage-2 loader over `samples` samples (after one warm-up batch)."""
    from medvlm3d.config import load_config
    from medvlm3d.model.llm import load_tokenizer
    from medvlm3d.train.data import make_loader, read_train_records, study_data
    from medvlm3d.train.demo import STAGE_SETTINGS

    demo = [o for o in STAGE_SETTINGS["stage2_finetune"] if not o.startswith(("train.max_steps", "data.num_workers"))]
    cfg = load_config("demo", [*demo, *overrides, f"data.num_workers={workers}", f"train.batch_size={batch}"],
                      layers=["stage2_finetune"])
    ds, collate = study_data(cfg, read_train_records(cfg), load_tokenizer(cfg.model.llm), 36, teacher=True)
    loader, sampler = make_loader(ds, collate, cfg)
    seen, epoch, t0 = -batch, 0, 0.0
    while seen < samples:
        sampler.set_epoch(epoch)
        for b in loader:
            assert b["teacher"] is not None  # the stored Vote-MI teacher travels in the batch
            if seen < 0:
                t0 = time.perf_counter()  # after the warm-up batch (worker start, first reads)
            seen += batch
            if seen >= samples:
                break
        epoch += 1
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["demo", "real"], choices=list(SIZES))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--studies", type=int, default=12, help="phantom studies (about 10 records each)")
    ap.add_argument("--samples", type=int, default=256, help="timed samples per case")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="", help="keep data and shards here (default: a temp folder)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out).resolve() if args.out else Path(tmp)
        for name in args.sizes:
            overrides, nbytes = prepare(root, name, args.studies)
            for w in args.workers:
                sps = measure(overrides, w, args.batch, args.samples)
                rows.append((name, w, sps, sps / max(w, 1), nbytes))
    print(f"stage-2 loader of the demo config from preprocess shards, batch {args.batch}, {args.samples} samples "
          f"timed, {args.studies} studies, 1 thread, {os.cpu_count()} cores, load avg {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'size':<6}{'workers':>8}{'samples/s':>11}{'per worker':>12}{'shards MB':>11}")
    for name, w, sps, per, nbytes in rows:
        print(f"{name:<6}{w:>8}{sps:>11.1f}{per:>12.1f}{nbytes / 1e6:>11.1f}")


if __name__ == "__main__":
    main()
