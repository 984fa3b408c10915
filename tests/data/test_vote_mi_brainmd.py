"""`vote_mi_brainmd` (data/select/vote_mi_brainmd.py): BrainMD's Vote-MI steps against small
re-implementations of the reference's formulas, determinism, and picks with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medvlm3d.config import ConfigError, VoteMIConfig, load_config
from medvlm3d.data.select import build_selector
from medvlm3d.data.select.vote_mi_brainmd import (
    MCMC_WALKERS, VAE_KEYS, VAEEncoder, kde_log_prob, mi_matrix, pca_latent, pooled, quantise, stretch_mcmc,
)

CFG = dict(dbscan_eps=0.5, dbscan_min_samples=5)


def tissues(seed: int, per_group: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One plane of 3 * per_group slices, three distinct "tissues", each slice an exact copy of its
    tissue's pattern, shuffled -> (slices [n, 1, 32, 32], group [n])."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(3, 1, 32, 32, generator=g)
    group = torch.arange(3).repeat_interleave(per_group)[torch.randperm(3 * per_group, generator=g)]
    return patterns[group], group


def test_mutual_information_is_sklearns_mutual_info_score() -> None:
    """Reference: inference_DBSCAN.py compute_mutual_information = sklearn mutual_info_score of the
    flattened images; ours on the quantised slices."""
    from sklearn.metrics import mutual_info_score

    slices = torch.rand(5, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    slices[3] = slices[0] ** 2  # dependent on slice 0
    labels = quantise(slices)
    mi = mi_matrix(labels)
    want = [[mutual_info_score(labels[i].numpy(), labels[j].numpy()) for j in range(5)] for i in range(5)]
    assert torch.allclose(mi, torch.tensor(want, dtype=torch.float64), atol=1e-10)
    assert mi[0, 3] > 5 * mi[0, 1]  # a function of slice 0 shares far more information with it


def test_kde_log_prob_is_the_references_formula() -> None:
    """log_prob_fn: log(sum exp(-|data - z|^2 / (2 s^2)) + 1e-10), one point at a time."""
    rng = np.random.default_rng(0)
    data, points = rng.normal(size=(7, 2)), rng.normal(size=(4, 2))
    want = [math.log(np.exp(-np.linalg.norm(data - z, axis=1) ** 2 / (2 * 0.1**2)).sum() + 1e-10) for z in points]
    got = kde_log_prob(torch.tensor(points), torch.tensor(data), 0.1)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-9)


def test_stretch_mcmc_shape_seed_and_support() -> None:
    data = torch.tensor([[0.0, 0.0], [0.05, 0.0], [3.0, 3.0], [3.0, 3.05]], dtype=torch.float64)
    a = stretch_mcmc(data, 5, torch.Generator().manual_seed(1))
    b = stretch_mcmc(data, 5, torch.Generator().manual_seed(1))
    assert a.shape == (5 * MCMC_WALKERS, 2) and torch.equal(a, b)
    # the Gaussian-kernel density (bandwidth 0.1) keeps every sample near a data point
    assert float(torch.cdist(a, data).min(1).values.max()) < 0.6
    c = stretch_mcmc(data, 5, torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)


def test_pca_latent_is_two_unit_std_components_and_order_free() -> None:
    x = pooled(torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(3)), 8)
    z = pca_latent(x)
    assert z.shape == (20, 2)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(2, dtype=torch.float64))
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(pca_latent(x[perm]), z[perm], atol=1e-9)  # signs fixed: same latent per slice
    assert torch.equal(pca_latent(torch.ones(6, 4, dtype=torch.float64)), torch.zeros(6, 2, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_picks_one_slice_per_tissue(seed: int) -> None:
    """Known answer: a plane made of three distinct tissues is represented by one slice of each,
    the first of each tissue (a latent sample stands for its nearest slice, ties -> lowest index)."""
    slices, group = tissues(seed)
    plane = torch.zeros(30, dtype=torch.long)
    out = build_selector("vote_mi_brainmd", VoteMIConfig(seed=seed, **CFG), 3)(slices, plane)
    first = sorted(int((group == g).nonzero()[0]) for g in range(3))
    assert out.keep.tolist() == first


def test_planes_pick_separately_padding_and_teacher() -> None:
    a, _ = tissues(0)
    b, group_b = tissues(1)
    slices = torch.cat([a, b, torch.zeros(2, 1, 32, 32)])
    plane = torch.cat([torch.zeros(30), torch.ones(30), torch.zeros(2)]).long()
    mask = torch.tensor([True] * 60 + [False] * 2)
    sel = build_selector("vote_mi_brainmd", VoteMIConfig(teacher="votes", **CFG), 6)
    out = sel(slices, plane, mask, index=5)
    assert out.keep.shape == (6,) and [int((plane[out.keep] == p).sum()) for p in (0, 1)] == [3, 3]
    assert sorted(int(group_b[k - 30]) for k in out.keep[3:]) == [0, 1, 2]
    assert out.teacher.shape == (62,) and float(out.teacher.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(out.teacher[~mask] == 0)
    assert float(out.teacher[:30].sum()) == pytest.approx(0.5, abs=1e-6)  # each plane half the mass
    again = sel(slices, plane, mask, index=5)
    assert torch.equal(out.keep, again.keep) and torch.equal(out.teacher, again.teacher)


def test_seed_and_index_drive_the_draws_not_the_global_rng() -> None:
    slices = torch.rand(32, 1, 32, 32, generator=torch.Generator().manual_seed(7))
    plane, mask = torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.bool)
    sel = build_selector("vote_mi_brainmd", VoteMIConfig(**CFG), 2)
    torch.manual_seed(123)
    v1 = sel.votes(slices, plane, mask, index=0)
    torch.manual_seed(456)
    assert torch.equal(v1, sel.votes(slices, plane, mask, index=0))
    assert float(v1.sum()) > 0
    others = [sel.votes(slices, plane, mask, index=i) for i in (1, 2, 3)]
    assert any(not torch.equal(v1, v) for v in others)


def test_vae_latent_reads_a_local_encoder_and_names_what_is_wrong(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"encoder.0.weight": (12, 16), "encoder.0.bias": (12,), "encoder.1.weight": (12, 12),
              "encoder.1.bias": (12,), "mu.weight": (2, 12), "mu.bias": (2,)}
    sd = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    assert set(sd) == set(VAE_KEYS)
    path = tmp_path / "vae.safetensors"
    save_file(sd, str(path))
    x = torch.rand(3, 16, dtype=torch.float64, generator=g)
    w = {k: v.double().numpy() for k, v in sd.items()}
    elu = lambda t: np.where(t > 0, t, np.exp(t) - 1)  # noqa: E731
    h = np.tanh(elu(x.numpy() @ w["encoder.0.weight"].T + w["encoder.0.bias"]) @ w["encoder.1.weight"].T + w["encoder.1.bias"])
    want = h @ w["mu.weight"].T + w["mu.bias"]  # vae.py gaussian_encoder: the mu branch
    assert np.allclose(VAEEncoder(str(path), 16)(x).numpy(), want, atol=1e-10)

    cfg = VoteMIConfig(latent="vae", vae_path=str(path), feature_size=4, **CFG)
    slices, _ = tissues(0)
    assert build_selector("vote_mi_brainmd", cfg, 3)(slices, torch.zeros(30, dtype=torch.long)).keep.shape == (3,)
    with pytest.raises(ConfigError, match="not a file"):
        build_selector("vote_mi_brainmd", VoteMIConfig(latent="vae", vae_path=str(tmp_path / "none")), 3)
    save_file({k: v for k, v in sd.items() if k != "mu.bias"} | {"extra": torch.zeros(1)}, str(path))
    with pytest.raises(ConfigError, match=r"missing \['mu.bias'\], unexpected \['extra'\]"):
        build_selector("vote_mi_brainmd", cfg, 3)
    with pytest.raises(ConfigError, match="vote_mi.latent"):
        VoteMIConfig(latent="encoder")


def test_brainmd_config_uses_the_authors_vote_mi() -> None:
    vm = load_config("brainmd_votemi").model.vote_mi
    assert (vm.selector, vm.latent, vm.teacher) == ("vote_mi_brainmd", "pca", "off")
