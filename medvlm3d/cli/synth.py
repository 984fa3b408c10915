"""`medvlm3d synth`: a phantom dataset (NIfTI volumes [D, H, W] + JSONL manifest), over
`medvlm3d.data.synthetic.make_dataset`."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from medvlm3d.data.synthetic import DEFAULT_SHAPE, make_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (volumes/ and manifest.jsonl)")
    parser.add_argument("--n", type=int, default=50, help="number of studies (default 50)")
    parser.add_argument("--seed", type=int, default=0,
                        help="dataset seed; the demo uses 0 for train and 1 for test (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"),
                        help=f"volume shape (default {' '.join(map(str, DEFAULT_SHAPE))})")
    parser.add_argument("--questions-per-study", type=int, default=6,
                        help="at most this many VQA questions per study, each written closed and open (default 6)")


def run(args: argparse.Namespace) -> int:
    manifest = make_dataset(args.out, args.n, seed=args.seed, shape=tuple(args.shape),
                            questions_per_study=args.questions_per_study)
    recs = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    counts = Counter(r["meta"]["n_lesions"] for r in recs if r["task"] == "report")
    types = Counter(r.get("question_type", "report") for r in recs)
    print(manifest)
    print(f"studies: {args.n}  records: {len(recs)}  lesions per study: "
          + ", ".join(f"{k}: {counts.get(k, 0)}" for k in (0, 1, 2)))
    print("records by type: " + ", ".join(f"{k}: {v}" for k, v in sorted(types.items())))
    return 0
