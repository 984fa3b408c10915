"""`medvlm3d eval`: evaluate a checkpoint on a dataset, over `medvlm3d.eval.runner.evaluate`
(and `medvlm3d.eval.fewshot.fewshot_table` for `--protocol voteMI`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medvlm3d.cli.infer import add_device_map_argument

# eval.runner.TASKS, spelled here so that `--help` does not import torch (tests/test_cli.py checks they agree)
TASKS = ("report", "vqa_closed", "vqa_open", "classify")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (save_pretrained / export)")
    p.add_argument("--data", required=True, help="a JSONL manifest, M3D_Cap.json, an M3D-VQA .csv or a CT-RATE root")
    p.add_argument("--task", required=True, choices=TASKS, help="what to evaluate")
    p.add_argument("--kind", default="auto",
                   help="dataset format: auto (detected) or a registered one (manifest, m3d_cap, m3d_vqa, ct_rate, ...)")
    p.add_argument("--split", default=None, help="M3D-Cap train|validation|test, CT-RATE train|valid")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records of the task")
    p.add_argument("--batch-size", type=int, default=8, help="studies per generation batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's eval.max_new_tokens")
    p.add_argument("--out", default=None, help="output folder (default ./eval-<checkpoint>-<task>)")
    p.add_argument("--no-meteor", action="store_true",
                   help="skip the METEOR-1.5 jar inside the COCO metrics (it starts a Java process)")
    p.add_argument("--blind", action="store_true", help="also run the image-blind control and print the drop")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    add_device_map_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the blind derangement / random slices")
    p.add_argument("--protocol", default="standard",
                   help="standard: the task's scoring protocol (report m3d_cap, vqa_closed m3d_vqa_closed, vqa_open "
                        "m3d_vqa_open), the code `medvlm3d score` runs; or a registered one (med2e3_ctrate, coco, "
                        "ctrate_ce, ...: docs/metrics.md); voteMI (with --task classify): BrainMD's zero/few-shot "
                        "slice-selection protocol")
    p.add_argument("--support", default=None,
                   help="voteMI: labelled support set (default: the other studies of --data)")
    p.add_argument("--k-slices", type=int, default=None,
                   help="voteMI: slices kept per plane (default: 3; a 2d_only model: vote_mi.num_picks / planes)")
    p.add_argument("--cross", action="store_true",
                   help="voteMI: also random slices + vote-k examples and Vote-MI slices + random examples")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 2], help="voteMI: in-context examples (default 0 2)")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.data.errors import ConfigError
    from medvlm3d.eval.infer import load_model, parse_device_map
    from medvlm3d.eval.runner import evaluate, headline, metrics_table, read_eval_records, task_records
    from medvlm3d.io import atomic_write_json

    if args.protocol == "voteMI" and args.task != "classify":
        raise ConfigError("--protocol voteMI needs --task classify")
    from medvlm3d.eval.protocols import PROTOCOLS

    if args.protocol not in ("standard", "voteMI", *PROTOCOLS.names()):
        raise ConfigError(f"--protocol: expected standard, voteMI or a registered protocol {PROTOCOLS.names()}, "
                          f"got {args.protocol!r}")
    model = load_model(args.checkpoint, args.device, parse_device_map(args.device_map))
    records = read_eval_records(args.data, model.cfg.data, args.task, args.kind, args.split)
    out = Path(args.out or f"eval-{Path(args.checkpoint).resolve().name}-{args.task}")
    if args.protocol == "voteMI":
        from medvlm3d.eval.fewshot import fewshot_table, format_fewshot_table

        support = read_eval_records(args.support, model.cfg.data, "classify") if args.support else None
        rows = fewshot_table(model, task_records(records, "classify")[: args.limit], support, k_slices=args.k_slices,
                             shots=tuple(args.shots), seed=args.seed, cross=args.cross, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)
        atomic_write_json(out / "fewshot.json", rows)
        print(format_fewshot_table(rows))
        return 0
    kw = dict(batch_size=args.batch_size, limit=args.limit, meteor=not args.no_meteor, seed=args.seed,
              max_new_tokens=args.max_new_tokens, protocol="auto" if args.protocol == "standard" else args.protocol)
    result = evaluate(model, records, args.task, out_dir=out, **kw)
    print(metrics_table(result))
    if args.blind:
        blind = evaluate(model, records, args.task, out_dir=out / "blind", blind=True, **kw)
        print("\n" + metrics_table(blind))
        name, a = headline(result)
        b = headline(blind)[1]
        print(f"\nimage-blind control: {name} {a:.4f} -> {b:.4f} (drop {a - b:+.4f})")
    extra = f" and {out / 'per_sample.jsonl'}" if result["protocol"] else ""
    print(f"\nwrote {out / 'predictions.jsonl'}, {out / 'metrics.json'}{extra}")
    return 0
