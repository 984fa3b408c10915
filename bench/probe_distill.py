"""Can a slice scorer learn the Vote-MI teacher? Fit ONLY the scorer head on KL(q || s).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python bench/probe_distill.py --config tiny
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python bench/probe_distill.py --config demo

Phantom studies (train split seed 0, held-out split seed 1) go through the config's untrained,
frozen model ONCE: slice descriptors z [N, S, D] (tgis.slice_descriptors of the projected slice
tokens and the projected 3D tokens), the question feature [N, Dt] (mean LM input embedding of the
question) and the Vote-MI teacher q [N, S] (model.vote_mi, on intensity features). Then each head
below is fitted alone, full batch, Adam, on the train split, and its KL is reported at the start,
at the end, as a fraction of the start, and on the held-out split:

    free      a free logit per (record, slice): the optimum (KL -> 0), train split only
    med2e3    today's TG-IS head, logits = z.t / tau, t = text_proj(text)   (tau, init)
    mlp       MLP(z_j) -> logit (no context)
    centred   MLP((z_j - mean_k z_k) / rms): context = the volume mean and spread
    attn      one self-attention layer over the slices' centred z -> logit
    context   the `context` scorer of model/tgis.py (text term + gated context term), its context
              term on the descriptors z (`tgis.context_features: tokens`) or on the teacher's own
              intensity features of the slices (`intensity`)

Last, whether the question still steers: med2e3 and context fitted on the supervised slice loss
(alone, and + the KL), with their mass on the asked lesion's slices, train and held-out.

The teacher's own figures: its mass on the slices of the asked lesion (records with
slice_labels) against the uniform share, and its mass on the representative slices (the
`num_picks` most-voted slices).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medvlm3d.config import TGISConfig, load_config
from medvlm3d.model.tgis import SCORERS, ContextScorer, masked_softmax, slice_descriptors, volume_normalised
from medvlm3d.data.select.context import slice_context
from medvlm3d.data.select.votek import VoteMI, intensity_features
from medvlm3d.train.losses import distillation_loss, slice_loss

Head = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # features -> logits [N, S]


@torch.no_grad()
def features(config: str, out: Path, n_train: int, n_test: int, teacher: str, init_from: str = "",
             tokenizer: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """{"train": {...}, "test": {...}} of frozen features, one row per record; the model is the
    config's untrained one, or a stage export (`init_from`, with the `tokenizer` it was trained with)."""
    from medvlm3d.model.checkpoint import init_from_checkpoint
    from medvlm3d.data.readers import read_records
    from medvlm3d.data.synthetic import corpus_texts, make_dataset
    from medvlm3d.data.tokenizer import train_tokenizer
    from medvlm3d.model.medvlm import build_model
    from medvlm3d.train.data import build_train_data

    shape = tuple(load_config(config).data.size)
    splits = {"train": make_dataset(out / "train", n_train, seed=0, shape=shape),
              "test": make_dataset(out / "test", n_test, seed=1, shape=shape)}
    tok = Path(tokenizer) if tokenizer else out / "tok"
    if not tokenizer:
        train_tokenizer(corpus_texts(read_records(splits["train"])), tok, vocab_size=400)
    result = {}
    for split, manifest in splits.items():
        cfg = load_config(config, [f"model.llm.tokenizer={tok}", f"data.train={manifest}",
                                   "train.stage=stage1_align", "data.shuffle_choices=false",
                                   f"model.vote_mi.teacher={teacher}"])
        torch.manual_seed(0)
        vlm = (init_from_checkpoint(cfg, init_from) if init_from else build_model(cfg)).eval()
        ds, collate = build_train_data(cfg, vlm.tokenizer, vlm.num_visual_tokens)
        vmi = VoteMI(cfg.model.vote_mi)
        rows: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(ds), 16):
            b = collate([ds[j] for j in range(i, min(i + 16, len(ds)))])
            text = vlm.text_features(b["question_ids"], b["question_mask"], None, b["image_to_sample"])
            x3d = vlm.projector3d(vlm.encoder3d(b["volumes"]))
            v = vlm.projector2d(vlm.slice_encoder(b["slices"], b["slice_mask"]))
            mask, plane = b["slice_mask"], b["slice_plane"]
            z = slice_descriptors(x3d, vlm.projector3d.out_grid, v, b["slice_pos"], plane)
            vmf = intensity_features(b["slices"], size=cfg.model.vote_mi.feature_size, mask=mask)
            q = vmi.teacher(vmf, mask, plane)
            votes = torch.stack([next(iter(r.values())).votes.float() for r in vmi.select(vmf, mask, plane)])
            ctx = slice_context(b["slices"], plane, cfg.model.vote_mi, mask)  # what study_tensors computes
            vk = ctx[..., -2:]  # vote-k's (votes / max, picks)
            vflat = v.flatten(2)  # [N, S, T*D]: the slice tokens, not pooled
            picks_on = {name: vmi.teacher(feat, mask, plane) for name, feat in (("z", z), ("v", vflat))}
            for k, t in dict(z=z, vflat=vflat, vmf=vmf, vk=vk, ctx=ctx, q_z=picks_on["z"], q_v=picks_on["v"], text=text, mask=mask, q=q, votes=votes, target=b["slice_target"],
                             has_target=b["has_slice_target"]).items():
                rows.setdefault(k, []).append(t.float() if t.is_floating_point() else t)
        result[split] = {k: torch.cat(v) for k, v in rows.items()}
        result[split]["vote_mi"] = cfg.model.vote_mi  # type: ignore[assignment]
        result[split]["num_picks"] = torch.tensor(cfg.model.vote_mi.num_picks)
        result[split]["text_dim"] = torch.tensor(text.shape[-1])
    return result


