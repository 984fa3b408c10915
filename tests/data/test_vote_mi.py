"""Vote-MI: features, kNN votes and the vote-k discount by hand, a lesion phantom, the teacher."""

from __future__ import annotations

import math

import pytest
import torch

from medvlm3d.config import VoteMIConfig
from medvlm3d.data.select.votek import (
    VoteMI,
    greedy_picks,
    intensity_features,
    knn_votes,
    select_slices,
    teacher_from,
    vote_k,
)


def phantom(lesion: range, seed: int = 0, slices: int = 32, n: int = 64) -> torch.Tensor:
    """[1, slices, n, n]: the same smooth elliptic body in every slice plus small noise, and a
    bright Gaussian blob in the `lesion` slices."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    body = torch.sigmoid((1 - (xx / 0.8) ** 2 - (yy / 0.6) ** 2) * 20) * 0.5
    vol = body.expand(slices, n, n) + 0.02 * torch.randn(slices, n, n, generator=g)
    blob = 0.4 * torch.exp(-((xx - 0.3) ** 2 + (yy - 0.1) ** 2) / 0.02)
    vol[list(lesion)] += blob
    return vol.clamp(0, 1).unsqueeze(0)


def axial_features(vol: torch.Tensor) -> torch.Tensor:
    return intensity_features(vol[0].unsqueeze(1), size=16)


# ---------------------------------------------------------------------------------------------
# features


def test_intensity_features_shapes_and_centring() -> None:
    vol = phantom(range(20, 26))
    f = axial_features(vol)
    assert f.shape == (32, 16 * 16 + 16)
    torch.testing.assert_close(f.mean(0), torch.zeros(f.shape[1]), atol=1e-5, rtol=0)
    batch = torch.stack([vol[0].unsqueeze(1), vol[0].unsqueeze(1).flip(0)])  # [2, 32, 1, 64, 64]
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 30:] = False
    fb = intensity_features(batch, size=8, mask=mask)
    assert fb.shape == (2, 32, 8 * 8 + 16)
    assert bool((fb[1, 30:] == 0).all())  # padded slices
    torch.testing.assert_close(fb[1, :30].mean(0), torch.zeros(fb.shape[2]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="slices must be"):
        intensity_features(torch.zeros(32, 2, 8, 8))
    with pytest.raises(ValueError, match="mask must be"):
        intensity_features(batch, mask=mask[:, :5])


# ---------------------------------------------------------------------------------------------
# votes and picks by hand


HAND = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0]])


def test_knn_votes_by_hand() -> None:
    # k=1: 0->1 (cos .995), 1->0, 2->3, 3->2, 4->{1 or 3: both cos .774, tie -> lowest} = 1
    a1 = knn_votes(HAND, 1)
    assert [row.nonzero().flatten().tolist() for row in a1] == [[1], [0], [3], [2], [1]]
    assert vote_k(HAND, 1, 1).votes.tolist() == [1, 2, 1, 1, 0]
    # k=2: 0->{1, 4(.707)}, 1->{0, 4}, 2->{3, 4}, 3->{2, 4}, 4->{1, 3}
    a2 = knn_votes(HAND, 2)
    assert [row.nonzero().flatten().tolist() for row in a2] == [[1, 4], [0, 4], [3, 4], [2, 4], [1, 3]]
    r = vote_k(HAND, 2, 1)
    assert r.votes.tolist() == [1, 2, 1, 2, 4]
    assert r.picks == [4]  # most votes


def test_k_capped_and_single_slice() -> None:
    r = vote_k(HAND[:4], k=10, num_picks=10)
    assert r.votes.tolist() == [3, 3, 3, 3]  # k capped at S-1: everyone votes for all others
    assert sorted(r.picks) == [0, 1, 2, 3]  # num_picks capped at S
    one = vote_k(HAND[:1], k=5, num_picks=4)
    assert one.picks == [0] and one.votes.tolist() == [0.0]
    assert teacher_from(one, 1, "votes").tolist() == [1.0]
    assert teacher_from(one, 1, "picks").tolist() == [1.0]


def test_discount_formula_by_hand() -> None:
    # a dense clique {0,1,2,3} (3 votes each) and a small clique {4,5,6} (2 votes each)
    a = torch.zeros(7, 7, dtype=torch.bool)
    for group in ([0, 1, 2, 3], [4, 5, 6]):
        for v in group:
            for u in group:
                a[v, u] = u != v
    picks, gains, c = greedy_picks(a, 3, rho=10.0)
    # pick 0 (3 votes, tie -> lowest); its voters 1,2,3 now count c=1.
    # pick 2: u=1 gets 10^-1 from 2 and 3 (0 is spent) = 0.2; u=4 gets 1 + 1 from 5, 6 = 2 -> 4.
    # pick 3: c = [0,1,1,1,0,1,1]; u=1: 0.2; u=5: 10^-1 from 6 (4 spent) = 0.1 -> 1.
    assert picks == [0, 4, 1]
    assert gains == pytest.approx([3.0, 2.0, 0.2])
    assert c.tolist() == [1, 1, 2, 2, 0, 1, 1]
    # without the discount (rho = 1) the dense clique keeps winning: [0, 1 (2 votes, tie with 4), 4]
    assert greedy_picks(a, 3, rho=1.0)[0] == [0, 1, 4]


def test_masked_vote_k_uses_real_slices_only() -> None:
    feats = torch.cat([HAND, torch.full((2, 2), 9.0)])
    mask = torch.tensor([True] * 5 + [False] * 2)
    r = vote_k(feats, 2, 3, mask=mask)
    ref = vote_k(HAND, 2, 3)
    assert r.picks == ref.picks and r.votes[:5].tolist() == ref.votes.tolist()
    assert r.votes[5:].tolist() == [0.0, 0.0]
    q = teacher_from(r, 7, "picks")
    assert q[5:].tolist() == [0.0, 0.0] and q.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no real slices"):
        vote_k(feats, 2, 3, mask=torch.zeros(7, dtype=torch.bool))


def test_determinism() -> None:
    f = axial_features(phantom(range(20, 26), seed=3))
    r1, r2 = vote_k(f, 5, 4), vote_k(f.clone(), 5, 4)
    assert r1.picks == r2.picks and torch.equal(r1.votes, r2.votes) and r1.gains == r2.gains
    vm = VoteMI(VoteMIConfig())
    mask = torch.ones(1, 32, dtype=torch.bool)
    plane = torch.zeros(1, 32, dtype=torch.long)
    assert torch.equal(vm.teacher(f[None], mask, plane), vm.teacher(f[None].clone(), mask, plane))


# ---------------------------------------------------------------------------------------------
# the lesion phantom


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discount_brings_lesion_into_picks(seed: int) -> None:
    """A lesion spanning k+1 = 6 slices forms its own kNN cluster. Its slices get no more votes
    than the body's, but once the body is covered the discount makes vote-k pick it."""
    lesion = range(20, 26)
    f = axial_features(phantom(lesion, seed=seed))
    r = vote_k(f, k=5, num_picks=4)
    assert any(p in lesion for p in r.picks)
    assert not any(p in lesion for p in vote_k(f, k=5, num_picks=4, rho=1.0).picks)  # no discount
    q_votes = teacher_from(r, 32, "votes")[list(lesion)].sum().item()
    q_picks = teacher_from(r, 32, "picks")[list(lesion)].sum().item()
    assert q_votes <= len(lesion) / 32 + 1e-6  # votes give the lesion at most its uniform share
    assert q_votes < q_picks


