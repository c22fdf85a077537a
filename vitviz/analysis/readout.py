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

__all__ = ["READOUTS", "readout_weights", "pool_weights", "latent_weights", "readout_row", "readout_name",
           "embedding_name"]

READOUTS = {  # what each readout is, for a person: "Attention of {name}"
    "cls": "the CLS token",
    "mean": "the mean-pooled readout (the mean of the patch tokens, as the head pools them)",
    "pool": "the attention-pool head (its attention over the final tokens as weights)",
}
_SHORT = {"cls": "the CLS token", "mean": "the mean-pooled readout", "pool": "the attention-pool head"}
_EMBEDDINGS = {"token": "the CLS embedding", "avg": "the mean-pooled embedding",
               "map": "the attention-pooled embedding"}


def readout_name(readout: str, *, short: bool = False) -> str:
    """"the CLS token", "the mean-pooled readout (...)" or "the attention-pool head (...)": what the maps explain."""
    return (_SHORT if short else READOUTS)[readout]


def embedding_name(pooling: str) -> str:
    """What the head pools into the embedding the experiments compare (timm's ``forward_head(pre_logits=True)``),
    from its ``global_pool`` (:attr:`vitviz.models.ModelInfo.pooling`): "the CLS embedding", "the mean-pooled
    embedding", "the attention-pooled embedding". Not the readout the views follow: DINOv3 keeps a CLS token, whose
    attention the views show, and averages its patches into the embedding."""
    return _EMBEDDINGS.get(pooling, f"the {pooling}-pooled embedding")


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
    if readout == "pool":
        return pool_weights(model, features).float()
    B, T, _ = features.shape
    start = _pool_from(model, readout)
    w = torch.zeros((B, T), dtype=torch.float32, device=features.device)
    w[:, start:] = 1.0 / (T - start)
    return w


def pool_weights(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """An attention-pool head's weights over the final normed tokens (B, T, C) -> (B, T), in their precision (fp32
    at least): its attention (:func:`vitviz.walk.blocks.pool_attention`) averaged over its heads, its latents read as
    its output reads them (:func:`latent_weights`), zero on the tokens it does not pool (timm's ViT skips its prefix
    tokens unless ``pool_include_prefix``; Eva's pool reads them all). Also for a pool beside a CLS token."""
    B, T, _ = features.shape
    start = _pool_from(model, "pool")
    dtype = torch.promote_types(features.dtype, torch.float32)
    w = torch.zeros((B, T), dtype=dtype, device=features.device)
    with torch.no_grad():
        a = pool_attention(model, features[:, start:].detach()).to(dtype)  # (B, H, Q, T - start), rows sum to 1
    w[:, start:] = latent_weights(model.attn_pool, a).mean(dim=1)
    return w


def latent_weights(pool: torch.nn.Module, a: torch.Tensor) -> torch.Tensor:
    """An attention pool's (B, H, Q, T) probabilities -> (B, H, T), as its output reads its Q latents: the first
    only (``pool="token"``) or their mean (``"avg"``; SigLIP's one latent is both)."""
    return a[:, :, 0] if pool.pool == "token" else a.mean(dim=2)
