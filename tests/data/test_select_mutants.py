"""Selector behaviours that mutation testing (bench/mutation.sh) found unpinned.

Intensity features and coverage by hand, the edges of every argument check and the messages
users read, the teacher's eps and weightings, and the shared pieces of data/select/base.py
(plane shares, cycled picks, the picks teacher, the real-slice mask).
"""

from __future__ import annotations

import pytest
import torch

from medvlm3d.config import ConfigError, VoteMIConfig
from medvlm3d.data.select.base import (
    SimpleSelector,
    per_plane_keep,
    plane_groups,
    real_mask,
    shares,
    teacher_on,
)
from medvlm3d.data.select.votek import (
    VoteKSelector,
    VoteMI,
    VoteResult,
    intensity_features,
    knn_votes,
    select_slices,
    teacher_from,
    vote_k,
)

HAND = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0]])


# --------------------------------------------------------------------------------------------
# votek.py


def test_intensity_features_by_hand() -> None:
    # size 2 on 2x2 slices: the pooled block is the pixels; bins 2: [0, .5) and [.5, 1], times size
    slices = torch.tensor([[0.0, 0.25], [0.5, 1.0]]).expand(3, 1, 2, 2).clone()
    slices[1] = 0.0
    slices[2] = 7.0  # padded: no part in the mean, all-zero features
    f = intensity_features(slices, size=2, mask=torch.tensor([True, True, False]), bins=2)
    assert f.shape == (3, 2 * 2 + 2)
    # raw: slice 0 [0, .25, .5, 1 | 1, 1], slice 1 [0, 0, 0, 0 | 2, 0]; minus their mean
    torch.testing.assert_close(f[0], torch.tensor([0.0, 0.125, 0.25, 0.5, -0.5, 0.5]))
    torch.testing.assert_close(f[1], -f[0])
    assert bool((f[2] == 0).all())


def test_intensity_features_clamps_into_the_end_bins_and_4d_takes_a_mask() -> None:
    slices = torch.tensor([[[[-0.5, 1.5]]], [[[0.2, 0.2]]]])  # [2, 1, 1, 2]
    f = intensity_features(slices, size=1, bins=4, mask=torch.tensor([True, True]))
    # hist of slice 0: one pixel in bin 0, one in bin 3 (times size 1, over 2 pixels); slice 1: bin 0 twice
    torch.testing.assert_close(f[0, 1:], torch.tensor([0.5, 0.0, 0.0, 0.5]) - torch.tensor([0.75, 0.0, 0.0, 0.25]))
    masked = intensity_features(slices, size=1, bins=4, mask=torch.tensor([True, False]))
    assert bool((masked == 0).all())  # one real slice is its own mean; the padded one is 0


@pytest.mark.parametrize("size, bins", [(0, 4), (4, 0)])
def test_intensity_features_bad_sizes(size: int, bins: int) -> None:
    with pytest.raises(ValueError, match=r"size and bins must be >= 1, got"):
        intensity_features(torch.rand(3, 1, 4, 4), size=size, bins=bins)


def test_intensity_features_smallest_sizes_work() -> None:
    assert intensity_features(torch.rand(3, 1, 4, 4), size=1, bins=1).shape == (3, 2)


def test_vote_k_coverage_and_covered_by_hand() -> None:
    # k=1 votes: 0->1, 1->0, 2->3, 3->2, 4->1; one pick: 1 (two votes), its voters 0 and 4
    assert knn_votes(HAND, 1).dtype == torch.bool
    r = vote_k(HAND, 1, 1)
    assert r.picks == [1] and r.gains == [2.0]
    # one pick: its weight sums to 1, still the picks teacher (not the uniform fallback)
    torch.testing.assert_close(teacher_from(r, 5, "picks", eps=0.5, weighting="inverse"),
                               torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1]))
    assert r.covered.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert r.coverage == pytest.approx(0.6)  # 1 picked, 0 and 4 vote for it
    masked = vote_k(torch.cat([HAND, torch.ones(1, 2)]), 1, 1, mask=torch.tensor([True] * 5 + [False]))
    assert masked.covered.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] and masked.coverage == pytest.approx(0.6)


@pytest.mark.parametrize("k, picks, rho", [(0, 1, 10.0), (1, 0, 10.0), (1, 1, 0.5)])
def test_vote_k_bad_arguments(k: int, picks: int, rho: float) -> None:
    with pytest.raises(ValueError, match=r"need k >= 1, num_picks >= 1 and rho >= 1"):
        vote_k(HAND, k, picks, rho=rho)


