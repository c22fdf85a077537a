"""Take the position embeddings away: the same image with its positions zeroed, its patches shuffled, or both.

A transformer block treats its tokens as a set: permuting the tokens permutes its outputs the same way and nothing
else (self-attention and the per-token MLP are permutation-equivariant). The position embeddings are the only place
a ViT learns where a patch sits. So without them, shuffling the patches changes nothing but the order of the
outputs (the embedding the head reads stays the same to float precision), and with them it changes what the model
sees. The embedding is timm's ``forward_head(pre_logits=True)``: the CLS token for a token-pooling head, else what
the head pools (the mean of the patch tokens, or its attention pool's output), with or without a CLS token beside
it; the maps follow the readout (the CLS token, else what the head reads: :mod:`vitviz.analysis.readout`).

Variants, all through the one walk of the blocks (:func:`vitviz.walk.blocks.walk`) in one batch, nothing set on the
model:

- ``intact``: the model's own forward;
- ``no_position``: the position embeddings zeroed (``embed(model, x, pos_embed=0)``; prefix tokens included where
  the model gives them a position);
- ``shuffled``: the patch tokens permuted by a seeded permutation π after the patch embedding, while the position
  embeddings stay in place: position i holds patch π(i)'s content. Prefix tokens keep their place. Outputs and
  attention are put back in the image's patch order for display;
- ``shuffled_no_position``: both.

Only learned absolute position embeddings are taken away: a model that also turns q and k by a rotary embedding
(Eva) keeps those positions inside attention, and one without absolute embeddings is refused.

The shuffle is made with ``embed``'s own ``pos_embed`` argument: embedding patch j with position π⁻¹(j)'s
embedding and then moving the patch tokens by π gives exactly the sequence [prefix, p_π(i) + e_i].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..analysis.readout import readout_weights
from ..analysis.rollout import cls_attention, rollout_matrices, rollout_row, tokens_to_grid
from ..errors import ModelError, ParameterError
from ..models.labels import Prediction, class_names, has_classes, top_predictions
from ..targets import head_outputs
from ..walk.blocks import BufferProbs, embed, walk
from ..walk.capture import check_capturable

__all__ = ["Variant", "VARIANTS", "MapKind", "VariantResult", "PositionExperiment", "patch_permutation",
           "position_experiment"]

Variant = Literal["intact", "no_position", "shuffled", "shuffled_no_position"]
VARIANTS: tuple[Variant, ...] = ("intact", "no_position", "shuffled", "shuffled_no_position")
MapKind = Literal["rollout", "last_layer"]
DESCRIPTIONS = {
    "intact": "the model as it is",
    "no_position": "position embeddings removed (zeroed)",
    "shuffled": "patches shuffled (position embeddings kept in place)",
    "shuffled_no_position": "patches shuffled and position embeddings removed",
}


@dataclass(frozen=True)
class VariantResult:
    """One variant of the image, everything in the image's own patch order (a shuffled run put back)."""

    name: Variant
    description: str
    cosine: float  # cosine of the embedding the head reads (CLS, or the pooled one) with the intact run's
    predictions: tuple[Prediction, ...]  # top-k of the head; () for a backbone
    attention_map: np.ndarray  # (gh, gw) the readout's rollout over every layer, or its last-layer attention
    features: np.ndarray  # (T, C) final normed tokens, prefix tokens first
    embedding: np.ndarray  # (D,) what the head reads (pre-logits)


@dataclass(frozen=True)
class PositionExperiment:
    """The variants of one image, the permutation used (position i held patch ``permutation[i]``) and the map kind."""

    variants: tuple[VariantResult, ...]
    permutation: np.ndarray  # (N,) int
    map_kind: MapKind
    readout: str = "cls"  # what the embedding and maps read: "cls", "mean" (pooled patches), "pool" (attention pool)

    def variant(self, name: Variant) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise ParameterError(f"the variant {name!r} was not run: choose one of {[v.name for v in self.variants]}")


def patch_permutation(num_patches: int, *, seed: int = 0) -> torch.Tensor:
    """A seeded permutation π of the patch indices (N,): position i of the shuffled sequence holds patch π(i)."""
    if num_patches < 1:
        raise ParameterError(f"there must be at least one patch to shuffle, got {num_patches}")
    return torch.randperm(num_patches, generator=torch.Generator().manual_seed(int(seed)))


def _check(model: torch.nn.Module, x: torch.Tensor, variants, map_kind: str) -> tuple[Variant, ...]:
    check_capturable(model)
    if getattr(model, "pos_embed", None) is None:
        raise ModelError(f"{type(model).__name__} has no learned position embeddings to take away (its positions are "
                         "rotary or relative, inside attention)")
    want = tuple(int(v) for v in model.patch_embed.img_size)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or tuple(x.shape[-2:]) != want:
        raise ParameterError(f"expected one image as a (1, 3, {want[0]}, {want[1]}) tensor, got {tuple(x.shape)}")
    if map_kind not in ("rollout", "last_layer"):
        raise ParameterError(f"unknown attention map {map_kind!r}: choose rollout or last_layer")
    names = tuple(dict.fromkeys(("intact", *variants)))  # the intact run first: every cosine is against it
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise ParameterError(f"unknown variant {bad[0]!r}: choose from {', '.join(VARIANTS)}")
    return names


