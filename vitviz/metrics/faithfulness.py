"""Faithfulness of a map: remove patches in the map's order and watch the target score (deletion / insertion side).

For a map over the N patches of one image and ``steps`` = S (default 10), step i = 0..S-1 removes
k_i = floor(i·N/S + ½) patches (the removed fraction x_i = i/S: 0, 0.1, ..., 0.9 for S = 10):

- MoRF (most relevant first): the k_i patches with the highest values;
- LeRF (least relevant first): the k_i patches with the lowest values.

Ties are broken by patch index in both orders (a stable sort of -map and of map), so a constant map removes the
same patches both ways and scores exactly 0. A faithful map makes the score fall fast under MoRF and slowly under
LeRF. The areas are trapezoids over the removed fraction, AUC = Σ_i (x_{i+1} - x_i)·(y_i + y_{i+1})/2 on
x_0..x_{S-1} (so at most 0.9 for scores ≤ 1 at S = 10), and

    score = AUC_LeRF - AUC_MoRF        (a random map scores about 0; higher is more faithful)

The score y at each step (:func:`curves`):

- ``embedding`` target: cos(f(x̃), f(x)), f the embedding the head reads (1 at step 0);
- ``patch`` p: cos(g_p(x̃), g_p(x)) of patch p's final feature; patch p is never removed (it is ranked out, and
  the k_i are counted over the other N - 1 patches);
- ``class`` c: the softmax probability p_c(x̃); the logit y_c(x̃) is recorded beside it.

Perturbation (how a patch is removed):

- ``tokens``: the patch token is dropped from the sequence after its position embedding was added (prefix tokens,
  CLS + registers + distillation token, are always kept), then the blocks, the final norm and the head run on the
  shorter sequence. Native to ViTs: no infill, and the pass is cheaper by the share of tokens dropped;
- ``pixels``: the patch's pixels are set to the image's per-channel mean in input space (the normalised tensor the
  model reads; the same as the mean pixel, since normalisation is affine per channel), for comparison with
  Chefer et al. 2021's perturbation protocol (Table 1).

The curves run without gradients, under inference mode. Token removal batches each step's MoRF and LeRF inputs
(the same token count) of every map together; step 0 (nothing removed) is one pass shared by all curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ParameterError
from ..targets import ModelOutputs, Target, check_one_image, embed_tokens, head_outputs, resolve_target

__all__ = [
    "Perturbation",
    "PERTURBATIONS",
    "Curves",
    "removed_counts",
    "removal_orders",
    "auc",
    "run_kept",
    "curve_score",
    "curves",
    "faithfulness",
]

Perturbation = Literal["tokens", "pixels"]
PERTURBATIONS = ("tokens", "pixels")
ScoreKind = Literal["cosine", "probability"]
_BATCH_BYTES = 256 * 2**20  # attention probabilities of one block for one chunk of perturbed inputs


@dataclass(frozen=True)
class Curves:
    """One map's two curves: the score at each removed fraction, their areas and the faithfulness score."""

    fractions: np.ndarray  # (S,) x_i = i / S
    removed: np.ndarray  # (S,) k_i patches removed
    morf: np.ndarray  # (S,) score with the most relevant k_i patches removed
    lerf: np.ndarray  # (S,) ... the least relevant
    morf_logit: np.ndarray | None  # (S,) the class logit beside the probability (class targets only)
    lerf_logit: np.ndarray | None
    morf_auc: float
    lerf_auc: float
    score_kind: ScoreKind
    perturbation: Perturbation
    target: Target  # resolved
    seconds: float  # the share of the batched passes spent on this map's inputs

    @property
    def score(self) -> float:
        return self.lerf_auc - self.morf_auc


def removed_counts(num_patches: int, steps: int = 10) -> np.ndarray:
    """k_i = floor(i·N/S + ½) for i = 0..S-1: (S,) int."""
    if not isinstance(steps, int) or steps < 2:
        raise ParameterError(f"steps must be an integer of at least 2, got {steps!r}")
    if num_patches < 1:
        raise ParameterError("there are no patches to remove")
    return np.array([math.floor(i * num_patches / steps + 0.5) for i in range(steps)], dtype=np.int64)


