"""Gradient-weighted attention: Chefer, Gur & Wolf 2021 (ICCV, "generic") and its last layer alone (gradient ×
attention), from one forward + one backward (:class:`.passes.Gradients`, total gradients ∂s/∂A_l).

Both read one row of the token mixing, the row of what the target reads: the CLS token (Chefer et al.'s choice),
the pooled patches' mean (average pooling), a patch target's own token, or for an attention-pool head (timm's
"map": SigLIP's and Perception Encoder's towers) the pool's own attention over the final tokens, averaged over its
heads and latents (:func:`.passes.pool_readout`), read from the same pass. That row w is a constant of the
backward: it only selects which rows of R (or Ā) are read, as the CLS index does; the gradients ∂s/∂A_l flow
through the pool (its attention, values and MLP) like through any layer. A model with a CLS token beside an
attention pool reads the pool's weights too, not the CLS row: timm's ViT pools the patches only (w is zero on the
CLS token, whose last-layer row has zero gradient, as the head never reads it), Eva's (PE's) pool weighs the CLS
token among the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..analysis.rollout import rollout_row, tokens_to_grid
from ..errors import ModelError
from ._base import Geometry, MethodSpec, PassResult
from .passes import Gradients

__all__ = ["CHEFER", "GRADXATTN", "chefer_map", "grad_attention_map"]


def chefer_map(attention: torch.Tensor | Sequence[torch.Tensor], gradients: torch.Tensor | Sequence[torch.Tensor], *,
               num_prefix_tokens: int, grid: tuple[int, int], readout: torch.Tensor | int = 0) -> torch.Tensor:
    """Chefer, Gur & Wolf 2021 ("generic attention-model explainability", ICCV), eqs. (5)-(6) with self-attention:

        Ā_l = E_h[(∇A_l ⊙ A_l)⁺],   R⁰ = I,   R^l = R^{l-1} + Ā_l · R^{l-1}   (l = 1..L)

    and the map is w·R^L over the patch tokens, w the row the target reads (``readout``: a token index, or weights
    w (T,) over the tokens: an average pool's 1/N, an attention pool's own attention, see the module docstring);
    Chefer et al. read the CLS token, the default. R^L = (I + Ā_L) ··· (I + Ā_1), so only that row is formed, as
    vector–matrix products (O(L·T²)).
    (L, H, T, T) attention and total gradients (or L tensors of (H, T, T) each) -> (gh, gw).
    """
    abar = torch.stack([(g * a).clamp(min=0).mean(dim=0) for a, g in zip(attention, gradients, strict=True)])
    abar.diagonal(dim1=-2, dim2=-1).add_(1.0)  # I + Ā_l, in place on our own tensor
    row = rollout_row(abar, start=0, end=abar.shape[0] - 1, source=readout)  # w · (I+Ā_L) ··· (I+Ā_1): (T,)
    return tokens_to_grid(row, num_prefix_tokens=num_prefix_tokens, grid=grid)


def grad_attention_map(attention: torch.Tensor, gradient: torch.Tensor, *, num_prefix_tokens: int,
                       grid: tuple[int, int], readout: torch.Tensor | int = 0) -> torch.Tensor:
    """Gradient × attention of one layer (the last, as vitviz uses it): A_l and ∇A_l (H, T, T) -> (gh, gw),

        map = w · E_h[(∇A_l ⊙ A_l)⁺] over the patches,

    Chefer et al.'s Ā_l alone, without the propagation through the earlier layers; w the row the target reads
    (``readout``, as in :func:`chefer_map`; the CLS row by default). Another row's gradient is zero when the
    target reads only w's tokens, so any other row would give a flat map (the CLS row beside an attention pool).
    """
    abar = (gradient * attention).clamp(min=0).mean(dim=0)  # (T, T)
    row = abar[readout] if isinstance(readout, int) else readout.to(abar.dtype) @ abar
    return tokens_to_grid(row, num_prefix_tokens=num_prefix_tokens, grid=grid)


def _readout(run: PassResult, geo: Geometry) -> torch.Tensor:
    w = geo.readout(run.target, pool=run.extra.readout)
    if w is None:
        head = "an attention-pool head without a latent query" if geo.pool == "map" else f"a {geo.pool!r}-pooling head"
        raise ModelError(f"{head} reads no token row that gradient-weighted attention could follow: choose another "
                         "method")
    return w


def _chefer(s, run: PassResult, geo: Geometry) -> torch.Tensor:
    return chefer_map(run.attention, run.extra.gradients_by_layer, num_prefix_tokens=geo.num_prefix_tokens,
                      grid=geo.grid, readout=_readout(run, geo))


def _gradxattn(s, run: PassResult, geo: Geometry) -> torch.Tensor:
    g = run.extra
    last = g.layers.index(geo.depth - 1)
    return grad_attention_map(run.attention[-1], g.gradients_by_layer[last], num_prefix_tokens=geo.num_prefix_tokens,
                              grid=geo.grid, readout=_readout(run, geo))


CHEFER = MethodSpec(name="chefer", title="Chefer et al. 2021 (gradient-weighted attention rolled out)",
                    needs=lambda s, geo: Gradients(per_layer=False, layers=tuple(range(geo.depth))), map=_chefer)
# the last layer's gradient alone: a backward through one block, unless Chefer's pass runs anyway (merged)
GRADXATTN = MethodSpec(name="gradxattn", title="gradient × attention, last layer",
                       needs=lambda s, geo: Gradients(per_layer=False, layers=(geo.depth - 1,)), map=_gradxattn)
