"""LeGrad (Bousselham et al. 2024): per-layer gradients of the target read from each layer, from one backward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..analysis.rollout import tokens_to_grid
from ._base import Geometry, MethodSpec, PassResult, layer_index
from .passes import Gradients

__all__ = ["LEGRAD", "LegradSettings", "legrad_map"]


@dataclass(frozen=True)
class LegradSettings:
    start: int = 0  # the first layer whose gradient is used (negative: from the end); default all layers, as the paper


def legrad_map(gradients: torch.Tensor | Sequence[torch.Tensor], *, num_prefix_tokens: int,
               grid: tuple[int, int]) -> torch.Tensor:
    """LeGrad (Bousselham et al. 2024), from per-layer gradients ∇A_l = ∂s_l/∂A_l (K, H, T, T) of the K layers used:

        Ê_l = 1/(H·T) Σ_h Σ_i (∇A_l)⁺[h, i, :],   E = Σ_l Ê_l over the patch columns,   map = min-max(E)

    Follows the paper and the authors' code (WalBouss/LeGrad, ``compute_legrad_clip``): s_l is the target read from
    layer l's tokens through the model's final norm and head (their ``ln_post`` and ``proj``), the gradient is
    taken with respect to layer l's own attention only, clamped at 0, averaged over heads and over every query
    row (CLS, prefix and patch queries), summed over layers and min-max normalised. Departures: s_l reads the
    model's own pooling (the CLS token for token pooling; their CLIP code averages all tokens) and the target
    here is a class logit or ⟨f(x), f_l(x)⟩ rather than a text embedding's similarity; the authors' wrapper
    defaults to the last two layers (``layer_index=-2``), the paper aggregates all layers: the method's
    ``start_layer`` chooses (default 0, all layers). One backward gives every layer's gradient (see
    :func:`attention_gradients`), where the authors run one per layer.
    """
    e = sum(g.clamp(min=0).mean(dim=(0, 1)) for g in gradients)  # (T,): heads and queries averaged, layers summed
    heat = tokens_to_grid(e, num_prefix_tokens=num_prefix_tokens, grid=grid)
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def _needs(s: LegradSettings, geo: Geometry) -> Gradients:
    start = layer_index(s.start, geo.depth, "LeGrad start layer")
    return Gradients(per_layer=True, layers=tuple(range(start, geo.depth)))


def _legrad(s: LegradSettings, run: PassResult, geo: Geometry) -> torch.Tensor:
    g = run.extra
    start = layer_index(s.start, geo.depth, "LeGrad start layer")
    return legrad_map(g.gradients_by_layer[g.layers.index(start):], num_prefix_tokens=geo.num_prefix_tokens,
                      grid=geo.grid)


LEGRAD = MethodSpec(name="legrad", title="LeGrad (Bousselham et al. 2024)", settings=LegradSettings, needs=_needs,
                    map=_legrad)
