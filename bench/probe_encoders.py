"""Linear probes on a checkpoint's frozen encoders: what do its 3D and slice tokens say about the
findings, before any LLM reads them? Phantom manifests only (`medvlm3d synth`, the demo's data/),
whose records carry the lesions' ground truth in `meta`.

    python bench/probe_encoders.py --checkpoint runs/demo/stage0_clip/final \\
        --train runs/demo/data/train/manifest.jsonl --test runs/demo/data/test/manifest.jsonl

Features per study (no grad, eval mode, the checkpoint's own preprocessing):
    3D:  encoder3d tokens [N3, D3] on its grid, average-pooled to (8, 2, 2) -> [32 * D3]
    2D:  slice_encoder tokens [S, T, D2]; count: max over slices -> [T * D2]; a lesion property:
         mean over that lesion's true slices (an oracle slice choice) -> [T * D2]
Targets: the lesion count (0/1/2) of every study, and position / side / size / kind of the lesion
of one-lesion studies. Each probe is an L2-regularised multinomial logistic regression (L-BFGS on
standardised features) fitted on the training studies and scored on the test studies.

Prints one row per (encoder, target): train and test accuracy and the number of studies; chance
is about 1/3 for count and 1/2 for the others.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from medvlm3d.data.dataset import StudyDataset
from medvlm3d.data.readers import read_records
from medvlm3d.model.checkpoint import load_pretrained

PROPERTIES = {"position": "upper", "side": "left", "size": "small", "kind": "hyperdense"}  # property: positive class


@torch.no_grad()
def study_features(model: Any, manifest: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """(3D features [n, 32 * D3], slice tokens [n, S, T, D2], study meta) of the first n studies."""
    records = [r for r in read_records(manifest) if r.get("task") == "report"][:n]
    if not records or "n_lesions" not in (records[0].get("meta") or {}):
        raise SystemExit(f"{manifest}: expected phantom report records with meta.n_lesions (medvlm3d synth)")
    cfg = dataclasses.replace(model.cfg.data, task="report", augment=False)
    ds = StudyDataset(records, cfg, model.tokenizer, model.num_visual_tokens, train=False)
    d, h, w = model.projector3d.grid
    f3d, f2d, meta = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        grid = rearrange(model.encoder3d(s["volume"]), "b (d h w) c -> b c d h w", d=d, h=h, w=w)
        f3d.append(F.adaptive_avg_pool3d(grid, (8, 2, 2)).flatten(1)[0])
        f2d.append(model.slice_encoder(s["slices"], torch.ones(s["slices"].shape[:2], dtype=torch.bool))[0])
        meta.append(s["record"]["meta"])
    return torch.stack(f3d), torch.stack(f2d), meta


def probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
          weight_decay: float) -> tuple[float, float]:
    """Train / test accuracy of a multinomial logistic regression x [n, F] -> y [n]."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    lin = torch.nn.Linear(x_tr.shape[1], int(max(y_tr.max(), y_te.max())) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x_tr), y_tr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(x_tr).argmax(1) == y_tr).float().mean().item(), (lin(x_te).argmax(1) == y_te).float().mean().item()


def dataset(feats: tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]], encoder: str,
            target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, F], labels [n]) of the studies that `target` applies to."""
    f3d, f2d, meta = feats
    xs, ys = [], []
    for j, m in enumerate(meta):
        if target == "count":
            xs.append(f3d[j] if encoder == "3d" else f2d[j].amax(0).flatten())
            ys.append(int(m["n_lesions"]))
        elif m["n_lesions"] == 1:
            lesion = m["lesions"][0]
            lo, hi = lesion["slice_range"]
            xs.append(f3d[j] if encoder == "3d" else f2d[j][lo:hi + 1].mean(0).flatten())
            ys.append(int(lesion[target] == PROPERTIES[target]))
    return torch.stack(xs), torch.tensor(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a medvlm3d checkpoint folder (e.g. <run>/stage0_clip/final)")
    p.add_argument("--train", required=True, help="phantom manifest to fit the probes on")
    p.add_argument("--test", required=True, help="phantom manifest to score them on (other seeds)")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_pretrained(args.checkpoint).eval()
    if model.encoder3d is None or model.slice_encoder is None:
        raise SystemExit("the probes need a model with both encoders (variant 2e3 or 2e3_interslice)")
    train, test = study_features(model, args.train, args.n_train), study_features(model, args.test, args.n_test)
    print(f"{'encoder':<8}{'target':<10}{'train':>7}{'test':>7}  studies (train/test)")
    for encoder in ("3d", "2d"):
        for target in ("count", *PROPERTIES):
            (x_tr, y_tr), (x_te, y_te) = dataset(train, encoder, target), dataset(test, encoder, target)
            acc_tr, acc_te = probe(x_tr, y_tr, x_te, y_te, args.weight_decay)
            print(f"{encoder:<8}{target:<10}{acc_tr:>7.3f}{acc_te:>7.3f}  {len(y_tr)}/{len(y_te)}")


if __name__ == "__main__":
    main()
