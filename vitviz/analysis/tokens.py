"""Inside the tokens: norms, outliers, attention sinks, patch-feature PCA and feature similarity.

Pure functions on the arrays one capture yields (``attention_forward(..., tokens=True)``): ``tokens`` (L, T, D),
every block's output with the prefix tokens (CLS, registers, distillation token) first, and ``attention``
(L, H, T, T). Numpy arrays or torch tensors go in, numpy arrays come out. T = P + N: P prefix tokens
(``model.num_prefix_tokens``), then the N patches in row-major grid order. Statistics over "the tokens" are over
the patches only: prefix tokens are different by design (the CLS token sums up the image, registers exist to hold
global state), so they are reported apart, never mixed into a patch threshold.

Background: some patch tokens of large ViTs turn into high-norm artefacts that collect attention and carry global
information (Darcet et al., "Vision Transformers Need Registers", 2023); DINOv2 users look at the first principal
components of the patch features (Oquab et al., 2023, Fig. 1) and at cosine similarity between patches
(Amir et al., "Deep ViT Features as Dense Visual Descriptors", 2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import ParameterError

__all__ = [
    "split_prefix",
    "token_norms",
    "find_outliers",
    "received_attention",
    "top_receivers",
    "artefact_tokens",
    "PatchPCA",
    "fit_pca",
    "pca_scores",
    "pca_rgb",
    "foreground_mask",
    "cosine_similarity",
    "best_matches",
]

Scaling = Literal["std", "minmax"]

Z_CUT = 3.5  # Iglewicz & Hoaglin's cut for the modified (median/MAD) z-score
MIN_GAP = 2.5  # robust standard deviations of empty log-norm range between the outliers and the rest
MAX_FRACTION = 0.1  # artefacts are a few percent of the patches; the gap is looked for in the top 10% only
SPREAD_FLOOR = 0.01  # log units (1% of the norm): a near-constant layer needs a real difference, not rounding noise


def _np(x, dtype=None) -> np.ndarray:
    """A numpy view or copy of an array or tensor; half floats become float32 (numpy's fp16 maths is slow)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if dtype is not None:
        return a.astype(dtype, copy=False)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _check_prefix(num_prefix_tokens: int, num_tokens: int) -> None:
    if not 0 <= num_prefix_tokens < num_tokens:
        raise ParameterError(f"{num_prefix_tokens} prefix tokens do not fit {num_tokens} tokens")


def split_prefix(values, *, num_prefix_tokens: int, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(prefix, patches) of ``values`` along the token ``axis``: (..., T, ...) -> (..., P, ...), (..., N, ...)."""
    a = _np(values)
    _check_prefix(num_prefix_tokens, a.shape[axis])
    prefix, patches = np.split(a, [num_prefix_tokens], axis=axis)
    return prefix, patches


def token_norms(tokens) -> np.ndarray:
    """L2 norm of every token, ‖x_t‖₂ = sqrt(Σ_d x_td²): (..., T, D) -> (..., T), float32 (accumulated in float64)."""
    a = _np(tokens, np.float64)
    return np.sqrt(np.einsum("...d,...d->...", a, a)).astype(np.float32)


def find_outliers(
        values,
        *,
        num_prefix_tokens: int = 0,
        z_cut: float = Z_CUT,
        min_gap: float = MIN_GAP,
        max_fraction: float = MAX_FRACTION,
) -> np.ndarray:
    """High outliers among the patch tokens of each row: (..., T) positive values (norms, received attention) -> bool.

    The rule, per row (per model, image and layer; no fixed norm such as the paper's 150, which fits one model):
    on the log-values u of the N patches, with median m and robust spread s = max(1.4826 · median|u - m|, 0.01)
    (1.4826 · MAD estimates the standard deviation of a normal sample), sort u in decreasing order u₍₁₎ ≥ u₍₂₎ ≥ …
    and find the widest gap g = (u₍ₖ₎ - u₍ₖ₊₁₎) / s among the top ``max_fraction`` of the patches (k ≤ 10% of N).
    The k patches above it are outliers if the gap is at least ``min_gap`` (2.5) robust standard deviations wide
    AND the lowest of them lies at least ``z_cut`` (3.5) above the median, (u₍ₖ₎ - m) / s ≥ 3.5. A long tail of a
    single population has no wide empty gap; artefacts, an order of magnitude above the rest, do. Logs make the
    rule scale-free: multiplying every value by a constant changes nothing. Prefix tokens are never flagged.
    """
    if not (0 < max_fraction <= 0.5 and min_gap >= 0 and z_cut >= 0):
        raise ParameterError(f"the outlier rule needs 0 < max_fraction <= 0.5 (got {max_fraction}), min_gap >= 0 "
                             f"(got {min_gap}) and z_cut >= 0 (got {z_cut})")
    a = _np(values, np.float64)
    _check_prefix(num_prefix_tokens, a.shape[-1])
    n = a.shape[-1] - num_prefix_tokens
    rows = np.log(np.maximum(a[..., num_prefix_tokens:], np.finfo(np.float64).tiny)).reshape(-1, n)  # (R, N)
    out = np.zeros(a.shape, dtype=bool)
    flat = out.reshape(-1, a.shape[-1])[:, num_prefix_tokens:]  # a view: rows of patch flags
    k_max = min(int(max_fraction * n), n - 1)
    for r, u in enumerate(rows):
        if k_max < 1:
            break
        m = np.median(u)
        s = max(1.4826 * np.median(np.abs(u - m)), SPREAD_FLOOR)
        order = np.argsort(-u, kind="stable")
        top = u[order[: k_max + 1]]  # the k_max + 1 largest, decreasing
        gaps = (top[:-1] - top[1:]) / s  # gaps[k-1]: between the k-th and (k+1)-th largest
        k = int(np.argmax(gaps)) + 1
        if gaps[k - 1] >= min_gap and (top[k - 1] - m) / s >= z_cut:
            flat[r, order[:k]] = True
    return out


def received_attention(attention) -> np.ndarray:
    """How much attention each token receives: the mean over heads h and queries i of A[h, i, j].

    (..., H, T, T) -> (..., T), float32. Rows of A sum to 1, so the values average 1/T; an attention sink gets
    far more. Every query counts, prefix tokens included (CLS and registers look at the patches too).
    """
    a = attention if isinstance(attention, torch.Tensor) else torch.from_numpy(np.asarray(attention))
    *lead, heads, T, _ = a.shape
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.inference_mode():
        flat = a.detach().reshape(-1, heads * T, T)  # (M, H·T, T): every (head, query) row of each matrix
        ones = torch.ones(1, heads * T, dtype=dtype, device=a.device)
        out = torch.empty(flat.shape[0], T, dtype=dtype, device=a.device)
        # a half capture goes through one reused fp32 scratch per matrix: a reduction straight from fp16 is 4x
        # slower than the copy plus a matrix-vector product, and a full fp32 copy would double the memory
        scratch = None if a.dtype == dtype else torch.empty(heads * T, T, dtype=dtype, device=a.device)
        for m in range(flat.shape[0]):
            src = flat[m] if scratch is None else scratch.copy_(flat[m])
            torch.mm(ones, src, out=out[m : m + 1])  # column sums: Σ over heads and queries
        return out.div_(heads * T).reshape(*lead, T).to(torch.float32).cpu().numpy()


def top_receivers(received, *, k: int = 5, num_prefix_tokens: int = 0,
                  patches_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` tokens receiving the most attention per row: (..., T) -> (indices, values), each (..., k).

    Indices are token indices (prefix first, patch p is token P + p), in decreasing order (ties: lower index
    first); ``patches_only`` leaves the prefix tokens out of the ranking.
    """
    a = _np(received, np.float64)
    _check_prefix(num_prefix_tokens, a.shape[-1])
    skip = num_prefix_tokens if patches_only else 0
    if not 1 <= k <= a.shape[-1] - skip:
        raise ParameterError(f"k must be in 1 to {a.shape[-1] - skip}, got {k}")
    idx = np.argsort(-a[..., skip:], axis=-1, kind="stable")[..., :k] + skip
    return idx, np.take_along_axis(a, idx, axis=-1).astype(np.float32)


def artefact_tokens(
        norms,
        received=None,
        *,
        num_prefix_tokens: int,
        z_cut: float = Z_CUT,
        min_gap: float = MIN_GAP,
        max_fraction: float = MAX_FRACTION,
) -> np.ndarray:
    """Patch tokens that are artefacts in any layer: (L, T) norms [, (L, T) received attention] -> (T,) bool.

    A patch is an artefact if :func:`find_outliers` (with these settings) flags its norm in some layer, or (when
    ``received`` is given) the attention it receives in some layer: an attention sink. The result is the
    ``drop_tokens`` mask of the artefact-aware rollout (:func:`vitviz.rollout.rollout_matrices`); prefix tokens
    are never in it.
    """
    rule = dict(num_prefix_tokens=num_prefix_tokens, z_cut=z_cut, min_gap=min_gap, max_fraction=max_fraction)
    flags = find_outliers(norms, **rule).any(axis=0)
    if received is not None:
        flags |= find_outliers(received, **rule).any(axis=0)
    return flags


# ------------------------------------------------------------------------------------------------------------ PCA


@dataclass(frozen=True)
class PatchPCA:
    """The first principal components of a set of patch tokens, and how their scores map to colours.

    ``mean`` (D,), ``components`` (K, D) orthonormal rows (the sign of each chosen so that its largest-magnitude
    loading is positive: a principal direction has no sign of its own, this one is reproducible), ``variance``
    (K,) of the scores over the fitted patches (divided by N - 1), ``explained`` (K,) their share of the total
    variance, and ``low``/``high`` (K,) the scores that map to 0 and 1.
    """

    mean: np.ndarray
    components: np.ndarray
    variance: np.ndarray
    explained: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _stack(patches, exclude) -> np.ndarray:
    """One (N, D) float64 array of the patches to fit on, from one (N, D) array or a sequence of them."""
    many = isinstance(patches, Sequence) and not isinstance(patches, np.ndarray)
    parts = [_np(p, np.float64) for p in (patches if many else [patches])]
    if exclude is not None:
        masks = [_np(e, bool) for e in (exclude if many else [exclude])]
        if len(masks) != len(parts) or any(m.shape != (p.shape[:1]) for m, p in zip(masks, parts, strict=True)):
            raise ParameterError("exclude must hold one bool per patch (one mask per image)")
        parts = [p[~m] for p, m in zip(parts, masks, strict=True)]
    if any(p.ndim != 2 for p in parts) or len({p.shape[1] for p in parts}) != 1:
        raise ParameterError("patch tokens must be (N, D) arrays of one width D")
    return np.concatenate(parts)


def _top_eigenpairs(m: np.ndarray, k: int, *, tol: float = 1e-10, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (decreasing) and eigenvectors (columns) of a symmetric PSD matrix (M, M).

    Subspace iteration on m² (each step squares the convergence ratio λ_{b+1}/λ_k) with Rayleigh-Ritz on a block
    of b = k + 12 vectors (a fixed seed, so reproducible), stopped when every residual ‖m·u - λu‖ is below
    ``tol``·λ₁; a full ``eigh`` when M is small or the block does not converge. A full eigendecomposition costs
    O(M³) with a large constant for 3 vectors out of hundreds; on real patch features the block converges in
    3 to 15 steps.
    """
    size = m.shape[0]
    b = k + 12
    if 3 * b >= size:
        lam, vec = np.linalg.eigh(m)
        return lam[::-1][:k], vec[:, ::-1][:, :k]
    m2 = m @ m
    v = np.linalg.qr(np.random.default_rng(0).standard_normal((size, b)))[0]  # (M, b)
    for it in range(max_iter):
        v = np.linalg.qr(m2 @ v)[0]
        if it % 2 == 1:
            lam, s = np.linalg.eigh(v.T @ m @ v)  # (b,), (b, b): Rayleigh-Ritz on the block
            v = v @ s[:, ::-1]
            lam = lam[::-1]
            res = np.linalg.norm(m @ v[:, :k] - v[:, :k] * lam[:k], axis=0)
            if res.max() <= tol * max(lam[0], np.finfo(np.float64).tiny):
                return lam[:k], v[:, :k]
    lam, vec = np.linalg.eigh(m)
    return lam[::-1][:k], vec[:, ::-1][:, :k]


def fit_pca(patches, *, num_components: int = 3, exclude=None, scaling: Scaling = "std",
            num_std: float = 2.0) -> PatchPCA:
    """Principal components of patch tokens: (N, D), or a sequence of (N_i, D) fitted together as one set.

    With several images the basis is fit on the concatenated patches, so one colour means one direction of the
    feature space in every image (DINOv2, Fig. 1). ``exclude`` (bool (N,) per image) leaves patches out of the fit
    (artefact tokens would otherwise own a component); they are still coloured by :func:`pca_rgb`.
    Components are the top eigenvectors of the covariance Σ = X̃ᵀX̃ / (N - 1) of the centred patches X̃ (or of the
    Gram matrix X̃X̃ᵀ when N < D: the same directions at a smaller size). Scaling per component c: ``"std"`` maps
    scores -k·σ_c .. +k·σ_c (k = ``num_std``, 2) to 0 .. 1 and clips beyond, so a few extreme patches cannot
    squeeze the others into one colour; ``"minmax"`` maps the fitted patches' minimum and maximum to 0 and 1.
    """
    x = _stack(patches, exclude)
    n, d = x.shape
    if not 1 <= num_components <= min(n - 1, d):
        raise ParameterError(f"{num_components} components need more than {num_components} patches of width "
                             f"at least {num_components} (got {n} x {d})")
    if scaling not in ("std", "minmax"):
        raise ParameterError(f"unknown scaling {scaling!r}: choose std or minmax")
    mean = x.mean(axis=0)
    xc = x - mean  # (N, D)
    if n >= d:
        lam, vec = _top_eigenpairs(xc.T @ xc, num_components)  # (K,), (D, K)
        comps = vec.T  # (K, D)
    else:
        lam, vec = _top_eigenpairs(xc @ xc.T, num_components)  # (K,), (N, K): X̃ᵀu / ‖X̃ᵀu‖, same directions
        comps = (xc.T @ vec).T
        comps /= np.maximum(np.linalg.norm(comps, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    lam = np.maximum(lam, 0.0)
    lead = np.abs(comps).argmax(axis=1)
    comps *= np.sign(comps[np.arange(num_components), lead])[:, None]  # largest loading positive
    variance = lam / (n - 1)
    total = np.einsum("nd,nd->", xc, xc) / (n - 1)
    scores = xc @ comps.T  # (N, K)
    if scaling == "std":
        high = num_std * np.sqrt(variance)
        low = -high
    else:
        low, high = scores.min(axis=0), scores.max(axis=0)
    return PatchPCA(mean=mean, components=comps, variance=variance,
                    explained=variance / total if total > 0 else np.zeros_like(variance), low=low, high=high)


def pca_scores(pca: PatchPCA, patches) -> np.ndarray:
    """Scores (x - mean) · components ᵀ of patch tokens: (..., N, D) -> (..., N, K), float32."""
    return ((_np(patches, np.float64) - pca.mean) @ pca.components.T).astype(np.float32)


def pca_rgb(pca: PatchPCA, patches) -> np.ndarray:
    """Patch tokens as colours: (..., N, D) -> (..., N, K) in [0, 1], component c scaled by ``pca.low/high[c]``.

    With K = 3 the channels are red, green, blue; reshape (N, 3) to (gh, gw, 3) for the picture.
    """
    s = (pca_scores(pca, patches) - pca.low) / np.maximum(pca.high - pca.low, np.finfo(np.float64).tiny)
    return np.clip(s, 0.0, 1.0).astype(np.float32)


def _border(grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    edge = np.zeros((gh, gw), dtype=bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return edge.reshape(-1)


def foreground_mask(patches, *, grid: tuple[int, int], threshold: float = 0.0, exclude=None) -> np.ndarray:
    """DINOv2's foreground: patches scoring above ``threshold`` on the image's own first principal component.

    (N, D) patch tokens of one image (row-major over ``grid``) -> (N,) bool. DINOv2 (Oquab et al. 2023, Fig. 9)
    removes the background as "patches with a negative score of the first PCA component" of the (final, normed)
    patch features; the threshold 0 is the mean of the scores, since they are centred. A principal direction's
    sign is arbitrary, and which side is the background is not fixed by the model (dinov2 issue #292): here the
    component is oriented so that the patches on the grid's border score below the threshold on average, since
    the background usually reaches the image's edge. ``exclude`` leaves patches (artefacts) out of the fit.
    """
    x = _np(patches, np.float64)
    if x.ndim != 2 or x.shape[0] != grid[0] * grid[1]:
        raise ParameterError(f"expected ({grid[0] * grid[1]}, D) patch tokens for a {grid[0]}x{grid[1]} grid, "
                             f"got {tuple(x.shape)}")
    pca = fit_pca(x, num_components=1, exclude=exclude)
    score = pca_scores(pca, x)[:, 0].astype(np.float64)
    if score[_border(grid)].mean() > threshold:
        score = -score
    return score > threshold


# ----------------------------------------------------------------------------------------------------- similarity


def cosine_similarity(a, b) -> np.ndarray:
    """Pairwise cosine similarity a_i·b_j / (‖a_i‖ ‖b_j‖): (..., M, D), (..., N, D) -> (..., M, N), float32.

    A zero vector has similarity 0 to everything (its direction is undefined).
    """
    x, y = _np(a, np.float64), _np(b, np.float64)
    if x.shape[-1] != y.shape[-1]:
        raise ParameterError(f"feature widths differ: {x.shape[-1]} and {y.shape[-1]}")
    tiny = np.finfo(np.float64).tiny
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), tiny)
    y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), tiny)
    return (x @ np.swapaxes(y, -1, -2)).astype(np.float32)


def best_matches(a, b, *, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """For every row of ``a``, the ``k`` rows of ``b`` most similar by cosine: (..., M, D), (..., N, D) ->
    (indices, similarities), each (..., M, k), best first (ties: lower index first).

    Correspondence between two images: ``a`` the patches (or one clicked patch, (1, D)) of the first, ``b`` those
    of the second, both from the same layer.
    """
    sim = cosine_similarity(a, b)
    if not 1 <= k <= sim.shape[-1]:
        raise ParameterError(f"k must be in 1 to {sim.shape[-1]}, got {k}")
    # argmax returns the first of equal maxima: the stable sort's order, without sorting every row
    idx = sim.argmax(axis=-1)[..., None] if k == 1 else np.argsort(-sim, axis=-1, kind="stable")[..., :k]
    return idx, np.take_along_axis(sim, idx, axis=-1)