def test_votes_undervalue_a_narrow_lesion() -> None:
    """A 4-slice lesion (narrower than k+1) must vote outside itself: fewer votes than uniform.
    (With k=5 vote-k picks it only after 7-12 body slices; see the module docstring.)"""
    lesion = range(20, 24)
    r = vote_k(axial_features(phantom(lesion)), k=5, num_picks=4)
    assert r.votes[list(lesion)].tolist() == [3.0, 3.0, 3.0, 3.0]
    assert teacher_from(r, 32, "votes")[list(lesion)].sum().item() < len(lesion) / 32


# ---------------------------------------------------------------------------------------------
# the teacher and the batch module


def test_teacher_sums_to_one_and_zero_on_padding() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 10, 12, generator=g)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10], mask[1, :6], mask[2, :1] = True, True, True
    plane = torch.zeros(3, 10, dtype=torch.long)
    for mode in ("votes", "picks"):
        q = VoteMI(VoteMIConfig(k=3, num_picks=2, teacher=mode)).teacher(feats, mask, plane)
        assert q.shape == (3, 10) and q.dtype == torch.float32 and not q.requires_grad
        torch.testing.assert_close(q.sum(-1), torch.ones(3))
        assert bool((q[~mask] == 0).all()) and bool((q[mask] > 0).all())
    q_picks = VoteMI(VoteMIConfig(k=3, num_picks=2, teacher="picks")).teacher(feats, mask, plane)
    assert int((q_picks[0] > 0.1).sum()) == 2  # mass concentrates on the 2 picks
    with pytest.raises(ValueError, match="at least one real slice"):
        VoteMI(VoteMIConfig()).teacher(feats, torch.zeros(3, 10, dtype=torch.bool), plane)