def teacher_figures(f: dict[str, torch.Tensor]) -> dict[str, float]:
    q, mask = f["q"], f["mask"]
    n_real = mask.sum(1).float()
    lab = f["has_target"] & (f["target"].sum(1) > 0)
    lesion = (q * f["target"]).sum(1)[lab].mean().item()
    uniform_lesion = (f["target"].sum(1) / n_real)[lab].mean().item()
    k = int(f["num_picks"])
    top = torch.topk(f["votes"].masked_fill(~mask, -1), k, dim=1).indices
    rep = torch.gather(q, 1, top).sum(1).mean().item()
    agree = {name: (q * (f[f"q_{name}"] > 0.1)).sum(1).mean().item() for name in ("z", "v")}
    return {"agree_z": agree["z"], "agree_v": agree["v"], "lesion": lesion, "lesion_uniform": uniform_lesion, "representative": rep, "rep_uniform": (k / n_real).mean().item()}


class Free(nn.Module):
    def __init__(self, n: int, s: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n, s))

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits


class Med2E3(nn.Module):
    def __init__(self, dim: int, text_dim: int, tau: float, init: str) -> None:
        super().__init__()
        self.tau, self.text_proj = tau, nn.Linear(text_dim, dim)
        if init == "zero":
            nn.init.zeros_(self.text_proj.weight), nn.init.zeros_(self.text_proj.bias)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.einsum("bsd,bd->bs", f["z"], self.text_proj(f["text"])) / self.tau


class MLP(nn.Module):
    def __init__(self, dim: int, ctx: bool, hidden: int = 64) -> None:
        super().__init__()
        self.ctx = ctx
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        z = volume_normalised(f["z"], f["mask"]) if self.ctx else f["z"]
        return self.net(z).squeeze(-1)


class Attn(nn.Module):
    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.layer = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout=0.0, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.layer(self.inp(volume_normalised(f["z"], f["mask"])), src_key_padding_mask=~f["mask"])
        return self.out(h).squeeze(-1)


