"""`medvlm3d validate`: read every record of a dataset and load each volume once, over
`medvlm3d.data.validate.validate_dataset`; prints the report; exit 2 when any record is bad."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="dataset: a .jsonl manifest, M3D_Cap.json, an M3D-VQA .csv or a CT-RATE root")
    parser.add_argument("--config", default=None,
                        help="run config (YAML path or shipped name) whose data section sets the preprocessing "
                             "(size, hu_window, max_voxels, oversize, cache_dir...); default: the DataConfig defaults")
    parser.add_argument("--kind", default=None,
                        help="dataset format: auto or a registered one (manifest, m3d_cap, m3d_vqa, ct_rate, ...; "
                             "default: the config's data.kind, else detected)")
    parser.add_argument("--split", default=None,
                        help="M3D-Cap train|validation|test or CT-RATE train|valid (default: all splits)")
    parser.add_argument("--no-volumes", action="store_true", help="check the records only; load no volume")
    parser.add_argument("--json", default=None, help="also write the full report here (JSON)")
    parser.add_argument("--max-rows", type=int, default=50, help="bad records printed at most (default 50)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.size=[32,256,256] data.oversize=refuse")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.config import load_config
    from medvlm3d.data.validate import validate_dataset
    from medvlm3d.io import atomic_write_json

    cfg = load_config(args.config if args.config is not None else {}, args.overrides).data
    report = validate_dataset(args.data, cfg, kind=args.kind or "auto", load_volumes=not args.no_volumes,
                              split=args.split)
    print(report.format(max_rows=args.max_rows))
    if args.json:
        atomic_write_json(args.json, report.to_dict(), indent=1, ensure_ascii=False)
    if not report.ok:
        print(f"error: {args.data}: {report.bad_records} bad record(s)", file=sys.stderr)
        return 2
    return 0