def test_vote_k_smallest_arguments_and_shape_messages() -> None:
    assert vote_k(HAND, 1, 1, rho=1.0).picks == [1]
    with pytest.raises(ValueError, match=r"features must be \[S, F\]"):
        vote_k(HAND[None], 1, 1)
    with pytest.raises(ValueError, match=r"mask must be \[5\]"):
        vote_k(HAND, 1, 1, mask=torch.ones(4, dtype=torch.bool))


def test_teacher_from_eps_edges_inverse_and_votes_by_hand() -> None:
    r = vote_k(HAND, 2, 3)  # votes [1, 2, 1, 2, 4]
    torch.testing.assert_close(teacher_from(r, 5, "picks", eps=1.0), torch.full((5,), 0.2))
    for eps in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
            teacher_from(r, 5, eps=eps)
    inv = teacher_from(r, 5, "picks", eps=0.1, weighting="inverse")
    w = torch.tensor([1.0, 1 / 2, 1 / 3])
    torch.testing.assert_close(inv[r.picks], 0.9 * w / w.sum() + 0.02)
    votes = teacher_from(r, 5, "votes", eps=0.1)
    torch.testing.assert_close(votes, 0.9 * torch.tensor([1.0, 2, 1, 2, 4]) / 10 + 0.02)


def test_vote_mi_checks_and_modes() -> None:
    cfg = VoteMIConfig(k=2, num_picks=2, teacher="off")
    feats, mask = torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.bool)
    plane = torch.zeros(1, 6, dtype=torch.long)
    vm = VoteMI(cfg)
    torch.testing.assert_close(vm.teacher(feats, mask, plane), vm.teacher(feats, mask, plane, mode="picks"))
    assert not torch.equal(vm.teacher(feats, mask, plane, mode="votes"), vm.teacher(feats, mask, plane))
    VoteMI(VoteMIConfig(k=1, num_picks=1, feature_size=1))  # the smallest valid sizes
    for key in ("k", "num_picks", "feature_size"):
        bad = VoteMIConfig(k=2, num_picks=2)
        setattr(bad, key, 0)  # changed after the config's own check
        with pytest.raises(ValueError, match=r"k, num_picks and feature_size must be >= 1"):
            VoteMI(bad)
    one_empty = torch.tensor([[True] * 6, [False] * 6])
    with pytest.raises(ValueError, match=r"^VoteMI: every image needs at least one real slice \(mask all False in a row\)$"):
        vm.select(torch.randn(2, 6, 4), one_empty, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected features \[B, S, F\]"):
        vm.select(feats[0], mask, plane)
    with pytest.raises(ValueError, match=r"mask must be \[1, 6\]"):
        vm.select(feats, mask[:, :5], plane)
    with pytest.raises(ValueError, match=r"slice_plane must be in 0..2, got 3"):
        vm.select(feats, mask, torch.full((1, 6), 3))


def test_each_plane_votes_on_its_own_centred_features() -> None:
    # the axial slices sit off the origin: centred on their own mean (not the volume's, not a
    # scalar) they vote as HAND centred does
    centred = HAND - HAND.mean(0)
    feats = torch.cat([centred + torch.tensor([-2.0, 3.0]), torch.randn(4, 2)])[None]
    plane = torch.tensor([[0] * 5 + [1] * 4])
    res = VoteMI(VoteMIConfig(k=2, num_picks=2)).select(feats, torch.ones(1, 9, dtype=torch.bool), plane)[0]
    ref = vote_k(centred, 2, 2)
    assert ref.votes.tolist() != vote_k(centred + torch.tensor([-4.0, 6.0]), 2, 2).votes.tolist()
    assert res["axial"].votes[:5].tolist() == ref.votes.tolist() and res["axial"].picks == ref.picks


def test_teacher_from_default_mode_and_a_result_without_mask() -> None:
    r = vote_k(HAND, 2, 2)
    torch.testing.assert_close(teacher_from(r, 5), teacher_from(r, 5, "picks"))
    bare = VoteResult(picks=[4], votes=torch.tensor([1.0, 2, 1, 2, 4], dtype=torch.float64),
                      covered=torch.zeros(5, dtype=torch.float64), coverage=1.0)  # mask None: all real
    torch.testing.assert_close(teacher_from(bare, 5, "picks", eps=0.5), torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6]))


def test_votek_selector_teacher_matches_vote_mi_and_off_gives_none() -> None:
    g = torch.Generator().manual_seed(0)
    slices = torch.rand(8, 1, 8, 8, generator=g)
    plane = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    cfg = VoteMIConfig(k=2, num_picks=2, teacher="votes", feature_size=4)
    sel = VoteKSelector(cfg, 4)(slices, plane)
    ref = VoteMI(cfg).teacher(slices[None], torch.ones(1, 8, dtype=torch.bool), plane[None])[0]
    torch.testing.assert_close(sel.teacher, ref)
    assert sel.keep.tolist() == sorted(sel.keep.tolist()) and [int((plane[sel.keep] == p).sum()) for p in (0, 1)] == [2, 2]
    assert VoteKSelector(VoteMIConfig(k=2, teacher="off", feature_size=4), 4)(slices, plane).teacher is None


