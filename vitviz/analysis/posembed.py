"""Position-embedding analysis: cosine similarity of the patch position embeddings (ViT paper, Fig. 7 centre).

Only a learned absolute position embedding (added to the tokens) has rows to compare. A model whose positions live
inside attention has none: rotary embeddings turning q and k (Eva: DINOv3, the RoPE ViTs) or a relative position
bias on the logits (BEiT); :func:`position_embedding_note` says which, in words, and :func:`patch_pos_embed`
raises :class:`ModelError` with that sentence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ModelError

__all__ = ["patch_pos_embed", "pos_embed_similarity", "nearest_neighbour_offsets", "position_embedding_note"]


def position_embedding_note(model: torch.nn.Module) -> str | None:
    """Why ``model`` has no learned position embedding to compare, as a sentence; None when it has one."""
    if getattr(model, "pos_embed", None) is not None:
        return None
    name = type(model).__name__
    if getattr(model, "rope", None) is not None:
        return (f"{name} has no learned position embedding: it tells positions by rotary embeddings (RoPE) that turn "
                "each patch's queries and keys by its place in the grid, inside every attention layer, so there are "
                "no position vectors to compare")
    rel = getattr(model, "rel_pos_bias", None) is not None or any(
        getattr(getattr(blk, "attn", None), "relative_position_bias_table", None) is not None
        for blk in getattr(model, "blocks", ()))
    if rel:
        return (f"{name} has no learned position embedding: it tells positions by a relative position bias added to "
                "the attention logits of each pair of patches, so there are no position vectors to compare")
    return f"{name} has no learned position embedding, so there are no position vectors to compare"


def patch_pos_embed(model: torch.nn.Module) -> torch.Tensor:
    """The patch part of ``model.pos_embed`` at the grid in use: (gh·gw, C), prefix embeddings left out.

    Works for models whose pos_embed includes the CLS/register/distillation rows and for ``no_embed_class``
    models, whose pos_embed has patch rows only.
    """
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        raise ModelError(position_embedding_note(model))
    gh, gw = model.patch_embed.grid_size
    num_prefix = pos.shape[1] - gh * gw
    if num_prefix < 0:
        raise ModelError(f"pos_embed has {pos.shape[1]} rows, fewer than the {gh}x{gw} patch grid")
    return pos[0, num_prefix:].detach().float()


def pos_embed_similarity(pos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of position embeddings: (N, C) -> (N, N)."""
    unit = F.normalize(pos.float(), dim=-1)
    return unit @ unit.T


def nearest_neighbour_offsets(sim: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """For each patch, the (drow, dcol) offset to its most similar other patch: (N, 2).

    A trained 2D position embedding puts each patch's most similar patch right next to it (|drow|, |dcol| <= 1).
    """
    gh, gw = grid
    s = sim.clone()
    s.fill_diagonal_(float("-inf"))
    best = s.argmax(dim=-1)
    rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    return torch.stack([best // gw - rows, best % gw - cols], dim=-1)
