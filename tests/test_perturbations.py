"""The pixel perturbations and read-outs of the faithfulness curves against references written here: ROAD's linear
system solved densely, a Gaussian blur by loops, read-outs computed by hand on the kept tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitviz.errors import ModelError
from vitviz.metrics.faithfulness import curves, run_kept
from vitviz.metrics.perturb import gaussian_blur, road_fill, road_noise
from vitviz.targets import embed_tokens

from .helpers import layout_image, layout_model

OFFSETS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6, (1, -1): 1 / 12,
           (1, 0): 1 / 6, (1, 1): 1 / 12}


def dense_road(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's system by loops: for each removed pixel i, Σ_n w_n (u_i − v_n) = 0 over its neighbours inside the
    image, v_n known or unknown; one dense solve per channel."""
    H, W = removed.shape
    unknown = [(r, c) for r in range(H) for c in range(W) if removed[r, c]]
    index = {rc: k for k, rc in enumerate(unknown)}
    A = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), img.shape[0]))
    for k, (r, c) in enumerate(unknown):
        for (dr, dc), w in OFFSETS.items():
            rr, cc = r + dr, c + dc
            if not (0 <= rr < H and 0 <= cc < W):
                continue
            A[k, k] += w
            if removed[rr, cc]:
                A[k, index[(rr, cc)]] -= w
            else:
                b[k] += w * img[:, rr, cc]
    out = img.copy()
    sol = np.linalg.solve(A, b)
    for k, (r, c) in enumerate(unknown):
        out[:, r, c] = sol[k]
    return out


def test_road_imputation_solves_its_linear_system():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 12, 14, generator=g, dtype=torch.float64)
    removed = torch.zeros(2, 1, 12, 14, dtype=torch.bool)
    removed[0, 0, 2:9, 3:10] = True  # a hole
    removed[1, 0, :, :5] = True  # a band at the border
    removed[1, 0, 10:, 10:] = True
    got = road_fill(x, removed, steps=2000, tol=1e-12)
    for b in range(2):
        want = dense_road(x[0].numpy(), removed[b, 0].numpy())
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-6, atol=1e-6)
    noise = road_noise(x, seed=3)
    noisy = road_fill(x, removed, noise=noise, steps=2000, tol=1e-12)
    torch.testing.assert_close((noisy - got)[removed.expand_as(got)], noise.expand_as(got)[removed.expand_as(got)])
    torch.testing.assert_close(noisy[~removed.expand_as(got)], got[~removed.expand_as(got)])  # kept pixels kept


def test_the_default_road_fill_is_close_to_the_exact_solution_of_patch_aligned_holes():
    """The defaults stop early (a relative residual of 1e-4 or 100 iterations from the patch-level solution):
    within 3% of the image's range of the exact fill on smooth images, with 20% to 90% of the patches removed."""
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64), size=96, mode="bilinear")
    for frac in (0.2, 0.5, 0.9):
        removed = (torch.rand(3, 1, 12, 12, generator=g) < frac).repeat_interleave(8, 2).repeat_interleave(8, 3)
        fast = road_fill(x.float(), removed, patch=8).double()
        exact = road_fill(x, removed, steps=5000, tol=1e-10)
        assert (fast - exact).abs().max() < 0.03 * float(x.max() - x.min()), frac


def road_residual(filled: np.ndarray, removed: np.ndarray) -> float:
    """ROAD's relative residual |A u − b| / |b| of a filled image (C, H, W), by shifted copies: for each removed pixel,
    Σ_n w_n (u_i − v_n) over its neighbours inside the image, against b_i = Σ_{n kept} w_n x_n."""
    H, W = removed.shape
    pad = np.pad(filled, ((0, 0), (1, 1), (1, 1)))
    inside = np.pad(np.ones((H, W)), 1)
    kept = np.pad(~removed, 1).astype(float)
    res, rhs = np.zeros_like(filled), np.zeros_like(filled)
    for (dr, dc), w in OFFSETS.items():
        nb = pad[:, 1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W]
        res += w * inside[1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W] * (filled - nb)
        rhs += w * kept[1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W] * nb
    return float(np.linalg.norm(res * removed) / np.linalg.norm(rhs * removed))


