"""The unsupervised demo over teachers x seeds, at equal steps, and its mean +- sd table (issue 17).

    python bench/seed_table.py -j 9                       # teachers off/votes/picks x seeds 0,1,2
    python bench/seed_table.py --tiny -j 2                 # a dry run: tiny config, 2 teachers x 2 seeds
    python bench/seed_table.py --teachers picks,off --seeds 0,1,2,3 --set train.lr=2e-3

Output under --out (default: $OUT when set, else runs/seed_table):
    seed<S>/stage0/              `medvlm3d demo --unsupervised --seed S --stop-after stage0_clip`:
                                 stage 0 does not depend on the teacher, so it runs once per seed
    seed<S>/<teacher>/           `medvlm3d demo --unsupervised --teacher T --seed S --skip-to stage1_align`,
                                 its stage0_text / stage0_clip symlinked to ../stage0/ (the chain resumes
                                 from stage0_clip/final); report.json, stage*/metrics.jsonl, log.txt
    table.md, table.json         mean +- sd over the seeds, one row per teacher; every run's command
                                 is in commands.txt

Up to -j jobs run at once, each with OMP_NUM_THREADS / MKL_NUM_THREADS = --threads (default 2).
Nothing assumes a CPU: each job is `python -m medvlm3d demo`, which trains on the accelerator
that Accelerate finds (CUDA when present). Every stage keeps the demo's step counts
(train/demo.py STAGE_SETTINGS), so the arms differ only in the teacher (and the seed).
The KL columns are the logged KL(teacher || TG-IS) of each stage: the mean of its first 2 and of its
last 4 logged values (the table sets train.log_every=5); "n/a" for the off arm (no teacher).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

FIGURES = ("closed_vqa_accuracy", "presence_f1", "slice_mass", "blind_drop")
KL_STAGES = ("stage1_align", "stage2_finetune")
TINY = ["--config", "tiny", "--n-train", "6", "--n-test", "3", "--set", "model.tgis.scorer=context",
        "model.tgis.context_features=intensity", "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1",
        "eval.max_new_tokens=8", "data.num_workers=0"]


def job(cmd: list[str], log: Path, threads: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode


def kl_of(run: Path) -> tuple[float, float]:
    """(first, last) logged KL of a stage run: mean of the first 2 and of the last 4 values."""
    path = run / "metrics.jsonl"
    kl = [json.loads(x)["kl"] for x in path.read_text().splitlines() if '"kl"' in x] if path.is_file() else []
    if not kl:
        return math.nan, math.nan
    return sum(kl[:2]) / len(kl[:2]), sum(kl[-4:]) / len(kl[-4:])


def collect(run: Path) -> dict[str, float]:
    report = json.loads((run / "report.json").read_text())
    row = {k: float(report["figures"][k]) for k in FIGURES}
    for stage in KL_STAGES:
        row[f"kl_{stage}_start"], row[f"kl_{stage}_end"] = kl_of(run / stage)
    return row


def mean_sd(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    cols = [*FIGURES, *(f"kl_{s}_{e}" for s in KL_STAGES for e in ("start", "end"))]
    heads = ["closed-VQA", "presence F1", "TG-IS mass on the asked lesion", "blind drop",
             "KL stage 1 start", "KL stage 1 end", "KL stage 2 start", "KL stage 2 end"]
    lines = ["| teacher | runs | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for teacher, runs in rows.items():
        cells = [mean_sd([r[c] for r in runs]) for c in cols]
        lines.append(f"| {teacher} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/seed_table")
    p.add_argument("-j", "--jobs", type=int, default=3, help="jobs at once")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each job")
    p.add_argument("--teachers", default="off,votes,picks")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tiny", action="store_true", help="dry run: tiny config, 3 steps a stage, 2 teachers x 2 seeds")
    p.add_argument("--stage0", default="", help="a folder holding stage0_clip/final to share across the seeds "
                   "(skips stage 0; the seeds then differ in stages 1-2 only)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    a = p.parse_args()
    out = Path(a.out).resolve()
    teachers, seeds = a.teachers.split(","), [int(s) for s in a.seeds.split(",")]
    if a.tiny and a.teachers == p.get_default("teachers"):
        teachers = ["off", "picks"]
    if a.tiny and a.seeds == p.get_default("seeds"):
        seeds = [0, 1]
    base = [sys.executable, "-m", "medvlm3d", "demo", "--unsupervised"]
    extra = (TINY if a.tiny else []) + ([] if a.tiny else ["--set"]) + ["train.log_every=5", *a.set]
    out.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    t0 = time.time()

    def run(cmd: list[str], log: Path) -> int:
        commands.append(" ".join(cmd))
        rc = job(cmd, log, a.threads)
        print(f"[{time.time() - t0:6.0f}s] rc={rc} {log.parent.relative_to(out)}", flush=True)
        return rc

    def arm(seed: int, teacher: str) -> int:
        run_dir = out / f"seed{seed}" / teacher
        run_dir.mkdir(parents=True, exist_ok=True)
        for stage in ("stage0_text", "stage0_clip"):
            link = run_dir / stage
            if not link.exists():
                link.symlink_to(Path("..") / "stage0" / stage)
        return run([*base, "--out", str(run_dir), "--teacher", teacher, "--seed", str(seed),
                    "--skip-to", "stage1_align", *extra], run_dir / "log.txt")

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        if a.stage0:  # one shared stage-0 export: each seed's stage0/ points at it
            for s in seeds:
                (out / f"seed{s}").mkdir(parents=True, exist_ok=True)
                if not (out / f"seed{s}" / "stage0").exists():
                    (out / f"seed{s}" / "stage0").symlink_to(Path(a.stage0).resolve())
        stage0: dict[int, Future] = {
            s: pool.submit(lambda: 0) if a.stage0 else
            pool.submit(run, [*base, "--out", str(out / f"seed{s}" / "stage0"), "--seed", str(s),
                              "--stop-after", "stage0_clip", *extra], out / f"seed{s}" / "stage0" / "log.txt")
            for s in seeds}
        arms: dict[tuple[str, int], Future] = {}
        for s in seeds:  # each seed's arms start once its stage 0 is done
            if stage0[s].result() != 0:
                print(f"seed {s}: stage 0 failed, see {out / f'seed{s}' / 'stage0' / 'log.txt'}", flush=True)
                continue
            for t in teachers:
                arms[(t, s)] = pool.submit(arm, s, t)
        rcs = {k: f.result() for k, f in arms.items()}
    rows: dict[str, list[dict[str, float]]] = {t: [] for t in teachers}
    per_run = {}
    for (t, s), rc in sorted(rcs.items()):
        if rc == 0:
            per_run[f"{t}/seed{s}"] = r = collect(out / f"seed{s}" / t)
            rows[t].append(r)
    text = table(rows)
    (out / "commands.txt").write_text("\n".join(commands) + "\n")
    (out / "table.json").write_text(json.dumps({"runs": per_run, "teachers": teachers, "seeds": seeds}, indent=2))
    (out / "table.md").write_text(f"{text}\n\n{len(per_run)} of {len(teachers) * len(seeds)} runs; "
                                  f"{time.time() - t0:.0f} s; commands in commands.txt\n")
    print(text)
    failed = [k for k, rc in rcs.items() if rc != 0]
    return 1 if failed or len(rcs) < len(teachers) * len(seeds) else 0


if __name__ == "__main__":
    sys.exit(main())
