"""Benchmark: volumes/s of `load_study` on synthetic CT NIfTI files, cold vs cached.

    python bench/bench_preprocess.py --n 4 --native 120 256 256 --size 32 256 256

Writes N phantom CT volumes (int16 HU, an ellipsoid body with organs and noise, a non-RAS LPS
affine with 0.7 x 0.7 x 1.5 mm voxels) of the given native shape (D, H, W) into a temporary
folder, then times `load_study` to the target `--size`:
  cold    no cache (read + orient + HU window + resize + slices), every pass;
  write   first pass with cache_dir (cold work + the safetensors write);
  cached  second pass with cache_dir (hash + safetensors read; the files are in the page cache).
Prints a small table and the cached / cold speed ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medvlm3d.config import DataConfig
from medvlm3d.data.volume import load_study


def phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """int16 HU volume [X, Y, Z] (the NIfTI array order) of a body in air."""
    d, h, w = shape
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[-1:1:d * 1j, -1:1:h * 1j, -1:1:w * 1j]
    vol = np.full(shape, -1000.0, np.float32)
    for mask, hu in (((y / 0.8) ** 2 + (x / 0.9) ** 2 <= 1, 40.0),  # body
                     (((y + 0.1) / 0.5) ** 2 + ((x - 0.4) / 0.25) ** 2 + (z / 0.9) ** 2 <= 1, -800.0),  # lung
                     (((y - 0.3) / 0.1) ** 2 + (x / 0.1) ** 2 <= 1, 700.0)):  # spine
        vol[np.broadcast_to(mask, shape)] = hu
    vol += rng.normal(0.0, 20.0, shape).astype(np.float32)
    return np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(np.int16)


def timed(paths: list[Path], cfg: DataConfig) -> float:
    t0 = time.perf_counter()
    for p in paths:
        study = load_study(p, cfg)
        float(study.volume.sum() + study.slices.sum())  # touch every voxel (cache reads may be lazy)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="number of volumes")
    ap.add_argument("--native", type=int, nargs=3, default=(120, 256, 256), metavar=("D", "H", "W"))
    ap.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), metavar=("D", "H", "W"))
    ap.add_argument("--slice-size", type=int, nargs=2, default=(256, 256), metavar=("h", "w"))
    ap.add_argument("--num-slices", type=int, default=0, help="0: S = D; -1: native axial depth")
    ap.add_argument("--repeat", type=int, default=2, help="passes per mode (best is reported)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        ap.error("--n and --repeat must be >= 1")

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        root = Path(tmp)
        affine = np.diag([-0.7, -0.7, 1.5, 1.0])  # LPS-like: orientation has work to do
        paths = []
        for i in range(args.n):
            paths.append(root / f"ct_{i:03d}.nii.gz")
            nib.save(nib.Nifti1Image(phantom(tuple(args.native), i), affine), str(paths[-1]))
        common = dict(size=tuple(args.size), slice_size=tuple(args.slice_size), num_slices=args.num_slices)
        cold_cfg = DataConfig(**common)
        load_study(paths[0], cold_cfg)  # warm-up: imports, transform construction
        cold = min(timed(paths, cold_cfg) for _ in range(args.repeat))
        cache_cfg = DataConfig(**common, cache_dir=str(root / "cache"))
        write = timed(paths, cache_cfg)
        cached = min(timed(paths, cache_cfg) for _ in range(args.repeat))
        cache_mb = sum(f.stat().st_size for f in (root / "cache").glob("*.safetensors")) / 2**20

    print(f"load_study: {args.n} CT NIfTI {tuple(args.native)} -> volume {tuple(args.size)}, "
          f"slices {tuple(args.slice_size)}, num_slices={args.num_slices}")
    print(f"{'mode':<8} {'seconds':>9} {'volumes/s':>10}")
    for name, sec in (("cold", cold), ("write", write), ("cached", cached)):
        print(f"{name:<8} {sec:>9.3f} {args.n / sec:>10.2f}")
    print(f"cached / cold speed-up: {cold / cached:.1f}x   (cache: {cache_mb:.1f} MiB)")


if __name__ == "__main__":
    main()