def test_select_slices_bad_counts() -> None:
    for k_picks, nn in ((0, 5), (4, 0)):
        with pytest.raises(ValueError, match=r"k_picks and num_neighbours must be >= 1"):
            select_slices(torch.rand(1, 8, 8, 8), k_picks, num_neighbours=nn)
    out = select_slices(torch.rand(1, 6, 8, 8), 1, num_neighbours=1, feature_size=4)
    assert len(out["axial"]["indices"]) == 1 and sum(out["axial"]["votes"]) == 6


# --------------------------------------------------------------------------------------------
# base.py


def test_shares_by_hand() -> None:
    assert shares(5, 3) == [2, 2, 1] and shares(2, 3) == [1, 1, 0] and shares(6, 3) == [2, 2, 2]
    assert shares(4, 1) == [4]


def test_plane_groups_and_real_mask() -> None:
    plane = torch.tensor([2, 0, 2, 1, 0])
    mask = torch.tensor([True, True, True, False, True])
    assert [g.tolist() for g in plane_groups(plane, mask)] == [[1, 4], [0, 2]]  # coronal is padding only
    assert real_mask(plane, None).tolist() == [True] * 5
    assert real_mask(plane, mask.int()).dtype == torch.bool
    with pytest.raises(ValueError, match=r"plane and mask must both be \[S\], got \(5,\), \(4,\)"):
        real_mask(plane, mask[:4])
    with pytest.raises(ValueError, match=r"plane and mask must both be \[S\]"):
        real_mask(plane[None], mask[None])
    with pytest.raises(ValueError, match=r"^selector: no real slice \(mask all False\)$"):
        real_mask(plane, torch.zeros(5, dtype=torch.bool))


def test_per_plane_keep_cycles_a_short_plane_and_skips_a_zero_share() -> None:
    plane = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    mask = torch.ones(7, dtype=torch.bool)
    asked: list[tuple[list[int], int]] = []

    def pick(ids: torch.Tensor, n: int) -> list[int]:
        asked.append((ids.tolist(), n))
        return ids.tolist()[:n]

    keep = per_plane_keep(plane, mask, 7, pick)  # shares [3, 2, 2]; plane 1 has one slice
    assert asked == [([0, 1, 2, 3], 3), ([4], 1), ([5, 6], 2)]
    assert keep.tolist() == [0, 1, 2, 4, 4, 5, 6] and keep.dtype == torch.long
    asked.clear()
    assert per_plane_keep(plane, mask, 2, pick).tolist() == [0, 4]  # share 0: sagittal not asked
    assert [a[0] for a in asked] == [[0, 1, 2, 3], [4]]
    assert per_plane_keep(plane[:4], mask[:4], 2, lambda ids, n: []).tolist() == [0, 0]  # no picks: first slice


def test_teacher_on_by_hand() -> None:
    mask = torch.tensor([True, True, True, True, False])
    q = teacher_on(torch.tensor([1, 1, 3]), mask, eps=0.2)
    torch.testing.assert_close(q, torch.tensor([0.05, 0.45, 0.05, 0.45, 0.0]))
    assert q.dtype == torch.float32


def test_simple_selector_reads_teacher_and_seed() -> None:
    s = SimpleSelector(VoteMIConfig(teacher="off", seed=7), 3)
    assert (s.teacher_on, s.seed, s.num_picks) == (False, 7, 3)
    d = SimpleSelector(object(), 2)
    assert (d.teacher_on, d.seed) == (True, 0)


def test_vote_mi_config_messages() -> None:
    with pytest.raises(ConfigError, match=r"^vote_mi\.features=encoder is no longer supported: slice selection "
                       r"runs on the data side, before the slice encoder, so it cannot use encoder features; "
                       r"use vote_mi\.features=intensity$"):
        VoteMIConfig(features="encoder")
    with pytest.raises(ConfigError, match=r"^vote_mi\.teacher must be one of \['off', 'votes', 'picks'\], got 'soft'$"):
        VoteMIConfig(teacher="soft")
    with pytest.raises(ConfigError, match=r"^vote_mi\.features must be one of \['intensity'\], got 'hog'$"):
        VoteMIConfig(features="hog")
    for kw in ({"k": 0}, {"num_picks": 0}):
        with pytest.raises(ConfigError, match=r"^vote_mi\.k and vote_mi\.num_picks must be >= 1$"):
            VoteMIConfig(**kw)
    assert VoteMIConfig(k=1, num_picks=1).k == 1
