"""Stage 1 of the demo config from pre-encoded features (`medvlm3d encode`, data.features) against
recomputing the frozen encoders, on CPU, in one run: step time of each and their ratio.

    python bench/bench_features.py                    # 10 timed steps (+2 warm-up) per case, 1 thread
    python bench/bench_features.py --steps 20 --rounds 2 --dtype bf16
    python bench/bench_features.py --workers 1        # the loader in a worker process, as training runs it

Config: `load_config("demo", ..., layers=["stage1_align"])` plus the demo's stage-1 settings
(`train.demo.STAGE_SETTINGS`; batch 8, both encoders frozen, TG-IS, projectors trained, the LLM
frozen) on `--n-train` phantom studies. Both cases read the same `medvlm3d preprocess` shards
(data.preprocessed: no decode, no resample), start from the same checkpoint (the seeded stage-1
model, saved once: train.init_from) and time `Loop.step` (forward + backward + optimizer step)
in a child process each (bench/bench_train.py: `run_child`); they differ only in data.features.
The features are written by `run_encode` (model/features.py) in `--dtype` (default fp32: the same
losses to 1e-6, tests/train/test_features_training.py). Printed: one row per case, then
"features / recompute" (the speed-up of the step; target >= 5x) and the encode time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGE = "stage1_align"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    ap.add_argument("--n-train", type=int, default=16, help="phantom studies (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="round-robin rounds, best kept (default 1)")
    ap.add_argument("--dtype", default="fp32", choices=("bf16", "fp16", "fp32"), help="stored feature dtype")
    ap.add_argument("--workers", type=int, default=0,
                    help="data.num_workers of both cases (default 0: the loader runs in the step's process)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from accelerate.utils import set_seed

    from bench_train import CONFIG, fmt_row, make_phantoms, run_child
    from medvlm3d.config import load_config
    from medvlm3d.data.preprocess import run_preprocess
    from medvlm3d.model.checkpoint import load_pretrained
    from medvlm3d.model.features import run_encode
    from medvlm3d.train.demo import STAGE_SETTINGS
    from medvlm3d.train.recipe import build_stage_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, tok = make_phantoms(root, args.n_train)
        stage1 = [o for o in STAGE_SETTINGS.get(STAGE, ()) if not o.startswith("train.max_steps=")]
        base = [f"data.train={manifest}", f"model.llm.tokenizer={tok}", f"train.output_dir={root / 'runs'}",
                *stage1, "train.feature_cache_mb=0", f"data.num_workers={args.workers}"]
        cfg = load_config(CONFIG, base, layers=[STAGE])
        run_preprocess(manifest, cfg, root / "shards", shard_size=16)
        set_seed(cfg.train.seed)
        _, vlm = build_stage_model(cfg)
        vlm.save_pretrained(str(root / "ckpt"))
        t0 = time.perf_counter()
        s = run_encode(load_pretrained(root / "ckpt"), manifest, root / "feats", dtype=args.dtype, shard_size=16)
        encode_s = time.perf_counter() - t0
        base += [f"data.preprocessed={root / 'shards'}", f"train.init_from={root / 'ckpt'}"]
        cases = {"recompute encoders": [], f"from features ({args.dtype})": [f"data.features={root / 'feats'}"]}
        results: dict = {}
        for _ in range(args.rounds):
            for name, extra in cases.items():
                r = run_child([*base, *extra], args.warmup, args.steps, args.threads, stage=STAGE)
                if name not in results or r["sps"] > results[name]["sps"]:
                    results[name] = r
    print(f"{CONFIG} + {STAGE}, batch {cfg.train.batch_size}, {args.steps} timed steps after {args.warmup} warm-up "
          f"(best of {args.rounds}), {args.threads} thread(s), {args.workers} loader worker(s), {s.studies} studies read from preprocess shards; "
          f"1-min load avg {os.getloadavg()[0]:.1f}")
    print(f"{'case':<26}{'P':>3}{'thr':>4}{'samples/s':>10}{'step s':>9}{'data %':>8}{'compute%':>9}"
          f"{'teach/st':>9}{'teacher ms':>11}{'RSS MiB':>10}")
    for name, r in results.items():
        print(fmt_row(name, r))
    a, b = (results[n]["step_s"] for n in cases)
    print(f"features / recompute, stage-1 step: {a / b:.2f}x faster (target >= 5x); "
          f"encode: {encode_s:.1f} s for {s.studies} studies, {s.bytes_written / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
