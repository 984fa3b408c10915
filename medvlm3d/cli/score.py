"""`medvlm3d score`: score any model's outputs under a named protocol (eval/score.py).

    medvlm3d score --protocol m3d_cap --pred preds.jsonl --ref refs.jsonl [--out dir] [--allow-missing]

Thin over `medvlm3d.eval.score.score_files`; the only place that prints.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", required=True,
                   help="m3d_cap | m3d_vqa_closed | m3d_vqa_open | med2e3_ctrate | coco | ctrate_ce (docs/metrics.md)")
    p.add_argument("--pred", required=True, help='predictions JSONL: one {"id", "prediction"} per line')
    p.add_argument("--ref", required=True, help="references: a JSONL manifest, M3D_Cap.json, an M3D-VQA .csv or a "
                                                "CT-RATE root (their 'answer' is the reference)")
    p.add_argument("--out", default=None, help="folder for metrics.json and per_sample.jsonl")
    p.add_argument("--allow-missing", action="store_true", help="score only the ids present on both sides")
    p.add_argument("--kind", default="auto", help="reference format (a registered dataset name; default: detected)")
    p.add_argument("--split", default=None, help="M3D-Cap train|validation|test, CT-RATE train|valid")
    p.add_argument("--bertscore-model", default=None, help="local model folder for BERTScore (roberta-large = "
                                                           "evaluate's lang='en'); without it BERTScore is skipped")
    p.add_argument("--bertscore-layers", type=int, default=None, help="BERTScore layer (default: bert_score's table)")
    p.add_argument("--bertscore-rescale", action="store_true", help="BERTScore baseline rescaling (off by default)")
    p.add_argument("--ctrate-classifier", default=None, help="ctrate_ce: local CT-RATE label classifier folder")
    p.add_argument("--coco-tokenizer", default="ptb", choices=("ptb", "simple"), help="coco: tokenizer")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] for BERTScore / the classifier")


def run(args: argparse.Namespace) -> int:
    from medvlm3d.eval.score import score_files, score_table

    summary = score_files(args.protocol, args.pred, args.ref, out=args.out, allow_missing=args.allow_missing,
                          kind=args.kind, split=args.split, bertscore_model=args.bertscore_model,
                          bertscore_layers=args.bertscore_layers, bertscore_rescale=args.bertscore_rescale,
                          ctrate_classifier=args.ctrate_classifier, coco_tokenizer=args.coco_tokenizer,
                          device=args.device)
    print(score_table(summary))
    if args.out:
        print(f"wrote {args.out}/metrics.json and {args.out}/per_sample.jsonl")
    return 0
