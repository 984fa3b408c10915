"""Scale simulation of `medvlm3d preprocess`: a CT-RATE-shaped synthetic set through 1 and 2 processes.

    python bench/bench_scale.py                           # 500 and 2000 volumes, 1 and 2 processes
    python bench/bench_scale.py --n 200 --native 40 64 64 --out runs/scale

Writes a CT-RATE root (dataset/{train}/<patient>/<study>/<VolumeName>.nii.gz, the reports and
metadata CSVs) of int16 NIfTI volumes with realistic headers: LPS-oriented affine with 0.7-0.8 mm
in-plane and 1.0-2.0 mm slice spacing and a scanner origin; half the volumes hold raw stored values
(HU + 1024, the metadata CSV giving RescaleSlope 1 / RescaleIntercept -1024: the CT-RATE trap),
half hold HU already (intercept -1024 in the CSV too, which the loader must not apply). Then, for
each set size, runs `medvlm3d preprocess` with 1 process and under `accelerate launch
--num_processes 2` (configs/accelerate/cpu_ddp.yaml, gloo), one torch thread each, and prints:
volumes/s (studies over the slowest rank's own preprocessing time, imports excluded; wall time
too), the 2/1 ratio, GB/s read (NIfTI) and written (shards), and each rank's peak RSS, which must
stay flat from the small set to the large one (one study in memory at a time, shards of
--shard-size studies). The 2-process output is checked byte-identical to the 1-process output.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench_preprocess import phantom  # the int16 HU body phantom (same folder)


def write_ct_rate(root: Path, n: int, native: tuple[int, int, int], seed: int = 0) -> int:
    """n volumes in a CT-RATE layout under root/dataset -> bytes of NIfTI written."""
    ds = root / "dataset"
    (ds / "radiology_text_reports").mkdir(parents=True, exist_ok=True)
    (ds / "metadata").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    base = [phantom(native, s) for s in range(8)]  # a few bodies, re-noised per volume (fast)
    reports, meta, total = [], [], 0
    for i in range(n):
        patient, study = i // 2 + 1, "ab"[i % 2]
        name = f"train_{patient}_{study}_1.nii.gz"
        path = ds / "train" / f"train_{patient}" / f"train_{patient}_{study}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        hu = base[i % 8] + rng.integers(-15, 16, size=base[0].shape, dtype=np.int16)
        raw = i % 2 == 0
        xy, z = float(rng.uniform(0.7, 0.8)), float(rng.choice([1.0, 1.5, 2.0]))
        affine = np.diag([-xy, -xy, z, 1.0])  # LPS voxel axes, as CT-RATE's converted DICOMs
        affine[:3, 3] = [180.0, 200.0, float(-rng.uniform(100, 400))]
        img = nib.Nifti1Image((hu + 1024).astype(np.int16) if raw else hu, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, str(path))
        total += path.stat().st_size
        reports.append([name, "Not given.", "Non-contrast chest CT.", f"Findings of volume {i}.", "No acute finding."])
        meta.append([name, "1", "-1024", f"[{xy:.4f}, {xy:.4f}]", f"{z}"])
    for fname, header, rows in (("radiology_text_reports/train_reports.csv",
                                 ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                  "Impressions_EN"], reports),
                                ("metadata/train_metadata.csv",
                                 ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"], meta)):
        with open(ds / fname, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RANK_LINE = re.compile(r"preprocess rank (\d+)/(\d+): .*?done (\d+).*?([\d.]+) GB written in ([\d.]+) s, "
                       r"peak RSS (\d+) MiB")


def run(data: Path, out: Path, procs: int, shard_size: int, overrides: list[str]) -> dict:
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "medvlm3d", "--log-level", "WARNING", "preprocess"]
    if procs > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(repo / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(procs),
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
               "-m", "medvlm3d", "--log-level", "WARNING", "preprocess"]
    cmd += ["--data", str(data), "--config", "demo", "--out", str(out), "--shard-size", str(shard_size), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    ranks = [m.groups() for m in RANK_LINE.finditer(proc.stdout)]
    if len(ranks) != procs:
        raise RuntimeError(f"expected {procs} rank summaries, got:\n{proc.stdout}")
    return {"wall": wall, "seconds": max(float(r[4]) for r in ranks), "done": sum(int(r[2]) for r in ranks),
            "gb": sum(float(r[3]) for r in ranks), "rss": [int(r[5]) for r in sorted(ranks)]}


def same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / p).read_bytes() == (b / p).read_bytes() for p in fa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[500, 2000], help="set sizes (default 500 2000)")
    ap.add_argument("--native", type=int, nargs=3, default=[48, 64, 64], metavar=("D", "H", "W"),
                    help="native volume shape (default 48 64 64)")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--out", default="", help="keep everything here (default: a temp folder)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (demo config)")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out).resolve() if args.out else Path(tmp)
        for n in args.n:
            data = root / f"ct_rate_{n}"
            t0 = time.perf_counter()
            nifti_bytes = write_ct_rate(data, n, tuple(args.native))
            gen_s = time.perf_counter() - t0
            res = {p: run(data, root / f"cache_{n}_{p}p", p, args.shard_size, args.set) for p in (1, 2)}
            identical = same_tree(root / f"cache_{n}_1p", root / f"cache_{n}_2p")
            rows.append((n, nifti_bytes, gen_s, res, identical))
    print(f"demo preprocessing ({' '.join(args.set) or 'data.size 32x64x64'}), native {tuple(args.native)} int16, "
          f"shards of {args.shard_size}, 1 torch thread per process, {os.cpu_count()} cores, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'n':>6}{'P':>3}{'vol/s':>9}{'wall s':>8}{'run s':>8}{'GB/s in':>9}{'GB/s out':>9}{'GB out':>8}"
          f"{'RSS MiB per rank':>20}")
    for n, nifti_bytes, gen_s, res, identical in rows:
        for p, r in res.items():
            print(f"{n:>6}{p:>3}{n / r['seconds']:>9.1f}{r['wall']:>8.1f}{r['seconds']:>8.1f}"
                  f"{nifti_bytes / 1e9 / r['seconds']:>9.3f}{r['gb'] / r['seconds']:>9.3f}{r['gb']:>8.3f}"
                  f"{' / '.join(str(x) for x in r['rss']):>20}")
        ratio = res[1]["seconds"] / res[2]["seconds"]
        print(f"{n:>6}  2/1 processes: {ratio:.2f}x (goal >= 1.6x); wall {res[1]['wall'] / res[2]['wall']:.2f}x; "
              f"byte-identical: {identical}; NIfTI {nifti_bytes / 1e9:.3f} GB written in {gen_s:.0f} s")


if __name__ == "__main__":
    main()