class Registered(nn.Module):
    """A scorer from model/tgis.py's SCORERS on (z, t = text_proj(text))."""

    def __init__(self, name: str, dim: int, text_dim: int, tau: float, key: str = "z", **kw: bool) -> None:
        super().__init__()
        self.key = key
        self.text_proj = nn.Linear(text_dim, dim)
        self.scorer = SCORERS.get(name)(TGISConfig(tau=tau, scorer=name), dim, **kw)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scorer(f[self.key], self.text_proj(f["text"]), f["mask"])


class OnIntensity(Registered):
    """The `context` scorer with its cross-slice term on the teacher's intensity features."""

    def __init__(self, dim: int, text_dim: int, tau: float) -> None:
        super().__init__("context", dim, text_dim, tau)
        self.scorer = ContextScorer(TGISConfig(tau=tau, scorer="context", context_features="intensity"), dim)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scorer(f["z"], self.text_proj(f["text"]), f["mask"], f["ctx"])


class SimOnly(nn.Module):
    """The context scorer's relational term alone (no text term, no gate)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scorer = ContextScorer(TGISConfig(scorer="context"), dim)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scorer.context(volume_normalised(f["z"], f["mask"]), f["mask"])


def kl(head: nn.Module, f: dict[str, torch.Tensor]) -> torch.Tensor:
    return distillation_loss(f["q"], masked_softmax(head(f), f["mask"]), f["mask"])


def fit(head: nn.Module, train: dict, test: dict | None, steps: int, lr: float) -> dict[str, float]:
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    with torch.no_grad():
        start = kl(head, train).item()
        test_start = kl(head, test).item() if test is not None else math.nan
    best = test_start
    for i in range(steps):
        if test is not None and i % 10 == 0:
            with torch.no_grad():
                best = min(best, kl(head, test).item())
        loss = kl(head, train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = kl(head, train).item()
        test_end = kl(head, test).item() if test is not None else math.nan
    return {"start": start, "end": end, "frac": end / start, "test_start": test_start, "test_end": test_end,
            "test_frac": test_end / test_start, "test_best": min(best, test_end)}


def lesion_mass(head: nn.Module, f: dict[str, torch.Tensor]) -> float:
    """Mean score mass on the asked lesion's slices, over the records with slice_labels."""
    lab = f["has_target"] & (f["target"].sum(1) > 0)
    with torch.no_grad():
        return (masked_softmax(head(f), f["mask"]) * f["target"]).sum(1)[lab].mean().item()