def patch_holes(g: torch.Generator, n: int, shape: tuple[int, int], patch: int, frac: float) -> torch.Tensor:
    """n masks of whole removed patches (the last row and column of patches cut by the border where it does)."""
    gh, gw = (-(-s // patch) for s in shape)
    coarse = torch.rand(n, 1, gh, gw, generator=g) < frac
    return coarse.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., : shape[0], : shape[1]]


@pytest.mark.parametrize(("patch", "shape"), [(14, (56, 42)), (16, (48, 64)), (14, (47, 33)), (16, (37, 50))])
def test_the_cascade_stops_at_the_residual_of_the_pixel_system(patch, shape):
    """From the block-mean cascade (14 -> 7 -> 2 -> 1, 16 -> 8 -> 4 -> 2 -> 1), the default fill of patch-aligned holes
    meets the pixel system's stopping rule (relative residual 1e-4, measured here independently) and is as close to
    the exact fill as the default stop allows, also on shapes the patches do not divide."""
    g = torch.Generator().manual_seed(patch + shape[0])
    x = F.interpolate(torch.randn(1, 3, 5, 5, generator=g, dtype=torch.float64), size=shape, mode="bilinear")
    x = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # texture the coarse levels cannot see
    removed = patch_holes(g, 3, shape, patch, 0.6)
    fast = road_fill(x.float(), removed, patch=patch).double()
    exact = road_fill(x, removed, steps=5000, tol=1e-10)
    for b in range(3):
        assert road_residual(fast[b].numpy(), removed[b, 0].numpy()) <= 1.5e-4
        assert road_residual(exact[b].numpy(), removed[b, 0].numpy()) <= 1e-9
    assert (fast - exact).abs().max() < 0.03 * float(x.max() - x.min())
    torch.testing.assert_close(fast[~removed.expand_as(fast)], x.expand_as(fast)[~removed.expand_as(fast)],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("patch", [None, 1, 5, 16, 12])
def test_a_start_from_blocks_that_cut_the_holes_still_solves_the_same_system(patch):
    """Holes aligned to patches of 14 filled with another ``patch``: blocks are then partly removed (a level's
    blocks are no longer wholly removed or kept), or no level is used; only the start changes, so the same system
    is solved to the same residual."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 42, 56, generator=g, dtype=torch.float64)
    removed = patch_holes(g, 2, (42, 56), 14, 0.5)
    exact = road_fill(x, removed, steps=5000, tol=1e-10)
    got = road_fill(x, removed, patch=patch, steps=5000, tol=1e-10)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-7)
    fast = road_fill(x, removed, patch=patch)
    for b in range(2):
        assert road_residual(fast[b].numpy(), removed[b, 0].numpy()) <= 1e-4 * (1 + 1e-6)


def test_a_batch_of_holes_is_filled_as_each_alone():
    """Each image stops at its own residual: a batch solved at once (the path off the CPU) equals each image alone."""
    from vitviz.metrics.perturb import _fill_holes

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 42, 56, generator=g, dtype=torch.float64)
    m = torch.zeros(2, 1, 42, 56, dtype=torch.float64)
    m[0, :, 14:28, 14:28] = 1  # one patch: solved in a few iterations
    m[1, :, :, :42] = 1  # three quarters of the image: many more
    known = x * (1 - m)
    together = _fill_holes(known, m, 14, steps=100, tol=1e-4)
    alone = torch.cat([_fill_holes(known[b : b + 1], m[b : b + 1], 14, steps=100, tol=1e-4) for b in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_the_gaussian_blur_is_the_reflected_convolution_by_loops():
    x = torch.randn(1, 2, 9, 11, dtype=torch.float64)
    sigma = 1.5
    radius = math.ceil(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    a = x[0].numpy()

    def at(c, r, q):  # numpy's 'reflect' = torch's reflect (edge not repeated)
        r = -r if r < 0 else (2 * (a.shape[1] - 1) - r if r >= a.shape[1] else r)
        q = -q if q < 0 else (2 * (a.shape[2] - 1) - q if q >= a.shape[2] else q)
        return a[c, r, q]

    want = np.zeros_like(a)
    for c in range(2):
        for r in range(9):
            for q in range(11):
                want[c, r, q] = sum(k[i] * k[j] * at(c, r + i - radius, q + j - radius)
                                    for i in range(2 * radius + 1) for j in range(2 * radius + 1))
    np.testing.assert_allclose(gaussian_blur(x, sigma)[0].numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("perturbation", ["pixels", "blur", "road"])
def test_pixel_perturbations_start_at_the_full_image_and_a_constant_map_scores_zero(perturbation):
    model = layout_model("cls")
    x = layout_image(model)
    c, flat = curves(model, x, [np.arange(16.0).reshape(4, 4), np.ones((4, 4))], target="embedding",
                     perturbation=perturbation, readout="mean")
    assert c.morf[0] == pytest.approx(1.0, abs=1e-5) and c.lerf[0] == pytest.approx(1.0, abs=1e-5)
    assert flat.score == 0.0 and not np.allclose(c.morf, c.lerf)
    assert c.measure.startswith("by ") and c.readout == "mean" and c.score_kind == "cosine"


def test_readouts_are_computed_from_the_kept_tokens():
    """Token removal, MoRF step 3 of a known order: each read-out by hand from the model on the kept patches."""
    model = layout_model("registers", num_classes=5)
    x = layout_image(model)
    heat = np.random.default_rng(0).random((4, 4))
    order = np.argsort(-heat.reshape(-1), kind="stable")
    got = {r: curves(model, x, [heat], target="class:2", readout=r)[0] for r in ("cls", "mean", "probability",
                                                                               "logit", "target")}
    with torch.no_grad():
        tokens = embed_tokens(model, x)
        full = run_kept(model, tokens, torch.arange(16)[None])
        k = got["cls"].removed[3]
        out = run_kept(model, tokens, torch.from_numpy(np.sort(order[k:]))[None])
    p = model.num_prefix_tokens
    assert got["cls"].morf[3] == pytest.approx(float(F.cosine_similarity(out.embedding, full.embedding)), abs=1e-6)
    mean = F.cosine_similarity(out.tokens[:, p:].mean(1), full.tokens[:, p:].mean(1))
    assert got["mean"].morf[3] == pytest.approx(float(mean), abs=1e-6)
    assert got["logit"].morf[3] == pytest.approx(float(out.logits[0, 2]), abs=1e-5)
    assert got["probability"].morf[3] == pytest.approx(float(out.logits.softmax(-1)[0, 2]), abs=1e-6)
    np.testing.assert_array_equal(got["target"].morf, got["probability"].morf)  # a class target reads its class
    assert got["mean"].measure == "by token removal, mean patch token"


def test_class_readouts_need_a_head():
    model = layout_model("cls")
    with pytest.raises(ModelError, match="classifier head"):
        curves(model, layout_image(model), [np.ones((4, 4))], readout="probability")


@pytest.mark.parametrize("perturbation", ["tokens", "road"])
def test_several_readouts_from_one_set_of_passes_equal_each_alone(perturbation):
    from vitviz.metrics.faithfulness import curves_by_readout

    model = layout_model("cls", num_classes=3)
    x = layout_image(model)
    maps = [np.random.default_rng(s).random((4, 4)) for s in range(2)]
    readouts = ("target", "cls", "mean", "logit")
    together = curves_by_readout(model, x, maps, target="embedding", perturbation=perturbation, readouts=readouts)
    for r in readouts:
        alone = curves(model, x, maps, target="embedding", perturbation=perturbation, readout=r)
        for a, b in zip(together[r], alone, strict=True):
            np.testing.assert_array_equal(a.morf, b.morf)
            np.testing.assert_array_equal(a.lerf, b.lerf)
