"""How a removed patch's pixels are filled in the pixel perturbations of the faithfulness curves.

All work on the normalised input tensor the model reads (B, 3, H, W) and a boolean mask of removed pixels (B, 1, H, W):

- ``pixels``: the image's per-channel mean (Chefer et al. 2021's protocol);
- ``blur``: the image blurred by a Gaussian of σ = ``BLUR_SIGMA_PX`` pixels (the shape of the object stays, its detail
  goes: a milder removal that tells a map that marks edges from one that marks objects);
- ``road``: noisy linear imputation (ROAD, Rong et al., ICML 2022): each removed pixel is the weighted mean of its 8
  neighbours (1/6 for the 4 direct ones, 1/12 for the diagonals, renormalised at the border), a linear system over
  all removed pixels at once, solved here by conjugate gradients, then Gaussian noise of std ``ROAD_NOISE`` added.
  It fills holes smoothly from their borders, so the removal itself leaks little about the shape of the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BLUR_SIGMA_PX", "ROAD_NOISE", "mean_fill", "blur_fill", "road_fill", "road_noise", "gaussian_blur"]

BLUR_SIGMA_PX = 10.0
ROAD_NOISE = 0.01  # absolute, in the normalised input space, as ROAD's own code
_CG_STEPS = 100  # conjugate-gradient iterations at most, from the cascade's start (tests/test_perturbations.py)
_CG_TOL = 1e-4  # relative residual at which a system counts as solved
_COARSE_TOL = 1e-3  # the same on block means: only a start, a tighter one costs more than it saves


def mean_fill(x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``x`` (1, 3, H, W) with the ``removed`` pixels (B, 1, H, W) set to its per-channel mean: (B, 3, H, W)."""
    return torch.where(removed, x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1), x)


def gaussian_blur(x: torch.Tensor, sigma: float = BLUR_SIGMA_PX) -> torch.Tensor:
    """A separable Gaussian blur of (B, C, H, W), the kernel cut at 3σ, the border reflected."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def blur_fill(x: torch.Tensor, removed: torch.Tensor, blurred: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with the ``removed`` pixels taken from its blurred copy (computed once per image where given)."""
    return torch.where(removed, gaussian_blur(x) if blurred is None else blurred, x)


def _inner(q: torch.Tensor) -> torch.Tensor:
    return q[..., 1:-1, 1:-1]


def _ring_sum(q: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Each inner pixel's 3x3 neighbourhood in the zero-bordered ``q`` (..., H+2, W+2) weighted [1 2 1]ᵀ[1 2 1] (12×
    the 8-neighbour sum plus 4× the centre) into ``out``, the same shape, by way of ``v``. Two 1-D passes of two
    tensor ops each over the flat storage, where a shift by a row is a contiguous slice (the stencil is memory-bound
    on the CPU: this reads memory fewer times than eight shifted 2-D slices or a grouped 3x3 convolution). Border
    entries come out finite but meaningless; the operator's weights are zero there. ``v``'s and ``out``'s ends are
    never written."""
    n, w = q.numel(), q.shape[-1]
    f, v, o = q.view(-1), v.view(-1), out.view(-1)
    torch.add(f[: n - 2 * w], f[2 * w :], out=v[w : n - w])
    v[w : n - w].add_(f[w : n - w], alpha=2)
    torch.add(v[: n - 2], v[2:], out=o[1 : n - 1])
    o[1 : n - 1].add_(v[1 : n - 1], alpha=2)
    return out


def _neighbours(v: torch.Tensor) -> torch.Tensor:
    """Σ_n w_n v_n over each pixel's 8 neighbours inside the image (zero padding: outside counts nothing)."""
    q = F.pad(v, (1, 1, 1, 1))
    return (_inner(_ring_sum(q, torch.zeros_like(q), torch.zeros_like(q))) - 4 * v) / 12


def road_noise(x: torch.Tensor, *, seed: int = 0, noise: float = ROAD_NOISE) -> torch.Tensor:
    """One field of Gaussian noise (1, 3, H, W) of std ``noise`` for an image: the same removed pixel gets the same
    draw in every perturbed copy, so equal masks give equal inputs (a constant map's two orders agree)."""
    gen = torch.Generator().manual_seed(seed)
    return (noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.device)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b per image (B, 1, 1, 1): one BLAS dot for one image, a product and a sum for a batch (faster there than
    a batched matmul, vecdot or einsum on the CPU)."""
    if a.shape[0] == 1:
        return torch.dot(a.view(-1), b.view(-1)).view(1, 1, 1, 1)
    return (a * b).view(a.shape[0], -1).sum(dim=1).view(-1, 1, 1, 1)


def _cg(u: torch.Tensor, rhs: torch.Tensor, c: torch.Tensor, m12: torch.Tensor, *, steps: int, tol: float):
    """Conjugate gradients on A u = rhs for each image of the batch at once, with A u = c·u − m12·ring_sum(u) (SPD on
    the holes). Every vector is zero-bordered (B, C, H+2, W+2), ``c`` and ``m12`` too (B, 1, H+2, W+2), so the
    stencil reads it without padding and the vector operations run on contiguous memory, in place. Each image stops
    at its own relative residual ``tol`` (a solved image's step is zero): a batch gives what its images give alone."""
    ap, v, ring = torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(u)

    def apply(q: torch.Tensor) -> None:  # ap = A q
        _ring_sum(q, v, ring)
        torch.mul(q, c, out=ap)
        ap.addcmul_(ring, m12, value=-1)

    apply(u)
    r = rhs - ap
    p, rr = r.clone(), _dot(r, r)
    stop = tol**2 * _dot(rhs, rhs).clamp(min=1e-30)
    for _ in range(steps):
        active = rr > stop
        if not bool(active.any()):
            break
        apply(p)
        alpha = torch.where(active, rr / _dot(p, ap).clamp(min=1e-30), 0.0)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        rr_new = _dot(r, r)
        torch.addcmul(r, torch.where(active, rr_new / rr.clamp(min=1e-30), 0.0), p, out=p)  # p = r + β p
        rr = rr_new
    return u


def _solve(known: torch.Tensor, m: torch.Tensor, u0: torch.Tensor, *, steps: int, tol: float) -> torch.Tensor:
    """The removed values of ROAD's system (module docstring) from the start ``u0``; ``m`` (B, 1, H, W) 1 where
    removed. A u = m·(d·u − Σ_n w_n u_n) = m·(d + 1/3)·u − m/12·ring_sum(u) for u zero outside the holes."""
    degree = _neighbours(torch.ones_like(m[:1]))
    rhs = F.pad(_neighbours(known) * m, (1, 1, 1, 1))
    c, m12 = (F.pad(w * m, (1, 1, 1, 1)) for w in (degree + 1 / 3, 1 / 12))
    u = _cg(F.pad(u0 * m, (1, 1, 1, 1)), rhs, c, m12, steps=steps, tol=tol)
    return _inner(u)


def _levels(patch: int) -> list[int]:
    """Block sizes from the patch down to 1, each the largest divisor of the patch at most half the previous one
    (14, 7, 2, 1; 16, 8, 4, 2, 1): blocks of patch-aligned holes are then either wholly removed or wholly kept."""
    sizes = [patch]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if patch % d == 0))
    return sizes


