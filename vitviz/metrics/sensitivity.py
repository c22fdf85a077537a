"""Sensitivity-n (Ancona et al., ICLR 2018): does the sum of a map over a set of patches predict what removing that
set costs? A rank-free check of a map's values, not only of its order.

For each n in ``counts`` and each of ``samples`` random sets S of n patches (the same sets for every map, seeded):

    Δ(S) = y(x) − y(x without S)          (token removal; y read as the faithfulness curves read it)
    r_n  = Pearson correlation over the sets of Σ_{j ∈ S} map_j and Δ(S)

and the map's score is the mean of r_n over n. A map proportional to each patch's effect scores 1 where effects
add up; a random map scores about 0. A patch target's own patch is never in a set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ParameterError
from ..targets import Target, embed_tokens
from .faithfulness import Readout, _check_curves, _chunk, _start, run_kept

__all__ = ["SENSITIVITY_FRACTIONS", "Sensitivity", "sensitivity_n", "random_sets"]

SENSITIVITY_FRACTIONS = (0.1, 0.3, 0.5)  # the shares of the patches removed at once


@dataclass(frozen=True)
class Sensitivity:
    """One map's correlations: ``r`` (len(counts),) per set size, their mean ``score``."""

    counts: np.ndarray
    r: np.ndarray
    readout: str

    @property
    def score(self) -> float:
        return float(np.nanmean(self.r)) if np.isfinite(self.r).any() else float("nan")


def random_sets(num_patches: int, n: int, samples: int, *, seed: int, protect: int | None = None) -> np.ndarray:
    """``samples`` random sets of ``n`` patch indices (samples, n), never ``protect``; the same for the same seed."""
    pool = np.array([j for j in range(num_patches) if j != protect])
    if not 1 <= n <= pool.size:
        raise ParameterError(f"sets of {n} patches cannot be drawn from {pool.size}")
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(pool, size=n, replace=False) for _ in range(samples)])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _scores(model, tokens, kept: torch.Tensor, reader, p: int, protect: int | None) -> np.ndarray:
    """The read-out on each kept set (B, K), in chunks that bound the attention's memory."""
    size, out = _chunk(model, p + kept.shape[1]), []
    for a in range(0, kept.shape[0], size):
        sub = kept[a : a + size]
        pos = p + (sub == protect).int().argmax(dim=1) if protect is not None else None
        out.append(reader(run_kept(model, tokens, sub), pos)[0].double().cpu().numpy())
    return np.concatenate(out)


def sensitivity_n(
        model: torch.nn.Module,
        x: torch.Tensor,
        maps: Sequence[np.ndarray],
        *,
        target: Target | str = "auto",
        readout: Readout = "target",
        fractions: Sequence[float] = SENSITIVITY_FRACTIONS,
        samples: int = 32,
        seed: int = 0,
) -> list[Sensitivity]:
    """Sensitivity-n of several (gh, gw) maps of ``x`` (1, 3, H, W), sharing the passes: ``fractions`` × ``samples``
    forwards on shorter sequences, whatever the number of maps."""
    grid = _check_curves(model, x, maps, "tokens", readout)
    target = Target.parse(target)
    protect = target.index if target.kind == "patch" else None
    N, p = grid[0] * grid[1], int(model.num_prefix_tokens)
    counts = np.array(sorted({max(1, round(f * (N - (protect is not None)))) for f in fractions}))
    flat = [np.asarray(m, dtype=np.float64).reshape(-1) for m in maps]
    r = np.full((len(maps), len(counts)), np.nan)
    with torch.inference_mode():
        tokens = embed_tokens(model, x)
        full, _resolved, (reader,) = _start(model, x, target, (readout,))
        y0 = float(reader(full, torch.tensor([p + (protect or 0)], device=x.device))[0][0])
        for c, n in enumerate(counts):
            sets = random_sets(N, int(n), samples, seed=seed + c, protect=protect)
            kept = np.stack([np.sort(np.setdiff1d(np.arange(N), s)) for s in sets])
            drop = y0 - _scores(model, tokens, torch.from_numpy(kept).to(x.device), reader, p, protect)
            for m, values in enumerate(flat):
                r[m, c] = _pearson(values[sets].sum(axis=1), drop)
    return [Sensitivity(counts=counts, r=r[m], readout=readout) for m in range(len(maps))]
