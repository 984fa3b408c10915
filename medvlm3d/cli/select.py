"""`medvlm3d select`: Vote-MI slice selection alone (PNG slices + selection.json), over
`medvlm3d.eval.infer.select`."""

from __future__ import annotations

import argparse

from medvlm3d.config import PLANES, DataConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volume", required=True, help="a .nii/.nii.gz file, a DICOM series folder or file, or an .npy")
    p.add_argument("--k", type=int, default=3, help="slices to pick per plane (default 3)")
    p.add_argument("--planes", default=",".join(PLANES), help="comma-separated planes (default all three)")
    p.add_argument("--neighbours", type=int, default=5, help="vote-k neighbours per slice (default 5)")
    p.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help=f"resize the volume to D H W first (default {' '.join(map(str, DataConfig.size))})")
    p.add_argument("--modality", choices=("auto", "ct", "mri"), default="auto", help="intensity normalisation")
    p.add_argument("--out", required=True, help="output folder for the PNGs and selection.json")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.eval.infer import select

    planes = [p.strip() for p in args.planes.split(",") if p.strip()]
    res = select(args.volume, args.out, k=args.k, planes=planes, neighbours=args.neighbours, size=args.size,
                 modality=args.modality)
    for plane, r in res["planes"].items():
        print(f"{plane}: {' '.join(r['files'])}")
    return 0