def _sequence(model: torch.nn.Module, x: torch.Tensor, variant: Variant, perm: torch.Tensor) -> torch.Tensor:
    """The token sequence (1, T, C) the blocks see for ``variant``, in the walked (possibly shuffled) order."""
    own = model.pos_embed
    pos = torch.zeros_like(own) if variant.endswith("no_position") else own
    if not variant.startswith("shuffled"):
        return embed(model, x, pos_embed=None if pos is own else pos)
    n, p = perm.numel(), model.num_prefix_tokens
    moved = pos.clone()  # patch j is embedded with position π⁻¹(j)'s embedding: moved[π(i)] = pos[i]
    moved[:, -n:][:, perm] = pos[:, -n:]
    t = embed(model, x, pos_embed=moved)
    return torch.cat([t[:, :p], t[:, p:][:, perm]], dim=1)  # then position i holds patch π(i): p_π(i) + e_i


def _order(perm: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(T,) indices that put a shuffled sequence back in the image's order: prefix first, patch j at p + π⁻¹(j)."""
    back = torch.argsort(perm)
    return torch.cat([torch.arange(num_prefix), num_prefix + back])


def _attention_map(attn: torch.Tensor, *, model: torch.nn.Module, map_kind: MapKind, start: int = 0,
                   discard: float = 0.0, readout: torch.Tensor | None = None) -> np.ndarray:
    """(L, H, T, T) attention in the image's order -> (gh, gw): the readout's rollout from layer ``start`` to the
    last (discarding the lowest ``discard`` of each fused matrix), or its last-layer attention. ``readout`` (T,):
    the weights of a model without a CLS token (None: the CLS token's row)."""
    source = 0 if readout is None else readout
    if map_kind == "rollout":
        start = min(start, attn.shape[0] - 1)  # a one-layer model has no layer 1
        keep = 0 if readout is None else None  # the CLS column is never discarded; without one, none is kept
        mats = rollout_matrices(attn[start:], discard_ratio=discard, keep_column=keep)
        row = rollout_row(mats, start=0, end=attn.shape[0] - start - 1, source=source)
    else:
        row = cls_attention(attn[-1:], source=source)[0]
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return tokens_to_grid(row, num_prefix_tokens=model.num_prefix_tokens, grid=grid).numpy().astype(np.float32)


def position_experiment(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        variants: tuple[Variant, ...] = ("no_position", "shuffled", "shuffled_no_position"),
        seed: int = 0,
        map_kind: MapKind = "rollout",
        start: int = 0,
        discard: float = 0.0,
        k: int = 5,
) -> PositionExperiment:
    """Run one image ``x`` (1, 3, H, W) intact and as each of ``variants``, in one batched walk of the blocks.

    Returns per variant the cosine of its embedding with the intact one, the top-``k`` predictions when the model
    has a head, the readout's attention map (``rollout`` from layer ``start`` with the heads averaged and the lowest
    ``discard`` of each matrix dropped, or the ``last_layer``'s attention; the readout is the CLS token, or for a
    model without one the tokens its head pools, weighted as it pools them on each variant) and the final tokens,
    all in the image's patch order.
    """
    names = _check(model, x, variants, map_kind)
    gh, gw = model.patch_embed.grid_size
    perm = patch_permutation(int(gh) * int(gw), seed=seed).to(x.device)
    with torch.inference_mode():
        tokens = torch.cat([_sequence(model, x, v, perm) for v in names])  # (V, T, C)
        V, T, _ = tokens.shape
        heads = model.blocks[0].attn.num_heads
        wide = torch.promote_types(tokens.dtype, torch.float32)  # fp32 at least, fp64 for a fp64 model
        buf = torch.empty((len(model.blocks), V, heads, T, T), device=x.device, dtype=wide)
        out = walk(model, tokens, probs=BufferProbs(buf))
        order = _order(perm, model.num_prefix_tokens)
        shuffled = torch.tensor([v.startswith("shuffled") for v in names], device=x.device)
        out = torch.where(shuffled[:, None, None], out[:, order], out)  # back in the image's order
        attn = buf.transpose(0, 1).cpu()  # (V, L, H, T, T)
        outs = head_outputs(model, out)
        weights = readout_weights(model, outs.tokens)  # (V, T) in the image's order; None: the CLS token
    names_of = class_names(model)
    intact = outs.embedding[0].to(wide)
    results = []
    for i, name in enumerate(names):
        a = attn[i][..., order, :][..., order] if name.startswith("shuffled") else attn[i]
        emb = outs.embedding[i].to(wide)
        results.append(VariantResult(
            name=name, description=DESCRIPTIONS[name],
            cosine=float(torch.nn.functional.cosine_similarity(emb, intact, dim=0)),
            predictions=top_predictions(outs.logits[i], names=names_of, k=k) if has_classes(model) else (),
            attention_map=_attention_map(a, model=model, map_kind=map_kind, start=start, discard=discard,
                                         readout=None if weights is None else weights[i].cpu()),
            features=outs.tokens[i].to(wide).cpu().numpy(), embedding=emb.cpu().numpy()))
    return PositionExperiment(variants=tuple(results), permutation=perm.cpu().numpy(), map_kind=map_kind,
                              readout=check_capturable(model))
