"""FeatureCache: rows computed once and returned identically, content keys, the byte cap,
which modules may be cached, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvlm3d.model.feature_cache import CHUNK_ROWS, FeatureCache, check_cacheable, row_keys


class Counting(nn.Module):
    """x [N, 3], m [N, 3] -> [N, 2, 3]; records how many rows each call computed."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 6)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        return (self.lin(x) * m.repeat(1, 2)).view(-1, 2, 3)


def test_rows_computed_once_and_identical() -> None:
    torch.manual_seed(0)
    mod, cache = Counting(), FeatureCache(1 << 20)
    x, m = torch.randn(4, 3), torch.ones(4, 3)
    first = cache.run("enc", mod, x, m)
    torch.testing.assert_close(first, mod(x, m))
    # rows 2 and 0 again, and one new row: only the new row is computed
    x2 = torch.cat([x[2:3], torch.randn(1, 3), x[0:1]])
    m2 = torch.ones(3, 3)
    second = cache.run("enc", mod, x2, m2)
    assert mod.calls == [CHUNK_ROWS, 4, CHUNK_ROWS]  # run (one chunk), the reference call above, one miss (padded)
    assert torch.equal(second[0], first[2]) and torch.equal(second[2], first[0])
    torch.testing.assert_close(second, mod(x2, m2))
    assert (cache.hits, cache.misses, len(cache)) == (2, 5, 5)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5, 6, 7], [5, 0, 7, 2], [3]])
def test_a_row_is_bit_identical_whatever_batch_it_comes_in(order: list[int]) -> None:
    # What a resumed run needs: its cache starts empty and sees the rows in other batches than
    # the uninterrupted run did; each row must still give the very same bits.
    torch.manual_seed(3)
    mod = nn.Sequential(nn.Linear(96, 384), nn.GELU(), nn.Linear(384, 80))
    x = torch.randn(8, 96)
    # row i at the head of a chunk of strangers: what any chunk computes for it
    alone = [mod(torch.cat([x[i:i + 1], torch.randn(CHUNK_ROWS - 1, 96)]))[0] for i in range(8)]
    out = FeatureCache(1 << 20).run("enc", mod, x[order])
    assert all(torch.equal(out[j], alone[i]) for j, i in enumerate(order))
    warm = FeatureCache(1 << 20)
    warm.run("enc", mod, x[[1, 6]])
    mixed = warm.run("enc", mod, x[order])  # some rows from the cache, the others fresh
    assert torch.equal(mixed, out)


def test_the_demo_encoders_give_a_row_the_same_bits_in_any_chunk() -> None:
    # The chunked misses rest on this: at a fixed chunk shape, the 3D ResNet and the slice ViT
    # compute a row the same whatever its chunk-mates and its place (at batch 1 the 3D ResNet's
    # convolutions differ from a chunk of 4 by ~3e-5: another algorithm).
    from medvlm3d.config import load_config
    from medvlm3d.model.encoder3d import build_encoder3d
    from medvlm3d.model.slice_encoder import SliceEncoder

    torch.manual_seed(4)
    cfg = load_config("demo")
    encoder3d = build_encoder3d(cfg.model.encoder3d).eval()
    slice_encoder = SliceEncoder(cfg.model.slice_encoder, cfg.data.slice_size).eval()
    vol, sl = torch.randn(1, 1, 32, 64, 64), torch.randn(1, 32, 1, 64, 64)
    mask = torch.ones(CHUNK_ROWS, 32, dtype=torch.bool)
    with torch.no_grad():
        for pos in (0, CHUNK_ROWS - 1):
            v_chunks = [torch.randn(CHUNK_ROWS, 1, 32, 64, 64) for _ in range(2)]
            s_chunks = [torch.randn(CHUNK_ROWS, 32, 1, 64, 64) for _ in range(2)]
            for v in v_chunks:
                v[pos] = vol[0]
            for s in s_chunks:
                s[pos] = sl[0]
            a, b = (encoder3d(v)[pos] for v in v_chunks)
            assert torch.equal(a, b)
            a, b = (slice_encoder(s, mask)[pos] for s in s_chunks)
            assert torch.equal(a, b)


def test_keys_depend_on_every_input_and_name() -> None:
    torch.manual_seed(1)
    mod, cache = Counting(), FeatureCache(1 << 20)
    x = torch.randn(2, 3)
    a = cache.run("enc", mod, x, torch.ones(2, 3))
    b = cache.run("enc", mod, x, torch.zeros(2, 3))  # same x, other mask: new rows
    assert not torch.equal(a, b) and cache.hits == 0
    cache.run("other", mod, x, torch.ones(2, 3))  # same inputs under another name: new rows
    assert cache.hits == 0 and len(cache) == 6
    assert row_keys(x)[0] != row_keys(x.double())[0]  # dtype is part of the key
    assert row_keys(x)[0] == row_keys(x.clone())[0]


def test_byte_cap_stops_storing_not_computing() -> None:
    torch.manual_seed(2)
    mod = Counting()
    cache = FeatureCache(2 * 6 * 4)  # two rows of [2, 3] float32
    x, m = torch.randn(3, 3), torch.ones(3, 3)
    out = cache.run("enc", mod, x, m)
    assert len(cache) == 2 and cache.bytes == 48
    again = cache.run("enc", mod, x, m)
    torch.testing.assert_close(again, out)
    assert mod.calls == [CHUNK_ROWS, CHUNK_ROWS]  # the third row is recomputed every time


def test_check_cacheable() -> None:
    mod = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0))
    assert "trainable" in check_cacheable(mod)
    mod.requires_grad_(False)
    assert check_cacheable(mod) == ""
    mod[1].p = 0.1
    assert "drops with p=0.1" in check_cacheable(mod)
    mod[1].eval()  # dropout in eval mode is the identity
    assert check_cacheable(mod) == ""

    class DropPath(nn.Module):  # timm's drop path keeps its rate in `drop_prob`
        drop_prob = 0.2

    frozen = nn.Sequential(nn.Linear(3, 3), DropPath()).requires_grad_(False)
    assert "p=0.2" in check_cacheable(frozen)
    bn = nn.Sequential(nn.Conv1d(1, 2, 1), nn.BatchNorm1d(2)).requires_grad_(False)
    assert "batch statistics" in check_cacheable(bn)  # the output of a row would depend on the batch
    bn[1].eval()
    assert check_cacheable(bn) == ""


def test_bad_arguments() -> None:
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="max_bytes"):
            FeatureCache(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share dim 0"):
        FeatureCache(100).run("enc", Counting(), torch.zeros(2, 3), torch.zeros(3, 3))
