"""The readout: what the model's head reads of its final tokens, as weights over them, and its row of attention.

The views follow one token's attention back through the layers. For a model with a CLS token that token is the CLS
token (its row of every matrix, read as it is). A model without one reads a summary of its tokens, so its views
follow the tokens that summary reads, each row weighted as the head weights that token:

- ``mean`` (average pooling, timm's ``*_gap`` ViTs): the pooled embedding is (1/N) Σ_i x_i over the pooled
  tokens, so what it reads from layer l is the mean of their rows, w_i = 1/N;
- ``pool`` (an attention-pool head, timm's "map": SigLIP's): the pool's latent queries attend over the final
  tokens; w is that attention (:func:`vitviz.walk.blocks.pool_attention`) averaged over its heads and latents, so
  it differs per image.

The readout row of a (T, T) matrix M is then w·M: the rollout row w·Â_b···Â_a, one layer's raw attention w·A_l.
"""

from __future__ import annotations

import torch

from ..walk.blocks import check_capturable, pool_attention
from .rollout import readout_row

__all__ = ["READOUTS", "readout_weights", "readout_row", "readout_name", "embedding_name"]

READOUTS = {  # what each readout is, for a person: "Attention of {name}"
    "cls": "the CLS token",
    "mean": "the mean-pooled readout (the mean of the patch tokens, as the head pools them)",
    "pool": "the attention-pool head (its attention over the final tokens as weights)",
}
_SHORT = {"cls": "the CLS token", "mean": "the mean-pooled readout", "pool": "the attention-pool head"}
_EMBEDDINGS = {"cls": "the CLS embedding", "mean": "the mean-pooled embedding",
               "pool": "the attention-pooled embedding"}


def readout_name(readout: str, *, short: bool = False) -> str:
    """"the CLS token", "the mean-pooled readout (...)" or "the attention-pool head (...)": what the maps explain."""
    return (_SHORT if short else READOUTS)[readout]


def embedding_name(readout: str) -> str:
    """"the CLS embedding", "the mean-pooled embedding" or "the attention-pooled embedding": what the head reads
    (timm's ``forward_head(pre_logits=True)``), which the experiments compare."""
    return _EMBEDDINGS[readout]


def _pool_from(model: torch.nn.Module, readout: str) -> int:
    """The first token the head pools: timm's ViT skips the prefix tokens unless ``pool_include_prefix``; Eva's
    attention pool reads every token, its average pool the patches (as ``global_pool_nlc``)."""
    p = int(model.num_prefix_tokens)
    include = getattr(model, "pool_include_prefix", None)
    if include is None:
        include = readout == "pool"
    return 0 if include else p


def readout_weights(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor | None:
    """(B, T, C) final normed tokens -> (B, T) fp32 weights over the tokens that the head reads, each row summing to
    1 (zero on the tokens it does not pool); None for a model with a CLS token (its readout is that token's own row).

    ``features`` matter for an attention pool only (its attention depends on the image); for average pooling the
    weights are 1/N on the N pooled tokens.
    """
    readout = check_capturable(model)
    if readout == "cls":
        return None
    B, T, _ = features.shape
    start = _pool_from(model, readout)
    w = torch.zeros((B, T), dtype=torch.float32, device=features.device)
    if readout == "mean":
        w[:, start:] = 1.0 / (T - start)
        return w
    with torch.no_grad():
        a = pool_attention(model, features[:, start:])  # (B, H, Q, T - start), rows sum to 1
    w[:, start:] = a.float().mean(dim=(1, 2))
    return w
