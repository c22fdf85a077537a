"""Position-embedding analysis: cosine similarity of the patch position embeddings (ViT paper, Fig. 7 centre)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ModelError

__all__ = ["patch_pos_embed", "pos_embed_similarity", "nearest_neighbour_offsets"]


def patch_pos_embed(model: torch.nn.Module) -> torch.Tensor:
    """The patch part of ``model.pos_embed`` at the grid in use: (gh·gw, C), prefix embeddings left out.

    Works for models whose pos_embed includes the CLS/register/distillation rows and for ``no_embed_class``
    models, whose pos_embed has patch rows only.
    """
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        raise ModelError(f"{type(model).__name__} has no absolute position embedding")
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