def test_teacher_from_weightings_and_bad_args() -> None:
    r = vote_k(HAND, 2, 3)
    uni = teacher_from(r, 5, "picks", eps=0.05)
    lin = teacher_from(r, 5, "picks", eps=0.05, weighting="linear")
    assert uni[r.picks].tolist() == pytest.approx([0.95 / 3 + 0.01] * 3)
    assert lin[r.picks].tolist() == pytest.approx([0.95 * w / 6 + 0.01 for w in (3, 2, 1)])
    with pytest.raises(ValueError, match="S=6"):
        teacher_from(r, 6)
    with pytest.raises(ValueError, match="mode"):
        teacher_from(r, 5, "off")
    with pytest.raises(ValueError, match="weighting"):
        teacher_from(r, 5, weighting="exp")


def test_multi_plane_split_and_select() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 12, 8, generator=g)
    plane = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[True] * 10 + [False] * 2])
    vm = VoteMI(VoteMIConfig(k=2, num_picks=2))
    q = vm.teacher(feats, mask, plane)[0]
    assert q[:6].sum().item() == pytest.approx(0.5) and q[6:10].sum().item() == pytest.approx(0.5)
    assert q[10:].tolist() == [0.0, 0.0]
    (res,) = vm.select(feats, mask, plane)
    assert set(res) == {"axial", "coronal"}
    assert all(0 <= p < 6 for p in res["axial"].picks) and all(6 <= p < 10 for p in res["coronal"].picks)
    assert len(res["axial"].picks) == 2 and res["coronal"].votes[:6].sum() == 0
    # slices [B, S, 1, h, w] are turned into intensity features
    slices = torch.rand(1, 12, 1, 8, 8, generator=g)
    assert len(vm.select(slices, mask, plane)[0]["coronal"].picks) == 2
    with pytest.raises(ValueError, match="slice_plane must be"):
        vm.select(feats, mask, plane[:, :5])


def test_select_slices_standalone() -> None:
    vol = phantom(range(20, 26))[:, :, :48, :40]  # [1, 32, 48, 40]
    out = select_slices(vol, 4, planes=("axial", "coronal", "sagittal"), num_neighbours=5, feature_size=8)
    for name, n in (("axial", 32), ("coronal", 48), ("sagittal", 40)):
        assert len(out[name]["indices"]) == 4 and len(set(out[name]["indices"])) == 4
        assert all(0 <= i < n for i in out[name]["indices"]) and len(out[name]["votes"]) == n
        assert math.isclose(sum(out[name]["votes"]), 5 * n)
    assert any(i in range(20, 26) for i in out["axial"]["indices"])
    with pytest.raises(ValueError, match="unknown plane"):
        select_slices(vol, 4, planes=("oblique",))
    with pytest.raises(ValueError, match=r"\[1, D, H, W\]"):
        select_slices(vol[0], 4)
