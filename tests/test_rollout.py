"""Rollout against a naive reference written here: loops, full matrix products, sorting for the discard."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vitviz.analysis.rollout import (
    cls_attention,
    discard_lowest,
    fuse_heads,
    rollout_all,
    rollout_matrices,
    rollout_row,
    tokens_to_grid,
)
from vitviz.errors import ParameterError

from .helpers import naive_rollout, random_attention

CASES = list(itertools.product(["mean", "max", "min", 1], [0.0, 0.5, 0.9], [(0, 3), (1, 3), (2, 2), (0, 0)]))


@pytest.mark.parametrize("fusion,ratio,layers", CASES)
def test_rollout_row_equals_naive(fusion, ratio, layers):
    attn = random_attention()
    mats = rollout_matrices(attn, head_fusion=fusion, discard_ratio=ratio)
    got = rollout_row(mats, start=layers[0], end=layers[1])
    want = naive_rollout(attn, start=layers[0], end=layers[1], fusion=fusion, ratio=ratio)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    assert abs(got.sum().item() - 1.0) < 1e-10  # a row-stochastic product keeps the row a distribution


@pytest.mark.parametrize("fusion,ratio", [("mean", 0.0), ("max", 0.9), (2, 0.3)])
def test_rollout_all_ranges_in_one_sweep(fusion, ratio):
    attn = random_attention(L=5, T=6, seed=3)
    mats = rollout_matrices(attn, head_fusion=fusion, discard_ratio=ratio)
    table = rollout_all(mats)
    for a in range(5):
        for b in range(5):
            if a > b:
                assert torch.isnan(table[a, b]).all()
            else:
                want = naive_rollout(attn, start=a, end=b, fusion=fusion, ratio=ratio)
                np.testing.assert_allclose(table[a, b].numpy(), want, atol=1e-10)


def test_layer_order_by_hand():
    """Rollout runs from the last layer back to the first: Ã = Â_1 · Â_0, not Â_0 · Â_1.

    Layer 0: CLS attends to token 1; layer 1: CLS attends to token 2 (others attend to themselves). With Â = (A+I)/2
    the CLS after layer 1 is half itself, half token 2; its own half came half from token 1 at layer 0:
    [.25, .25, .5]. The reversed product would give [.25, .5, .25].
    """
    a0 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a1 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mats = rollout_matrices(torch.stack([a0, a1])[:, None].double())  # (L=2, H=1, 3, 3)
    np.testing.assert_allclose(rollout_row(mats, start=0, end=1).numpy(), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(rollout_all(mats)[0, 1].numpy(), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(rollout_row(mats, start=1, end=1).numpy(), [0.5, 0.0, 0.5])


def test_rows_are_normalised_on_the_right_axis():
    """vit-explain issue #16: a / a.sum(-1) without keepdim normalises columns. Rows must sum to 1."""
    attn = random_attention(T=5)
    mats = rollout_matrices(attn, head_fusion="max", discard_ratio=0.3)
    torch.testing.assert_close(mats.sum(-1), torch.ones(4, 5, dtype=torch.float64))
    assert not torch.allclose(mats.sum(-2), torch.ones(4, 5, dtype=torch.float64))


def test_discard_counts_and_never_touches_cls_column():
    T = 6
    a = torch.arange(T * T, dtype=torch.float64).reshape(1, T, T) / 100 + 1  # distinct, CLS column is the lowest
    out = discard_lowest(a, 0.5)
    assert torch.equal(out[0, :, 0], a[0, :, 0])  # column 0 kept although it holds the smallest values
    zeroed = (out == 0).sum().item()
    assert zeroed == int(0.5 * T * (T - 1)) == 15
    # the zeroed ones are exactly the 15 smallest non-CLS entries
    vals = sorted(a[0, i, j].item() for i in range(T) for j in range(1, T))
    kept = out[0, :, 1:]
    assert kept[kept > 0].min().item() == vals[15]
    with pytest.raises(ParameterError, match=r"\[0, 1\)"):
        discard_lowest(a, 1.0)



