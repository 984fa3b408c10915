"""`vote_mi_brainmd`: Vote-MI as the BrainMD authors' released code runs it, one plane at a time.

    VoteMIBrainMD(cfg: VoteMIConfig, num_picks)(slices [S, 1, h, w], plane [S], mask [S] | None,
                                               index) -> SliceSelection(teacher [S] | None, keep [P])
    plane_votes(slices [n, 1, h, w], cfg, gen) -> votes [n] float64     (one plane's real slices)

Reference: YuliWanghust/BrainMD_NIPS, `BrainMD-main.zip`, folder `representative-select/`
(`R/` below). Their pipeline runs on a data set of images (MNIST in the released demo); here
the "data set" is the real slices of one plane of one study. Each step, its source, and where we
differ:

1. Representation (`latent`): a 2-D latent per slice (`dim_z` default 2, `R/Vote_MI_Quick_Infer/
   main.py: parse_args`), from an MLP VAE on the flattened image in [0, 1] (`vae.py:
   gaussian_encoder`: Dense(n_hidden, elu) -> Dropout(0.1) -> Dense(n_hidden, tanh) -> Dropout ->
   mu, sigma). The VAE is trained per data set by their `main.py`; none is released.
   - `vote_mi.latent: vae` reads such an encoder from `vote_mi.vae_path` (safetensors, keys in
     `VAE_KEYS`; input = the slice pooled to feature_size x feature_size); z = mu (their CSV holds a
     sampled z = mu + sigma * eps; we take the mean so that the picks are deterministic).
   - `vote_mi.latent: pca` (default, needs no network): the top-2 principal components of the
     same pooled slices, each scaled to unit standard deviation (the scale of the VAE's N(0, 1)
     prior, so that DBSCAN's eps means the same); signs fixed so the largest loading is positive.
2. Clustering: DBSCAN on z (`inference_DBSCAN.py: main`, eps 0.18, min_samples 25 there =
   `vote_mi.dbscan_eps` / `dbscan_min_samples`), scikit-learn's implementation as theirs. Noise
   points (-1) take no part; clusters under `MIN_CLUSTER` (5) points are skipped (`main`). Our
   addition: when no cluster is left, all real slices form one cluster (a plane of 32 slices rarely
   reaches their min_samples of 25 out of 10,000 MNIST digits).
3. Coverage by MCMC: per cluster, an affine-invariant ensemble sampler (emcee's default stretch
   move, a = 2; `run_mcmc`) with `MCMC_WALKERS` (10) walkers started on random cluster points,
   target density = a Gaussian kernel sum over the cluster's points with bandwidth `MCMC_STEP`
   (0.1) (`log_prob_fn`: log(sum exp(-d^2 / (2 s^2)) + 1e-10)); 5 steps -> 50 samples
   (`run_mcmc(cluster_points, n_samples=5)`, flattened chain). Ours is `stretch_mcmc`, seeded.
4. Mutual information (`compute_mutual_information`: sklearn `mutual_info_score` of the two
   flattened images, natural log). Their images are VAE decoder outputs of latent points; ours are
   the real slices: a latent sample stands for its nearest slice of the plane (Euclidean in z).
   Their score takes every distinct float as a label (on continuous images it degenerates to
   log(#pixels)); we quantise the slice pooled to `MI_SIZE` x `MI_SIZE` into `MI_BINS` levels.
5. Intra-cluster selection (`main`): each cluster point scores the *min* MI to the cluster's MCMC
   images; the max(0, int(0.10 n) - 5) highest join the 50 MCMC samples in the pool.
6. Inter-cluster selection (`main`): MCMC over the whole pool, 10 steps (100 samples); each pool
   point scores the *max* MI to those samples' images; the max(1, int(0.10 n_pool)) lowest are
   kept; final = the 100 samples + those points.
7. Voting (`R/select.py`, step 6, pseudo-code only: "rank and select representative slices ... by
   votes" per direction): each final point votes for its nearest slice; the plane's share of
   `num_picks` goes to the most-voted slices (ties -> lowest index).

Teacher (`vote_mi.teacher`): "votes" = (1 - eps) * votes / sum + eps * uniform per plane, the
planes' mass split evenly; "picks" = `teacher_on(keep)`. The random draws come from a generator
seeded by (vote_mi.seed, the sample's index, the plane): the same picks in every epoch and worker.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from medvlm3d.data.errors import ConfigError

from .base import SELECTORS, SliceSelection, VoteMIConfig, per_plane_keep, plane_groups, real_mask, teacher_on

MIN_CLUSTER = 5  # inference_DBSCAN.py main: `if len(cluster_points) < 5: continue`
MCMC_WALKERS = 10  # run_mcmc: n_walkers
MCMC_STEP = 0.1  # run_mcmc: step_size (the kernel bandwidth of log_prob_fn)
STAGE1_STEPS, STAGE2_STEPS = 5, 10  # run_mcmc(cluster_points, n_samples=5); run_mcmc(sampled_data, n_samples=10)
FRACTION = 0.10  # 10 % of the cluster (stage 1) and of the pool (stage 2)
STRETCH_A = 2.0  # emcee StretchMove default
MI_SIZE, MI_BINS = 32, 16  # our choice: the images whose MI is taken (their MNIST digits are 28 x 28)
TEACHER_EPS = 0.05
VAE_KEYS = ("encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias", "mu.weight", "mu.bias")


# --------------------------------------------------------------------------------------------
# 1. representation


def pooled(slices: torch.Tensor, size: int) -> torch.Tensor:
    """slices [n, 1, h, w] -> [n, size * size] float64: the flattened image the VAE reads."""
    return rearrange(F.adaptive_avg_pool2d(slices.detach().cpu().float(), size), "n c h w -> n (c h w)").double()


def pca_latent(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """x [n, F] -> z [n, dim] float64: principal components, unit std, sign-fixed (zeros where the
    slices do not vary)."""
    xc = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    comps = vh[:dim]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    z = xc @ (comps * torch.where(sign == 0, torch.ones_like(sign), sign)).T
    z = F.pad(z, (0, dim - z.shape[1]))
    std = z.std(0, unbiased=False, keepdim=True)
    return torch.where(std > 1e-12, z / std.clamp_min(1e-12), torch.zeros_like(z))


class VAEEncoder:
    """The mean branch of the reference's `gaussian_encoder` (vae.py), read from a local file."""

    def __init__(self, path: str, in_features: int) -> None:
        from safetensors.torch import load_file

        if not path or not Path(path).is_file():
            raise ConfigError(f"vote_mi.vae_path: {path!r} is not a file; vote_mi.latent=vae needs a trained VAE "
                              f"encoder as safetensors with the keys {list(VAE_KEYS)} (or use vote_mi.latent=pca)")
        sd = load_file(path)
        missing, extra = sorted(set(VAE_KEYS) - set(sd)), sorted(set(sd) - set(VAE_KEYS))
        if missing or extra:
            raise ConfigError(f"{path}: VAE encoder keys missing {missing}, unexpected {extra}; expected {list(VAE_KEYS)}")
        self.w = {k: sd[k].double() for k in VAE_KEYS}
        if self.w["encoder.0.weight"].shape[1] != in_features:
            raise ConfigError(f"{path}: encoder.0.weight takes {self.w['encoder.0.weight'].shape[1]} inputs; the "
                              f"slices pooled to vote_mi.feature_size give {in_features}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = F.elu(F.linear(x, self.w["encoder.0.weight"], self.w["encoder.0.bias"]))
        h = torch.tanh(F.linear(h, self.w["encoder.1.weight"], self.w["encoder.1.bias"]))
        return F.linear(h, self.w["mu.weight"], self.w["mu.bias"])


# --------------------------------------------------------------------------------------------
# 2-4. clustering, MCMC, mutual information


def dbscan(z: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """z [n, d] -> labels [n] long (-1 = noise), scikit-learn's DBSCAN (deterministic)."""
    from sklearn.cluster import DBSCAN

    return torch.as_tensor(DBSCAN(eps=eps, min_samples=min_samples).fit_predict(z.numpy()), dtype=torch.long)


def sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[m, d], [n, d] -> [m, n] squared Euclidean distances, computed directly (torch.cdist's
    matrix-product path breaks exact ties between identical points)."""
    return (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)


def kde_log_prob(x: torch.Tensor, data: torch.Tensor, step: float = MCMC_STEP) -> torch.Tensor:
    """x [m, d], data [n, d] -> [m]: log(sum_i exp(-|x - data_i|^2 / (2 step^2)) + 1e-10)."""
    d2 = sq_dist(x, data)
    return torch.log(torch.exp(-d2 / (2 * step**2)).sum(1) + 1e-10)


def stretch_mcmc(data: torch.Tensor, steps: int, gen: torch.Generator, walkers: int = MCMC_WALKERS,
                 step: float = MCMC_STEP, a: float = STRETCH_A) -> torch.Tensor:
    """Goodman & Weare's stretch move over `kde_log_prob(., data)`, walkers split in two random
    halves each step -> the chain [steps * walkers, d], step-major (emcee's flat chain)."""
    d = data.shape[1]
    pos = data[torch.randint(data.shape[0], (walkers,), generator=gen)].clone()
    lp = kde_log_prob(pos, data, step)
    chain = []
    for _ in range(steps):
        half = torch.randperm(walkers, generator=gen) % 2
        for part in (0, 1):
            s, c = (half == part).nonzero().flatten(), (half != part).nonzero().flatten()
            if s.numel() == 0 or c.numel() == 0:
                continue
            zz = ((a - 1.0) * torch.rand(s.numel(), generator=gen, dtype=torch.float64) + 1.0) ** 2 / a
            partner = pos[c[torch.randint(c.numel(), (s.numel(),), generator=gen)]]
            prop = partner - (partner - pos[s]) * zz[:, None]
            new_lp = kde_log_prob(prop, data, step)
            accept = torch.log(torch.rand(s.numel(), generator=gen, dtype=torch.float64)) < (d - 1) * torch.log(zz) + new_lp - lp[s]
            pos[s[accept]], lp[s[accept]] = prop[accept], new_lp[accept]
        chain.append(pos.clone())
    return torch.cat(chain)


def quantise(slices: torch.Tensor, size: int = MI_SIZE, bins: int = MI_BINS) -> torch.Tensor:
    """slices [n, 1, h, w] in [0, 1] -> labels [n, size * size] long in [0, bins)."""
    x = pooled(slices, size).clamp(0.0, 1.0)
    return (x * bins).long().clamp_max(bins - 1)


def mi_matrix(labels: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """labels [n, P] long -> [n, n] float64: mutual_info_score(labels_i, labels_j) (natural log)."""
    n, p = labels.shape
    onehot = F.one_hot(labels, bins).double()  # [n, P, B]
    joint = torch.einsum("ipa,jpb->ijab", onehot, onehot) / p  # [n, n, B, B]
    pi, pj = joint.sum(3, keepdim=True), joint.sum(2, keepdim=True)
    ratio = torch.where(joint > 0, joint / (pi * pj).clamp_min(1e-300), torch.ones_like(joint))
    return (joint * torch.log(ratio)).sum((2, 3))


# --------------------------------------------------------------------------------------------
# 5-7. the two stages and the votes


def plane_votes(slices: torch.Tensor, cfg: VoteMIConfig, gen: torch.Generator,
                encoder: VAEEncoder | None = None) -> torch.Tensor:
    """One plane's real slices [n, 1, h, w] -> votes [n] float64 (see the module docstring)."""
    n = slices.shape[0]
    x = pooled(slices, cfg.feature_size)
    z = encoder(x) if encoder is not None else pca_latent(x)
    mi = mi_matrix(quantise(slices))
    labels = dbscan(z, cfg.dbscan_eps, cfg.dbscan_min_samples)
    clusters = [(labels == c).nonzero().flatten() for c in sorted(set(labels.tolist()) - {-1})]
    clusters = [c for c in clusters if c.numel() >= MIN_CLUSTER] or [torch.arange(n)]

    def nearest(points: torch.Tensor) -> torch.Tensor:  # latent points -> the slice each stands for
        return sq_dist(points, z).argmin(1)

    pool_z, pool_ids = [], []
    for ids in clusters:  # stage 1: the cluster's MCMC samples + the points least covered by them
        samples = stretch_mcmc(z[ids], STAGE1_STEPS, gen)
        seen = nearest(samples)
        score = mi[ids][:, seen].min(1).values
        extra = ids[torch.sort(-score, stable=True).indices[: max(0, int(ids.numel() * FRACTION) - 5)]]
        pool_z += [samples, z[extra]]
        pool_ids += [seen, extra]
    pool, pool_slice = torch.cat(pool_z), torch.cat(pool_ids)
    final = stretch_mcmc(pool, STAGE2_STEPS, gen)  # stage 2: over the pooled samples
    final_slice = nearest(final)
    score = mi[pool_slice][:, final_slice].max(1).values
    kept = pool_slice[torch.sort(score, stable=True).indices[: max(1, int(pool_slice.numel() * FRACTION))]]
    return torch.bincount(torch.cat([final_slice, kept]), minlength=n).double()


@SELECTORS.register("vote_mi_brainmd")
class VoteMIBrainMD:
    """Vote-MI (BrainMD's released code, see the module docstring); each plane on its own."""

    def __init__(self, cfg: VoteMIConfig, num_picks: int) -> None:
        self.cfg, self.num_picks = cfg, int(num_picks)
        side = cfg.feature_size * cfg.feature_size
        self.encoder = VAEEncoder(cfg.vae_path, side) if cfg.latent == "vae" else None

    @torch.no_grad()
    def votes(self, slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor, index: int = 0) -> torch.Tensor:
        """[S] float64 votes over the real slices of every plane (0 on padding)."""
        out = torch.zeros(plane.shape[0], dtype=torch.float64)
        for ids in plane_groups(plane, mask):
            p = int(plane[ids[0]])
            gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + int(index)) * 7 + p)
            out[ids] = plane_votes(slices[ids], self.cfg, gen, self.encoder)
        return out

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor | None = None,
                 index: int = 0, slice_target: torch.Tensor | None = None) -> SliceSelection:
        m = real_mask(plane, mask)
        plane = plane.detach().cpu().long()
        votes = self.votes(slices, plane, m, index)

        def pick(ids: torch.Tensor, n: int) -> list[int]:  # the most-voted, ties -> lowest index
            return ids[torch.sort(-votes[ids], stable=True).indices[:n]].tolist()

        keep = per_plane_keep(plane, m, self.num_picks, pick)
        teacher = None
        if self.cfg.teacher == "picks":
            teacher = teacher_on(keep, m, TEACHER_EPS)
        elif self.cfg.teacher == "votes":
            groups = plane_groups(plane, m)
            w = torch.zeros_like(votes)
            for ids in groups:
                w[ids] = votes[ids] / votes[ids].sum() / len(groups)
            teacher = ((1.0 - TEACHER_EPS) * w + TEACHER_EPS * m.double() / m.sum()).float()
        return SliceSelection(teacher=teacher, keep=keep)
