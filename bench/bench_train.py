"""Stage-2 training throughput of the demo config on CPU: samples/s, data wait, distillation, RSS, DDP.

    python bench/bench_train.py                          # 40 timed steps (+3 warm-up) per case run
    python bench/bench_train.py --steps 10 --skip-multi  # quick: no accelerate-launched runs
    python bench/bench_train.py --out runs/bench_train --set data.num_workers=1
    python bench/bench_train.py --preprocessed          # read `medvlm3d preprocess` shards (data.preprocessed)

Config: `load_config("demo", ..., layers=["stage2_finetune"])` plus the demo's own stage-2 settings
(`train.demo.STAGE_SETTINGS`: batch 32 per process, encoders frozen, the LLM trained in full; from
scratch), on phantom studies generated into a temp folder (`--out` keeps it), with `data.cache_dir`
set and filled before timing, so the timed steps read cached volumes as every epoch after a real
run's first does (the cold load per study is printed too). With `--preprocessed` the studies are
first written into shards by `run_preprocess` (data/preprocess.py, Vote-MI teacher and picks stored)
and every case reads them (`data.preprocessed`): no decode, no resample, no Vote-MI in the loader.
The demo's stage 2 runs one DataLoader worker (`data.num_workers=1`, train/demo.py); it starts
once per run (persistent workers, train/data.py: make_loader), in the warm-up steps, not once per
7-step epoch as before session 10. Each case runs in its own child process:

  in-script cases (1 process): the recipe's own builders and
  `Loop.step` (forward + backward + clip + optimizer step), with the micro-batch iterator
  wrapped so that the time spent in `next()` (DataLoader wait, collate included) is measured
  apart from the rest of the step (compute). Target: data wait < 10 % of step time.
    distill on      train.distill_weight=0.5, Vote-MI teacher computed (the stage-2 default)
    distill 0       train.distill_weight=0 (the data side then skips the teacher: since the
                    redesign this row should equal "distill 0+off")
    distill 0+off   train.distill_weight=0 and model.vote_mi.teacher=off (teacher skipped)
    feature cache   distill on, with train.feature_cache_mb=256 filled over every study before
                    timing: the steady state after a real run's first epoch (other cases: off)
  launched cases (unless --skip-multi): `python -m medvlm3d.train` (1 process) and
  `accelerate launch --config_file configs/accelerate/cpu_ddp.yaml -m medvlm3d.train` (2 processes,
  gloo DDP), same per-process batch; samples/s is global: the median over the timed steps of the
  loop's own `samples_per_s` in metrics.jsonl (the rank-0 step time, data loading included).

Threads: `--threads` (default 1) torch threads and OMP_NUM_THREADS in every process, so 2
processes use the 2 cores of this machine. On shared cores 2 OpenMP threads in one process can be
many times slower than 1 (threads wait on each other when another job holds a core).
In-script samples/s is the batch over the median step time; data and compute shares are sums
over the timed steps; the cases run round robin `--rounds` times (default 2) and each keeps its
fastest round (the cores are shared with other jobs, whose load drifts).

Printed table, one row per case: global samples/s, step time, data-wait and compute share,
teacher calls and time per step, peak RSS (ru_maxrss of the child; for launched runs the largest
process of the launch); then the distill on/off and 2-process/1-process ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

CONFIG, STAGE = "demo", "stage2_finetune"


class TimedIterator:
    """Wraps an iterator; `.wait` sums the seconds spent inside `next()`."""

    def __init__(self, it: Iterator[Any]) -> None:
        self.it, self.wait = it, 0.0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait += time.perf_counter() - t0


class TimedCall:
    """Wraps the data-side selector: counts its calls and seconds (a class, so that the dataset
    holding it can be pickled into DataLoader workers; calls made there are not seen here)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls, self.s = fn, 0, 0.0

    def __call__(self, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.s += time.perf_counter() - t0
            self.calls += 1


def make_phantoms(root: Path, n_train: int) -> tuple[Path, Path]:
    """Phantom train manifest (seed 0) and a tokenizer trained on its corpus: the demo's own
    `make_data` (with a one-study test split, unused here)."""
    from medvlm3d.train.demo import make_data

    manifest, _, tok = make_data(root, n_train, 1)
    return Path(manifest), tok


def distinct_studies(records: list[dict[str, Any]]) -> list[int]:
    """Index of the first record of each distinct study (by its `image` field)."""
    first: dict[str, int] = {}
    for i, rec in enumerate(records):
        first.setdefault(json.dumps(rec["image"]), i)
    return list(first.values())


def fill_cache(overrides: list[str]) -> tuple[int, float, int]:
    """Load every distinct study once through StudyDataset (fills data.cache_dir)
    -> (studies, seconds per study, train.batch_size)."""
    from medvlm3d.config import load_config
    from medvlm3d.data.dataset import StudyDataset
    from medvlm3d.model.llm import load_tokenizer
    from medvlm3d.train.data import read_train_records

    cfg = load_config(CONFIG, overrides, layers=[STAGE])
    records = read_train_records(cfg)
    ds = StudyDataset(records, cfg.data, load_tokenizer(cfg.model.llm), num_image_tokens=1, train=True)
    idx = distinct_studies(records)
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    return len(idx), (time.perf_counter() - t0) / max(1, len(idx)), cfg.train.batch_size


def prefill_feature_cache(vlm: Any, dataset: Any, collate: Any, t: Any) -> float:
    """Enable the feature cache and run the frozen encoders once over every distinct study, as a
    real run's first epoch does: the timed steps then show the steady state -> seconds taken."""
    import torch

    vlm.enable_feature_cache(t.feature_cache_mb << 20)
    idx = distinct_studies(dataset.records)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(idx), t.batch_size):
            b = collate([dataset[i] for i in idx[k:k + t.batch_size]])
            vlm._encode("encoder3d", b["volumes"])
            vlm._encode("slice_encoder", b["slices"], b["slice_mask"])
    return time.perf_counter() - t0


