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
_CG_STEPS = 100  # conjugate-gradient iterations at most, from the patch-level start (tests/test_perturbations.py)
_CG_TOL = 1e-4  # relative residual at which a system counts as solved



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


def _neighbours(v: torch.Tensor) -> torch.Tensor:
    """Σ_n w_n v_n over each pixel's 8 neighbours inside the image (zero padding: outside counts nothing), as eight
    shifted slices of one padded copy (a grouped 3x3 convolution is several times slower on the CPU)."""
    H, W = v.shape[-2:]
    q = F.pad(v, (1, 1, 1, 1))
    side = q[..., 0:H, 1 : W + 1] + q[..., 2 : H + 2, 1 : W + 1] + q[..., 1 : H + 1, 0:W] + q[..., 1 : H + 1, 2 : W + 2]
    corner = q[..., 0:H, 0:W] + q[..., 0:H, 2 : W + 2] + q[..., 2 : H + 2, 0:W] + q[..., 2 : H + 2, 2 : W + 2]
    return side / 6 + corner / 12


def road_noise(x: torch.Tensor, *, seed: int = 0, noise: float = ROAD_NOISE) -> torch.Tensor:
    """One field of Gaussian noise (1, 3, H, W) of std ``noise`` for an image: the same removed pixel gets the same
    draw in every perturbed copy, so equal masks give equal inputs (a constant map's two orders agree)."""
    gen = torch.Generator().manual_seed(seed)
    return (noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.device)


def _cg(apply, rhs: torch.Tensor, u: torch.Tensor, *, steps: int, tol: float) -> torch.Tensor:
    """Conjugate gradients on A u = rhs for each image of the batch at once (A symmetric positive definite)."""
    dims = tuple(range(1, rhs.ndim))
    r = rhs - apply(u)
    p, rr = r.clone(), (r * r).sum(dim=dims, keepdim=True)
    stop = tol**2 * (rhs * rhs).sum(dim=dims, keepdim=True).clamp(min=1e-30)
    for _ in range(steps):
        if bool((rr <= stop).all()):
            break
        ap = apply(p)
        alpha = rr / (p * ap).sum(dim=dims, keepdim=True).clamp(min=1e-30)
        u, r = u + alpha * p, r - alpha * ap
        rr_new = (r * r).sum(dim=dims, keepdim=True)
        p, rr = r + (rr_new / rr.clamp(min=1e-30)) * p, rr_new
    return u


def _solve(known: torch.Tensor, m: torch.Tensor, u0: torch.Tensor, *, steps: int, tol: float) -> torch.Tensor:
    """The removed values of ROAD's system (module docstring) from the start ``u0``; ``m`` 1 where removed."""
    degree = _neighbours(torch.ones_like(m[:1, :1])).expand_as(m)
    rhs = _neighbours(known) * m
    return _cg(lambda u: (degree * u - _neighbours(u)) * m, rhs, u0 * m, steps=steps, tol=tol) * m


def _coarse_start(known: torch.Tensor, m: torch.Tensor, patch: int) -> torch.Tensor:
    """A start for the pixel system from the same system on patch means (a 2-level multigrid's coarse solve): the
    holes' inner values arrive at once instead of diffusing in from their borders pixel by pixel."""
    kept = F.avg_pool2d(1 - m, patch)
    means = F.avg_pool2d(known, patch) / kept.clamp(min=1e-12)
    holes = (kept <= 0).to(m.dtype)  # patches with no kept pixel
    coarse = _solve(means * (1 - holes), holes, means * (1 - holes) + holes * means.mean(dim=(2, 3), keepdim=True),
                    steps=4 * max(holes.shape[-2:]), tol=1e-6)
    filled = means * (1 - holes) + coarse
    return F.interpolate(filled, size=m.shape[-2:], mode="bilinear", align_corners=False)


def road_fill(x: torch.Tensor, removed: torch.Tensor, *, noise: torch.Tensor | None = None, patch: int | None = None,
              steps: int = _CG_STEPS, tol: float = _CG_TOL) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels (B, 1, H, W) of ``x`` (1, 3, H, W): (B, 3, H, W),
    plus ``noise`` (:func:`road_noise`) on the imputed pixels.

    The removed values u solve, for every removed pixel i, d_i·u_i − Σ_{n removed} w_n u_n = Σ_{n kept} w_n x_n
    (d_i: the weights of i's neighbours inside the image), a symmetric positive definite system (a weighted graph
    Laplacian with the kept pixels as boundary values), solved by conjugate gradients to a relative residual of
    ``tol`` or ``steps`` iterations. ``patch``: removals aligned to patches of this size start from the solution
    on patch means (much faster; the same system is solved).
    """
    B = removed.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = removed.to(dtype).expand(B, 3, *removed.shape[-2:])  # 1 where unknown
    known = x.to(dtype).expand(B, -1, -1, -1) * (1 - m)
    start = (_coarse_start(known, m, patch) if patch else
             known.sum(dim=(2, 3), keepdim=True) / (1 - m).sum(dim=(2, 3), keepdim=True).clamp(min=1))
    u = _solve(known, m, start.expand_as(m), steps=steps, tol=tol)
    if noise is not None:
        u = u + noise.to(u) * m
    return (known + u).to(x.dtype)
