"""Where the forward pass spends its time: 3D encoder, slice encoder, TG-IS, LLM.

    python bench/bench_model.py                       # tiny + real-size (real_0p5b), batch 1, CPU
    python bench/bench_model.py --configs tiny --repeats 5

For each config it times, in one process and one run, the stages of one forward at batch 1
(no gradients): 3D encoder + projector, slice encoder + projector, TG-IS (text feature, scores,
fusion) and the LLM over the spliced sequence. It prints each stage's share of the forward and,
for the 2E3 variants, the same with TG-IS top-k = 8. Untrained weights: only time matters here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medvlm3d.config import load_config
from medvlm3d.data.tokenizer import train_tokenizer
from medvlm3d.model.medvlm import build_model

CORPUS = ["Write the findings of this scan.", "Findings: No focal lesion. The liver is normal."] * 20


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def bench_config(name: str, tok_dir: Path, repeats: int, overrides: list[str], prompt_len: int = 32) -> dict[str, float]:
    cfg = load_config(name, [f"model.llm.tokenizer={tok_dir}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    D, H, W = cfg.data.size
    h, w = cfg.data.slice_size
    S = D if cfg.data.num_slices <= 0 else cfg.data.num_slices
    vol = torch.rand(1, 1, D, H, W)
    slices = torch.rand(1, S, 1, h, w)
    mask = torch.ones(1, S, dtype=torch.bool)
    pos = ((torch.arange(S) + 0.5) / S)[None]
    plane = torch.zeros(1, S, dtype=torch.long)
    nv = model.num_visual_tokens
    ids = torch.cat([torch.full((1, nv), model.image_token_id), torch.randint(5, 300, (1, prompt_len))], 1)
    q_ids, q_mask = ids[:, nv:], torch.ones(1, prompt_len, dtype=torch.long)

    t3d, x3d = _timed(lambda: model.projector3d(model.encoder3d(vol)), repeats)
    t2d, v = _timed(lambda: model.projector2d(model.slice_encoder(slices, mask)), repeats)

    def tgis():
        text = model.text_features(q_ids, q_mask, None, torch.zeros(1, dtype=torch.long))
        return model.tgis(x3d, model.projector3d.out_grid, v, text, pos, plane, mask)

    tt, out = _timed(tgis, repeats)
    visual = torch.cat([x3d, out.z2d], 1)
    embeds = model.splice(ids, visual)
    tllm, _ = _timed(lambda: model.llm(inputs_embeds=embeds, use_cache=False), repeats)
    total = t3d + t2d + tt + tllm
    n_params = sum(p.numel() for p in model.parameters())
    return {"3d": t3d, "2d": t2d, "tgis": tt, "llm": tllm, "total": total, "params_m": n_params / 1e6,
            "visual_tokens": nv, "slices": S}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "real_0p5b"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tok"
        train_tokenizer(CORPUS, tok, vocab_size=300)
        print(f"torch threads: {torch.get_num_threads()}  (forward only, batch 1, median of {args.repeats})")
        print(f"{'config':<22}{'params':>9}{'tokens':>8}{'S':>4}{'forward s':>11}{'3D enc':>9}{'slice enc':>11}{'TG-IS':>8}{'LLM':>8}")
        for name in args.configs:
            for label, extra in ((name, []), (f"{name} top-k=8", ["model.tgis.top_k=8"])):
                r = bench_config(name, tok, args.repeats, extra)
                share = {k: 100 * r[k] / r["total"] for k in ("3d", "2d", "tgis", "llm")}
                print(f"{label:<22}{r['params_m']:>8.1f}M{r['visual_tokens']:>8}{r['slices']:>4}{r['total']:>11.3f}"
                      f"{share['3d']:>8.1f}%{share['2d']:>10.1f}%{share['tgis']:>7.1f}%{share['llm']:>7.1f}%")


if __name__ == "__main__":
    main()