def removal_orders(heat: np.ndarray, *, protect: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(MoRF, LeRF) orders of the patch indices of a (gh, gw) map, ties by index; ``protect`` is left out of both."""
    flat = np.asarray(heat, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise ParameterError("the map has NaN or infinite values, so its patches cannot be ranked")
    idx = np.arange(flat.size)
    if protect is not None:
        keep = idx != protect
        flat, idx = flat[keep], idx[keep]
    morf = idx[np.argsort(-flat, kind="stable")]
    lerf = idx[np.argsort(flat, kind="stable")]
    return morf, lerf


def auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid area under ``values`` over ``fractions``: Σ (x_{i+1} - x_i)·(y_i + y_{i+1})/2."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ParameterError(f"fractions and values must be matching 1-D arrays, got {x.shape} and {y.shape}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def run_kept(model: torch.nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> ModelOutputs:
    """The model on the prefix tokens and the kept patch tokens only.

    ``tokens`` (1, T, C) from :func:`vitviz.explain.embed_tokens` (position embeddings added); ``keep`` (B, K)
    patch indices (0..N-1) per sequence, in the order they go into the sequence -> outputs of (B, P + K) tokens.
    """
    p = int(model.num_prefix_tokens)
    B = keep.shape[0]
    prefix = tokens[:, :p].expand(B, -1, -1)
    patches = tokens[0, p:][keep]  # (B, K, C)
    return head_outputs(model, model.blocks(torch.cat([prefix, patches], dim=1)))


def curve_score(model: torch.nn.Module, target: Target, out: ModelOutputs, ref: torch.Tensor,
                position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the curves measure, (B,), and for a class target the (B,) logit beside it (differentiable).

    ``ref``: the full image's embedding (or patch p's feature); ``position`` (B,): where patch p sits in each
    sequence (patch targets).
    """
    if target.kind == "class":
        logits = out.logits.float()
        return logits.softmax(-1)[:, target.index], logits[:, target.index]
    if target.kind == "embedding":
        return F.cosine_similarity(out.embedding.float(), ref[None].float(), dim=-1), None
    rows = torch.arange(out.tokens.shape[0], device=out.tokens.device)
    feat = out.tokens[rows, position].float()  # (B, C)
    return F.cosine_similarity(feat, ref[None].float(), dim=-1), None


def _chunk(model: torch.nn.Module, num_tokens: int) -> int:
    heads = int(model.blocks[0].attn.num_heads)
    return max(1, min(64, _BATCH_BYTES // (heads * num_tokens * num_tokens * 4)))


def _kept_sets(orders: list[tuple[np.ndarray, np.ndarray]], k: int, protect: int | None) -> np.ndarray:
    """(2M, N - k) sorted kept patch indices: MoRF then LeRF of each map, with ``k`` removed."""
    rows = []
    for morf, lerf in orders:
        for order in (morf, lerf):
            kept = order[k:]
            if protect is not None:
                kept = np.append(kept, protect)
            rows.append(np.sort(kept))
    return np.stack(rows)


def _token_steps(model, x, orders, counts, target, protect):
    """Scores (S, 2M) and logits, running each step's 2M sequences in chunks; step 0 once."""
    dev = x.device
    tokens = embed_tokens(model, x)  # (1, T, C)
    full = head_outputs(model, model.blocks(tokens))
    resolved = resolve_target(model, target, None if full.logits is None else full.logits[0])
    p = int(model.num_prefix_tokens)
    ref = full.embedding[0] if resolved.kind == "embedding" else (
        full.tokens[0, p + resolved.index] if resolved.kind == "patch" else None)
    pos0 = torch.tensor([p + (protect or 0)], device=dev)
    s0, l0 = curve_score(model, resolved, full, ref, pos0)
    M2 = 2 * len(orders)
    scores = np.empty((len(counts), M2))
    logits = np.empty((len(counts), M2)) if resolved.kind == "class" else None
    scores[0] = float(s0[0])
    if logits is not None:
        logits[0] = float(l0[0])
    for i, k in enumerate(counts[1:], start=1):
        kept = torch.from_numpy(_kept_sets(orders, int(k), protect)).to(dev)  # (2M, K)
        size = _chunk(model, p + kept.shape[1])
        for a in range(0, M2, size):
            sub = kept[a : a + size]
            out = run_kept(model, tokens, sub)
            pos = p + (sub == protect).int().argmax(dim=1) if protect is not None else None
            s, lg = curve_score(model, resolved, out, ref, pos)
            scores[i, a : a + size] = s.cpu().numpy()
            if logits is not None:
                logits[i, a : a + size] = lg.cpu().numpy()
    return scores, logits, resolved


def _pixel_steps(model, x, orders, counts, target, protect):
    """As :func:`_token_steps`, with removed patches filled with the per-channel mean of ``x``."""
    gh, gw = (int(v) for v in model.patch_embed.grid_size)
    ps = int(model.patch_embed.patch_size[0])
    mean = x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)  # per-channel mean of the image, in input space
    full = head_outputs(model, model.blocks(embed_tokens(model, x)))
    resolved = resolve_target(model, target, None if full.logits is None else full.logits[0])
    p = int(model.num_prefix_tokens)
    ref = full.embedding[0] if resolved.kind == "embedding" else (
        full.tokens[0, p + resolved.index] if resolved.kind == "patch" else None)
    jobs = [(i, j, order[:k]) for i, k in enumerate(counts) if i > 0
            for j, order in enumerate(o for pair in orders for o in pair)]
    M2 = 2 * len(orders)
    scores = np.empty((len(counts), M2))
    logits = np.empty((len(counts), M2)) if resolved.kind == "class" else None
    pos = None if protect is None else torch.tensor([p + protect], device=x.device)
    s0, l0 = curve_score(model, resolved, full, ref, pos)
    scores[0] = float(s0[0])
    if logits is not None:
        logits[0] = float(l0[0])
    size = _chunk(model, p + gh * gw)
    for a in range(0, len(jobs), size):
        chunk = jobs[a : a + size]
        masks = torch.zeros((len(chunk), gh * gw), dtype=torch.bool, device=x.device)
        for r, (_i, _j, removed) in enumerate(chunk):
            masks[r, torch.from_numpy(removed).to(x.device)] = True
        pixel_mask = masks.view(-1, 1, gh, gw).repeat_interleave(ps, 2).repeat_interleave(ps, 3)
        xb = torch.where(pixel_mask, mean, x)  # (b, 3, H, W)
        out = head_outputs(model, model.blocks(embed_tokens(model, xb)))
        s, lg = curve_score(model, resolved, out, ref, None if pos is None else pos.expand(len(chunk)))
        for r, (i, j, _rm) in enumerate(chunk):
            scores[i, j] = float(s[r])
            if logits is not None:
                logits[i, j] = float(lg[r])
    return scores, logits, resolved


def curves(
        model: torch.nn.Module,
        x: torch.Tensor,
        maps: Sequence[np.ndarray],
        *,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
        steps: int = 10,
) -> list[Curves]:
    """MoRF and LeRF curves of several (gh, gw) maps of one image ``x`` (1, 3, H, W), sharing the passes.

    ``target`` as in :mod:`vitviz.explain` (pass an explanation's resolved target to score what it explained).
    """
    check_one_image(model, x)
    if perturbation not in PERTURBATIONS:
        raise ParameterError(f"unknown perturbation {perturbation!r}: choose tokens or pixels")
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    if not maps:
        raise ParameterError("no maps to measure")
    for heat in maps:
        if tuple(np.shape(heat)) != grid:
            raise ParameterError(f"a map of shape {tuple(np.shape(heat))} does not fit the {grid[0]}x{grid[1]} grid")
    target = Target.parse(target)
    protect = target.index if target.kind == "patch" else None
    orders = [removal_orders(h, protect=protect) for h in maps]
    counts = removed_counts(grid[0] * grid[1] - (protect is not None), steps)
    fractions = np.arange(steps) / steps
    t0 = time.perf_counter()
    with torch.inference_mode():
        run = _token_steps if perturbation == "tokens" else _pixel_steps
        scores, logits, resolved = run(model, x, orders, counts, target, protect)
    seconds = (time.perf_counter() - t0) / len(maps)
    out = []
    for m in range(len(maps)):
        mo, le = scores[:, 2 * m], scores[:, 2 * m + 1]
        out.append(Curves(
            fractions=fractions, removed=counts, morf=mo, lerf=le,
            morf_logit=None if logits is None else logits[:, 2 * m],
            lerf_logit=None if logits is None else logits[:, 2 * m + 1],
            morf_auc=auc(fractions, mo), lerf_auc=auc(fractions, le),
            score_kind="probability" if resolved.kind == "class" else "cosine",
            perturbation=perturbation, target=resolved, seconds=seconds,
        ))
    return out


def faithfulness(
        model: torch.nn.Module,
        x: torch.Tensor,
        heat: np.ndarray,
        *,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
        steps: int = 10,
) -> Curves:
    """The curves of one map: see :func:`curves`."""
    return curves(model, x, [heat], target=target, perturbation=perturbation, steps=steps)[0]