def measure_in_process(overrides: list[str], warmup: int, steps: int, threads: int, queue: Any,
                       stage: str = STAGE) -> None:
    """Child process: `warmup` + `steps` Loop.step calls of `stage`; puts a result dict on `queue`."""
    import torch
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from medvlm3d.config import load_config
    from medvlm3d.train.data import build_train_data, make_loader
    from medvlm3d.train.loop import Loop, Progress, StopFlag, lm_loss_function
    from medvlm3d.train.recipe import build_stage_model, make_accelerator, param_groups, teardown

    logging.basicConfig(level=logging.WARNING)
    # This child was started with "spawn", which makes spawn its default start method too: its
    # DataLoader workers would then start a new interpreter each epoch (importing torch, MONAI,
    # transformers again: seconds per 7-step epoch, most of the 51-78 % "data wait" measured with
    # the demo's data.num_workers=1). `medvlm3d train` forks its workers (the Linux default): so here.
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, [*overrides, f"train.max_steps={warmup + steps}"], layers=[stage])
    t = cfg.train
    acc = make_accelerator(cfg, Path(t.output_dir))
    try:
        set_seed(t.seed)
        module, vlm = build_stage_model(cfg)
        dataset, collate = build_train_data(cfg, vlm.tokenizer, vlm.num_visual_tokens)
        plan = getattr(dataset, "selection", None)  # the teacher runs on the data side (data/select/);
        teacher = TimedCall(plan.select if plan is not None else None)  # seen here only without workers
        if plan is not None and plan.select is not None:
            plan.select = teacher
        prefill_s = prefill_feature_cache(vlm, dataset, collate, t) if t.feature_cache_mb > 0 else 0.0
        loader, sampler = make_loader(dataset, collate, cfg)
        optimizer = torch.optim.AdamW(param_groups(module, vlm, cfg), lr=t.lr)
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(t.warmup_steps, t.max_steps), t.max_steps)
        model, optimizer, loader, scheduler = acc.prepare(module, optimizer, loader, scheduler)
        loop = Loop(acc, model, optimizer, scheduler, loader, sampler, cfg, Path(t.output_dir), Progress(),
                    lambda _p: None, lm_loss_function(vlm.llm))
        model.train()
        batches, stop = TimedIterator(loop.micro_batches()), StopFlag()
        step_s, wait_s = [], []
        for i in range(warmup + steps):
            if i == warmup:
                teacher.calls, teacher.s = 0, 0.0
            t0, w0 = time.perf_counter(), batches.wait
            loop.step(batches, stop)
            loop.progress.step += 1
            step_s.append(time.perf_counter() - t0)
            wait_s.append(batches.wait - w0)
        step_s, wait_s = step_s[warmup:], wait_s[warmup:]
        median = statistics.median(step_s)
        queue.put({"sps": t.batch_size * t.grad_accum / median, "step_s": median,
                   "data": sum(wait_s) / sum(step_s), "compute": 1 - sum(wait_s) / sum(step_s),
                   "teacher_calls": teacher.calls / steps, "teacher_ms": 1e3 * teacher.s / steps,
                   "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": threads,
                   "prefill_s": prefill_s})
    finally:
        teardown(acc)