def naive_discard(m, ratio, keep_column=0):
    """Sort (value, row, column) of the non-CLS entries, zero the first int(ratio*T*(T-1)): ties in row-major order.

    NaN sorts after every number (as numpy sorts it), so it is never among the lowest."""
    m = m.copy()
    T = m.shape[-1]
    keep_column %= T
    cand = sorted((np.isnan(m[i, j]), 0.0 if np.isnan(m[i, j]) else m[i, j], i, j)
                  for i in range(T) for j in range(T) if j != keep_column)
    cand = [(v, i, j) for _nan, v, i, j in cand]
    for _v, i, j in cand[: int(ratio * T * (T - 1))]:
        m[i, j] = 0.0
    return m


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("levels", [3, 1000])
def test_discard_equals_naive_also_with_many_ties(ratio, levels):
    """Values on a few levels (as fp16 captures and max fusion give) tie at the threshold: the first ones go."""
    g = torch.Generator().manual_seed(levels)
    a = torch.randint(1, levels + 1, (3, 9, 9), generator=g).double() / levels  # (M=3, T=9, T)
    # float64 and float32 (selected as integers), negatives (as floats), and half types numpy lacks or sorts slowly
    for x in (a, a.float(), a - 0.5, a.half(), a.bfloat16()):
        got = discard_lowest(x, ratio)
        assert got.dtype == x.dtype
        for m in range(3):
            want = naive_discard(x[m].double().numpy(), ratio)  # the values as stored, compared exactly
            np.testing.assert_array_equal(got[m].double().numpy(), want)


def test_discard_odd_inputs_equal_naive():
    """Transposed (Fortran-order) input, a sign-bit NaN, +inf entries at the threshold, another protected column;
    and a tensor that needs gradients passes through the whole rollout."""
    g = torch.Generator().manual_seed(7)
    base = torch.rand(2, 7, 7, generator=g, dtype=torch.float64)
    nan = base.clone()
    nan[0, 3, 4] = -float("nan")  # what 0/0 gives on x86: the sign bit set
    inf = base.clone()
    inf[1, 1:, 1:] = float("inf")
    cases = [(base.transpose(-1, -2), 0.5, 0), (nan, 0.5, 0), (inf, 0.9, 0), (base, 0.6, 3), (base.float(), 0.3, -1)]
    for x, ratio, keep in cases:
        got = discard_lowest(x, ratio, keep_column=keep)
        for m in range(2):
            want = naive_discard(x[m].double().numpy(), ratio, keep_column=keep)
            np.testing.assert_array_equal(got[m].double().numpy(), want)
    attn = random_attention().requires_grad_(True)
    mats = rollout_matrices(attn, head_fusion="mean", discard_ratio=0.5)
    rollout_row(mats, start=0, end=3).sum().backward()
    assert attn.grad is not None and torch.isfinite(attn.grad).all()

def test_discard_is_per_matrix():
    a = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 100.0)])
    a[0, 1, 1], a[1, 2, 2] = 0.5, 50.0
    out = discard_lowest(a, 1 / 12)  # one entry per matrix
    assert out[0, 1, 1] == 0 and out[1, 2, 2] == 0 and (out == 0).sum() == 2


def test_fusion_and_single_head_and_raw_cls_attention():
    attn = random_attention(L=2, H=3, T=4)
    torch.testing.assert_close(fuse_heads(attn, "mean"), (attn[:, 0] + attn[:, 1] + attn[:, 2]) / 3)
    assert torch.equal(fuse_heads(attn, 2), attn[:, 2])
    raw = cls_attention(attn, head_fusion="max")
    for layer in range(2):
        for j in range(4):
            assert raw[layer, j] == max(attn[layer, h, 0, j] for h in range(3))
    with pytest.raises(ParameterError, match="0 to 2"):
        fuse_heads(attn, 3)
    with pytest.raises(ParameterError, match="mean, max, min"):
        fuse_heads(attn, "median")


def test_layer_range_checks():
    mats = rollout_matrices(random_attention(L=3))
    with pytest.raises(ParameterError, match="reversed"):
        rollout_row(mats, start=2, end=1)
    with pytest.raises(ParameterError, match="0 to 2"):
        rollout_row(mats, start=0, end=3)


@pytest.mark.parametrize("prefix,grid", [(1, (2, 3)), (5, (3, 2)), (2, (1, 4))])
def test_tokens_to_grid_drops_prefix_and_keeps_row_major_order(prefix, grid):
    gh, gw = grid
    values = torch.arange(prefix + gh * gw, dtype=torch.float32)
    g = tokens_to_grid(values, num_prefix_tokens=prefix, grid=grid)
    for r in range(gh):
        for c in range(gw):
            assert g[r, c] == prefix + r * gw + c