def steer(heads: dict[str, Callable[[], nn.Module]], train: dict, test: dict, steps: int, lr: float) -> None:
    """Can the question still steer? Fit each head on the supervised slice loss (+ the KL) and
    report the mass on the asked lesion's slices."""
    print("| head | loss | lesion mass train start -> end | held-out start -> end |")
    print("|---|---|---|---|")
    for name, make in heads.items():
        for lname, kd in (("slice", 0.0), ("slice + KL", 1.0)):
            torch.manual_seed(0)
            head = make()
            opt = torch.optim.Adam(head.parameters(), lr=lr)
            m0, t0 = lesion_mass(head, train), lesion_mass(head, test)
            for _ in range(steps):
                scores = masked_softmax(head(train), train["mask"])
                loss = slice_loss(scores, train["target"], train["has_target"]) + kd * kl(head, train)
                opt.zero_grad()
                loss.backward()
                opt.step()
            print(f"| {name} | {lname} | {m0:.3f} -> {lesion_mass(head, train):.3f} | {t0:.3f} -> "
                  f"{lesion_mass(head, test):.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--teacher", default="picks", choices=["picks", "votes"])
    p.add_argument("--init-from", default="", help="a stage export (e.g. a stage0_clip run's final/) for the encoders")
    p.add_argument("--tokenizer", default="", help="the tokenizer that export was trained with (with --init-from)")
    p.add_argument("--quick", action="store_true", help="only med2e3, context on tokens and context on intensity")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        feats = features(a.config, Path(tmp), a.n_train, a.n_test, a.teacher, a.init_from, a.tokenizer)
    tr, te = feats["train"], feats["test"]
    n, s, d = tr["z"].shape
    dt = int(tr["text_dim"])
    zc = tr["z"] - (tr["z"] * tr["mask"][..., None]).sum(1, keepdim=True) / tr["mask"].sum(1)[:, None, None]
    print(f"# {a.config}{' from ' + a.init_from if a.init_from else ' (untrained)'}, teacher {a.teacher}: {n} train / {te['z'].shape[0]} held-out records, S={s}, D={d}; features {time.time() - t0:.0f}s")
    print(f"# z: |z| {tr['z'].norm(dim=-1).mean():.3f}, |z_j - mean z| {zc.norm(dim=-1).mean():.4f} (slice-to-slice spread)")
    for split in ("train", "test"):
        tf = teacher_figures(feats[split])
        print(f"# teacher ({split}): mass on the asked lesion's slices {tf['lesion']:.3f} (uniform {tf['lesion_uniform']:.3f}); "
              f"on the {int(tr['num_picks'])} most-voted slices {tf['representative']:.3f} (uniform {tf['rep_uniform']:.3f}); "
              f"on Vote-MI's own picks over z {tf['agree_z']:.3f}, over the slice tokens v {tf['agree_v']:.3f}")
    heads: dict[str, Callable[[], nn.Module]] = {
        "free logits (optimum)": lambda: Free(n, s),
        "med2e3 tau=5, default init": lambda: Med2E3(d, dt, 5.0, "default"),
        "med2e3 tau=1, default init": lambda: Med2E3(d, dt, 1.0, "default"),
        "med2e3 tau=5, zero init": lambda: Med2E3(d, dt, 5.0, "zero"),
        "mlp(z_j)": lambda: MLP(d, ctx=False),
        "mlp(centred z_j)": lambda: MLP(d, ctx=True),
        "attn(centred z)": lambda: Attn(d),
        "similarity features only": lambda: SimOnly(d),
    }
    for name in SCORERS.names():
        if name != "med2e3":
            for tau in (5.0, 1.0):
                heads[f"scorer '{name}' tau={tau:g}"] = lambda name=name, tau=tau: Registered(name, d, dt, tau)
            dv = tr["vflat"].shape[-1]
            for kw in (dict(normalise_text=False), dict(use_h=True), dict(normalise_text=False, use_h=True)):
                heads[f"scorer '{name}' {kw}"] = lambda name=name, kw=kw: Registered(name, d, dt, 5.0, **kw)
            heads[f"scorer '{name}' on the unpooled slice tokens"] = lambda name=name: Registered(name, dv, dt, 5.0, "vflat")
    for tau in (5.0, 1.0):
        heads[f"scorer 'context' on intensity features tau={tau:g}"] = lambda tau=tau: OnIntensity(d, dt, tau)
    if a.quick:
        heads = {k: heads[k] for k in ("med2e3 tau=5, default init", "scorer 'context' tau=5",
                                       "scorer 'context' on intensity features tau=5")}
    print("| head | KL start | KL end | end/start | held-out start | held-out end | held-out end/start | held-out best |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make in heads.items():
        torch.manual_seed(0)
        head = make()
        r = fit(head, tr, None if isinstance(head, Free) else te, a.steps, a.lr)
        print(f"| {name} | {r['start']:.4f} | {r['end']:.4f} | {r['frac']:.3f} | {r['test_start']:.4f} | "
              f"{r['test_end']:.4f} | {r['test_frac']:.3f} | {r['test_best']:.4f} |", flush=True)
    steer({"med2e3 tau=5": heads["med2e3 tau=5, default init"], "context tau=5": heads["scorer 'context' tau=5"],
           "context on intensity tau=5": heads["scorer 'context' on intensity features tau=5"]},
          tr, te, a.steps, a.lr)
    print(f"# {a.steps} Adam steps at lr {a.lr:g}, full batch, 1 thread; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