def run_child(overrides: list[str], warmup: int, steps: int, threads: int, stage: str = STAGE) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure_in_process, args=(overrides, warmup, steps, threads, queue, stage))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        raise RuntimeError(f"benchmark child failed (exit code {proc.exitcode}) for overrides {overrides}")
    return queue.get()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(overrides: list[str], out: Path, processes: int, threads: int, warmup: int, steps: int) -> dict[str, Any]:
    """A real `medvlm3d.train` run (1 process, or 2 under accelerate launch + cpu_ddp.yaml)."""
    from medvlm3d.config import config_dir

    prefix = [sys.executable, "-m", "medvlm3d.train"]
    if processes > 1:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(config_dir() / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(processes),
                  "--num_cpu_threads_per_process", str(threads), "--main_process_port", str(free_port()),
                  "-m", "medvlm3d.train"]
    cmd = [*prefix, "--log-level", "WARNING", "--config", CONFIG, "--stage", STAGE, *overrides,
           f"train.output_dir={out}", "train.log_every=1", f"train.max_steps={warmup + steps}", "train.save_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=config_dir().parent, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of the launch: its largest process's peak
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {out.parent / (out.name + '.log')}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["step"] > warmup]
    rate = statistics.median(r["samples_per_s"] for r in timed)  # global samples / step time
    batch = rows[-1]["samples"] // rows[-1]["step"]  # global batch
    return {"sps": rate, "step_s": batch / rate, "rss_mib": usage.ru_maxrss / 1024,
            "threads": threads}