def _block_means(known: torch.Tensor, m: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept pixels' mean in each b×b block (the last ones cut by the border) and the blocks with none kept."""
    H, W = m.shape[-2:]
    pad = (0, -W % b, 0, -H % b)
    kept = F.avg_pool2d(F.pad(1 - m, pad), b)
    holes = (kept <= 0).to(m.dtype)
    return F.avg_pool2d(F.pad(known, pad), b) / kept.clamp(min=1e-12) * (1 - holes), holes


def _upsample(v: torch.Tensor, factor: float, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear from blocks of one size to blocks ``factor`` times smaller, block centres aligned, cut to ``size``."""
    up = F.interpolate(v, scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    short = (0, max(0, size[1] - up.shape[-1]), 0, max(0, size[0] - up.shape[-2]))
    return F.pad(up, short, mode="replicate")[..., : size[0], : size[1]]


def _cascade_start(known: torch.Tensor, m: torch.Tensor, patch: int) -> torch.Tensor:
    """A start for the pixel system from the same system on block means, coarse to fine (a full-multigrid cascade):
    the holes' inner values arrive at once instead of diffusing in from their borders pixel by pixel, and each
    level starts from the coarser one, so it needs few iterations at 1/b² of a pixel iteration's cost."""
    sizes = _levels(patch)
    means, holes = _block_means(known, m, sizes[0])
    filled = _kept_mean(means, holes).expand_as(means)
    for i, b in enumerate(sizes[:-1]):
        if i:
            means, holes = _block_means(known, m, b)
            filled = _upsample(filled, sizes[i - 1] / b, tuple(holes.shape[-2:]))
        filled = means + _solve(means, holes, filled, steps=4 * max(holes.shape[-2:]), tol=_COARSE_TOL)
    return _upsample(filled, float(sizes[-2]), tuple(m.shape[-2:]))


def _kept_mean(known: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each image's mean over its kept pixels (B, C, 1, 1): the start where nothing better is known."""
    return known.sum(dim=(2, 3), keepdim=True) / (1 - m).sum(dim=(2, 3), keepdim=True).clamp(min=1)


def _fill_holes(known: torch.Tensor, m: torch.Tensor, patch: int | None, *, steps: int, tol: float) -> torch.Tensor:
    """ROAD's solution in the holes ``m`` (B, 1, H, W) of ``known`` (B, 3, H, W), from the cascade's start where the
    holes are patch-aligned."""
    start = _cascade_start(known, m, patch) if patch and patch > 1 else _kept_mean(known, m)
    return _solve(known, m, start.expand_as(known), steps=steps, tol=tol)


def road_fill(x: torch.Tensor, removed: torch.Tensor, *, noise: torch.Tensor | None = None, patch: int | None = None,
              steps: int = _CG_STEPS, tol: float = _CG_TOL) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels (B, 1, H, W) of ``x`` (1, 3, H, W): (B, 3, H, W),
    plus ``noise`` (:func:`road_noise`) on the imputed pixels.

    The removed values u solve, for every removed pixel i, d_i·u_i − Σ_{n removed} w_n u_n = Σ_{n kept} w_n x_n
    (d_i: the weights of i's neighbours inside the image), a symmetric positive definite system (a weighted graph
    Laplacian with the kept pixels as boundary values), solved by conjugate gradients to a relative residual of
    ``tol`` or ``steps`` iterations. ``patch``: removals aligned to patches of this size start from the same
    system solved on block means, coarse to fine (faster, and closer at the iteration cap; the same system is solved).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = removed.to(dtype)  # 1 where unknown
    known = x.to(dtype) * (1 - m)
    # one image at a time on the CPU: its vectors stay in cache, and a batch's vectors would be walked in full at
    # every iteration until its slowest image is solved
    parts = [slice(i, i + 1) for i in range(len(m))] if x.device.type == "cpu" else [slice(None)]
    u = torch.cat([_fill_holes(known[s], m[s], patch, steps=steps, tol=tol) for s in parts])
    if noise is not None:
        u = u + noise.to(u) * m
    return (known + u).to(x.dtype)
