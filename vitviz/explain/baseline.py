"""The random baseline: a seeded uniform map, the floor every faithfulness table compares with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import MethodSpec
from .passes import Plain

__all__ = ["RANDOM", "RandomSettings", "random_map"]


@dataclass(frozen=True)
class RandomSettings:
    seed: int = 0


def random_map(grid: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) values from ``numpy.random.default_rng(seed)``: (gh, gw) float32."""
    return np.random.default_rng(seed).random(grid).astype(np.float32)


RANDOM = MethodSpec(name="random", title="random baseline (a seeded uniform map)", settings=RandomSettings,
                    uses_target=False, needs=lambda s, geo: Plain(),
                    map=lambda s, run, geo: random_map(geo.grid, seed=s.seed))