def fmt_row(name: str, r: dict[str, Any]) -> str:
    def opt(key: str, spec: str, scale: float = 1.0) -> str:
        return format(r[key] * scale, spec) if key in r else "-"

    return (f"{name:<26}{r.get('procs', 1):>3}{r['threads']:>4}{r['sps']:>10.2f}{r['step_s']:>9.3f}"
            f"{opt('data', '.1f', 100):>8}{opt('compute', '.1f', 100):>9}"
            f"{opt('teacher_calls', '.1f'):>9}{opt('teacher_ms', '.1f'):>11}{r['rss_mib']:>10.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per case (default 40)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    ap.add_argument("--n-train", type=int, default=24, help="phantom studies (6 questions + 1 report each)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process, every case (default 1)")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin rounds of the in-script cases, best kept")
    ap.add_argument("--out", default="", help="keep data, cache and runs in this folder (default: a temp folder)")
    ap.add_argument("--skip-multi", action="store_true", help="skip the accelerate-launched 1- vs 2-process runs")
    ap.add_argument("--preprocessed", action="store_true",
                    help="preprocess the studies into shards first and read them (data.preprocessed)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every case")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, here and in every child
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out).resolve() if args.out else Path(tmp)
        manifest, tok = make_phantoms(root, args.n_train)
        from medvlm3d.train.demo import STAGE_SETTINGS  # the demo's own stage 2 (what it trains, steps aside)

        demo_stage2 = [o for o in STAGE_SETTINGS.get(STAGE, ()) if not o.startswith("train.max_steps=")]
        base = [f"data.train={manifest}", f"model.llm.tokenizer={tok}", f"data.cache_dir={root / 'cache'}",
                f"train.output_dir={root / 'runs' / 'in_process'}", *demo_stage2, "train.feature_cache_mb=0",
                *args.set]
        n_studies, cold, batch = fill_cache(base)
        if args.preprocessed:
            from medvlm3d.config import load_config
            from medvlm3d.data.preprocess import run_preprocess

            run_preprocess(manifest, load_config(CONFIG, base, layers=[STAGE]), root / "shards", shard_size=16)
            base.append(f"data.preprocessed={root / 'shards'}")
        cases = {"distill on (0.5)": [],  # "off" quoted below: YAML reads a bare off as False
                 "distill 0 (teacher kept)": ["train.distill_weight=0"],
                 "distill 0 + teacher off": ["train.distill_weight=0", 'model.vote_mi.teacher="off"'],
                 "distill on + feature cache": ["train.feature_cache_mb=256"]}
        results: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):  # round robin, best round kept: the cores are shared and load drifts
            for name, extra in cases.items():
                r = run_child([*base, *extra], args.warmup, args.steps, args.threads)
                best = results.get(name, r)
                rss = max(r["rss_mib"], best["rss_mib"])
                results[name] = {**(r if r["sps"] >= best["sps"] else best), "rss_mib": rss}
        if not args.skip_multi:
            for procs in (1, 2):
                r = launch(base, root / "runs" / f"launch_{procs}p", procs, args.threads, args.warmup, args.steps)
                results[f"medvlm3d.train {procs} proc"] = {**r, "procs": procs}

    print(f"{CONFIG} + {STAGE}, batch {batch}/process, {args.steps} timed steps after {args.warmup} warm-up "
          f"(in-script: best of {args.rounds} rounds), "
          f"{args.n_train} studies ({n_studies} cached; cold load {1e3 * cold:.0f} ms/study"
          f"{'; read from preprocess shards' if args.preprocessed else ''}), "
          f"{os.cpu_count()} cores, 1-min load avg {load_before:.1f} at start / {os.getloadavg()[0]:.1f} at end")
    print(f"{'case':<26}{'P':>3}{'thr':>4}{'samples/s':>10}{'step s':>9}{'data %':>8}{'compute%':>9}"
          f"{'teach/st':>9}{'teacher ms':>11}{'RSS MiB':>10}")
    for name, r in results.items():
        print(fmt_row(name, r))
    on, off = results["distill on (0.5)"]["sps"], results["distill 0 + teacher off"]["sps"]
    zero = results["distill 0 (teacher kept)"]["sps"]
    print(f"distill on / off (teacher off): {on / off:.3f}   distill on / distill 0 (teacher kept): {on / zero:.3f}")
    cached = results["distill on + feature cache"]["sps"]
    print(f"feature cache (warm) / none, distill on: {cached / on:.3f} "
          f"(filling it, once per run: {results['distill on + feature cache']['prefill_s']:.1f} s)")
    worst = max(results[n]["data"] for n in cases)
    print(f"data wait: max {100 * worst:.1f} % of step time (target < 10 %: {'met' if worst < 0.10 else 'NOT met'})")
    if not args.skip_multi:
        one, two = results["medvlm3d.train 1 proc"]["sps"], results["medvlm3d.train 2 proc"]["sps"]
        print(f"2-process / 1-process global samples/s: {two / one:.3f} "
              f"(OMP_NUM_THREADS={args.threads} and torch threads {args.threads} in every process)")
    print(f"wall time {time.perf_counter() - t_start:.0f} s" + (f"; files kept in {root}" if args.out else ""))


if __name__ == "__main__":
    main()