@pytest.mark.parametrize("fusion", ["mean", "max", 1])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_rollout_never_writes_to_the_capture(fusion, ratio):
    """The capture is shared (read-only in the app): every fusion and both discard paths leave it untouched."""
    big = random_attention(L=5)
    before = big.clone()
    rollout_matrices(big, head_fusion=fusion, discard_ratio=ratio)
    rollout_matrices(big[1:], head_fusion=fusion, discard_ratio=ratio)  # a view into a larger capture, too
    assert torch.equal(big, before)


def naive_dropped_rollout(attn, drop, *, start, end, ratio, fusion="mean", source=0):
    """Artefact-aware rollout by the book, with loops: per layer fuse, zero the dropped tokens' columns, renormalise
    each row, discard the lowest int(ratio·T·(T-1)) non-CLS entries (ties in row-major order), + I, renormalise,
    and multiply full matrices with the newer layer on the left. ``drop`` is (T,) or (L, T) bools."""
    A = attn.numpy()
    L, H, T, _ = A.shape
    drop = np.broadcast_to(np.asarray(drop), (L, T))
    result = np.eye(T)
    for layer in range(start, end + 1):
        m = A[layer, fusion].copy() if isinstance(fusion, int) else A[layer].mean(axis=0)
        for i in range(T):
            for j in range(T):
                if drop[layer, j]:
                    m[i, j] = 0.0
            m[i] = m[i] / m[i].sum()
        cand = sorted((m[i, j], i, j) for i in range(T) for j in range(T) if j != 0)
        for _v, i, j in cand[: int(ratio * T * (T - 1))]:
            m[i, j] = 0.0
        m = m + np.eye(T)
        for i in range(T):
            m[i] = m[i] / m[i].sum()
        result = m @ result
    return result[source]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("fusion", ["mean", 2])
def test_rollout_with_dropped_tokens_equals_naive(ratio, per_layer, fusion):
    """Leaving tokens out (their columns masked, rows renormalised) before Â = norm(A + I): every range, both mask
    shapes; the dropped tokens get no rollout mass at all and the result is still a distribution."""
    attn = random_attention(L=4, H=3, T=8, seed=5)
    g = np.random.default_rng(1)
    drop = g.random((4, 8)) < 0.3 if per_layer else np.isin(np.arange(8), [2, 5])
    drop[..., 0] = False  # never the CLS token
    drop[..., 7] = True  # one token left out of every layer
    mats = rollout_matrices(attn, head_fusion=fusion, discard_ratio=ratio, drop_tokens=torch.from_numpy(drop))
    table = rollout_all(mats)
    for a in range(4):
        for b in range(a, 4):
            want = naive_dropped_rollout(attn, drop, start=a, end=b, ratio=ratio, fusion=fusion)
            np.testing.assert_allclose(table[a, b].numpy(), want, atol=1e-10)
            np.testing.assert_allclose(rollout_row(mats, start=a, end=b).numpy(), want, atol=1e-10)
            # a token left out of every layer of the range is out of the CLS row's reach (its self-loop only
            # carries what it already has, and the CLS row gives it nothing); one kept in some layer is not
            always = drop[a : b + 1].all(0) if per_layer else drop
            assert always.any()
            assert (table[a, b].numpy()[always] == 0).all()
            if ratio == 0:  # (a discard may zero kept tokens as well)
                assert (table[a, b].numpy()[~always] > 0).all()
            assert abs(table[a, b].sum().item() - 1.0) < 1e-10


def test_dropping_no_tokens_changes_nothing_and_bad_masks_are_refused():
    attn = random_attention(T=6)
    before = attn.clone()
    plain = rollout_matrices(attn, discard_ratio=0.5)
    none = rollout_matrices(attn, discard_ratio=0.5, drop_tokens=torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(none, plain, atol=1e-12, rtol=0)
    rollout_matrices(attn, head_fusion=1, drop_tokens=torch.tensor([False, True, False, False, False, False]))
    assert torch.equal(attn, before)  # the shared capture is never written to
    with pytest.raises(ParameterError, match="CLS"):
        rollout_matrices(attn, drop_tokens=torch.tensor([True] + [False] * 5))
    with pytest.raises(ParameterError, match=r"\(6,\) or \(4, 6\)"):
        rollout_matrices(attn, drop_tokens=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ParameterError, match="bool"):
        rollout_matrices(attn, drop_tokens=torch.zeros(6))
