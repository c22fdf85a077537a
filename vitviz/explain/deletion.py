"""Greedy token deletion: the patches a target depends on, found by taking them away, the most needed first.

The faithfulness curves (:mod:`vitviz.faithfulness`) ask of a map: removing the patch tokens it ranks first, does
the target's score fall fast? This method answers that question of the model directly. Searching all subsets is
out of reach, and a one-shot ranking misses how redundant a ViT's tokens are (once a patch is gone, a similar
patch carries what it carried), so the removal is greedy, and each step looks again at what is left:

    K_0 = the N patches (but a patch target's own);   for i = 0..S-1:
        y_i = y(K_i)                           the curves' score on the prefix tokens and the kept patches K_i
        g_i = ∂y(K_i; b) / ∂b  at b = log ½    b (|K_i|,): a bias on the attention logits of K_i's keys in every
                                               layer and head; b_j = log m_j for a presence m_j ∈ (0, 1]
        D_i = the n_i patches of K_i with the largest g_i;   K_{i+1} = K_i \\ D_i

with n_i = k_{i+1} - k_i, k_i = floor(i·N/S + ½) (the last step takes what is left). y is what the curves
measure: the cosine of the embedding (patch p's feature) with the full image's, or the class probability. As
m_j → 0 token j receives no attention anywhere and nothing reads its own stream: exactly its removal (an
average-pooling head, which reads every patch's own stream, averages with the same weights m_j; an attention-pool
head, SigLIP's and PE's, gets the same bias b_j on its latent queries' logits, through timm's own pool and its
``attn_mask`` argument; max pooling and attention pools with their own position embedding are refused). The
gradient is taken with every kept patch half present, the midpoint rule of the path from present to removed (a
one-point integrated gradient); at m = 1 a cosine is at its maximum, its gradient zero, and it would rank nothing.
For the same reason the embedding of a model without prefix tokens (SigLIP's towers, timm's ``*_gap`` ViTs) is
refused: with no token fixed at m = 1, all patches half present is the full image again.

The map: a patch removed at step i, the r-th of n_i, gets

    v = ȳ_i - (ȳ_i - ȳ_{i+1})·r/n_i - ȳ_{S-1},     ȳ_i = min(y_0..y_i),  ȳ_S = ȳ_{S-1}

the part of the score the deletion still had to take away when the patch went: the first patches removed carry
the whole fall, patches removed after the score stopped falling get 0 (ties, which the curves break by patch
index). Values are ≥ 0 and never rise along the removal order.

Related: the deletion game of Fong, Patrick & Vedaldi (ICCV 2019), here solved greedily on tokens rather than by
optimising a smooth pixel mask; the deletion curve itself is Petsiuk et al.'s (RISE, BMVC 2018) and Samek et al.'s
MoRF (2017). The map is built with the same token removal and score the curves measure, so its token-removal
score is partly by construction: benchmarks/results-faithfulness.md also scores every map with pixel filling,
which this method never sees.

Cost: per step a plain forward (y_i) and a forward + backward (g_i) on the shrinking sequence, at most
4·Σ_i |K_i|/N ≈ 2·S plain forwards of the full image (less: attention on shorter sequences is cheaper); no hook,
flag or attribute is set on the model (the blocks are walked by :func:`vitviz.walk.blocks.walk` with a key bias).

Precision: with bf16/fp16 weights the walk runs in that precision (softmax in fp32), so near-equal gradients may
rank differently than in fp32.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError, ParameterError
from ..metrics.faithfulness import curve_score, removed_counts
from ..models.labels import has_head
from ..targets import (
    ModelOutputs,
    Target,
    check_one_image,
    embed_tokens,
    head_outputs,
    resolve_target,
    target_reference,
)
from ..walk.blocks import Interventions, KeptProbs, run_blocks, walk
from ._base import MethodSpec, PassResult, Progress

__all__ = ["DELETION", "DELETION_STEPS", "PRESENCE", "Deletion", "DeletionSettings", "deletion_order",
           "deletion_values", "deletion"]

DELETION_STEPS = 32  # the default steps: more faithful than 16 on the shared photos (benchmarks/)
MAX_STEPS = 1024

# the presence m at which each step's gradient is taken: the midpoint of the way from present (m = 1) to removed
# (m = 0). At m = 1 a cosine score is at its maximum, so its gradient there is zero and ranks nothing.
PRESENCE = 0.5


@dataclass(frozen=True)
class Deletion:
    """One greedy deletion: the removal ``order`` (N',) of patch indices, the score before each step, the map."""

    order: np.ndarray  # patch indices, removed first to last (the protected patch of a patch target left out)
    sizes: np.ndarray  # (S,) n_i, patches removed per step
    scores: np.ndarray  # (S,) y_i, the score on the kept set before step i (y_0: the full image)
    map: np.ndarray  # (gh, gw) float32, v as in the module docstring; the protected patch gets 0
    target: Target  # resolved
    outputs: ModelOutputs  # the full image's, detached


def _sequence(tokens: torch.Tensor, kept: torch.Tensor, *, num_prefix_tokens: int,
              protect: int | None) -> torch.Tensor:
    """(1, T, C) tokens -> the prefix tokens, the protected patch (if any), then the ``kept`` patches (K,)."""
    p = num_prefix_tokens
    extra = tokens[:, p + protect : p + protect + 1] if protect is not None else tokens[:, :0]
    return torch.cat([tokens[:, :p], extra, tokens[:, p:][:, kept]], dim=1)


def _places(kept: torch.Tensor, protect: int | None) -> torch.Tensor:
    """(1, K') the patches of :func:`_sequence`'s sequence in its order: where Eva's RoPE and Beit's bias read them."""
    first = kept.new_tensor([protect]) if protect is not None else kept[:0]
    return torch.cat([first, kept])[None]


def _kept_score(model: torch.nn.Module, tokens: torch.Tensor, kept: torch.Tensor, *, target: Target,
                ref: torch.Tensor, protect: int | None) -> float:
    """y(K): the curves' score with only the prefix tokens (and the protected patch) and ``kept`` in the sequence."""
    p = int(model.num_prefix_tokens)
    with torch.inference_mode():
        seq = _sequence(tokens, kept, num_prefix_tokens=p, protect=protect)
        out = head_outputs(model, run_blocks(model, seq, patches=_places(kept, protect)))
        score, _logit = curve_score(model, target, out, ref,
                                    torch.tensor([p], device=tokens.device))  # the protected patch sits at p
    return float(score[0])


def _check_pool(model: torch.nn.Module) -> None:
    """Greedy deletion reads presence through attention, an average pool and a latent-query attention pool: refuse
    other pools (max pooling, a pool without a latent, a pool adding its own position embedding to each place)."""
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (not hasattr(pool, "latent") or getattr(pool, "pos_embed", None) is not None):
        raise ModelError(f"greedy deletion cannot remove tokens from this {type(pool).__name__} head (it has no "
                         "latent query or adds its own position embedding to each token's place): choose another "
                         "method")
    if pool is None and model.global_pool not in ("token", "avg"):
        raise ModelError(f"greedy deletion needs a head reading the CLS token, averaging the patches or pooling them "
                         f"by attention, not {model.global_pool!r} pooling: choose another method")


def _check_anchor(model: torch.nn.Module, target: Target) -> None:
    """The embedding's cosine needs a token that stays fully present (a prefix token): without one, every patch
    half present is the full image again (the pools and every softmax normalise the presence away), so the first
    step's gradient is that of a cosine at its maximum, zero, and would rank the patches by rounding noise."""
    if target.kind == "embedding" and int(model.num_prefix_tokens) == 0:
        raise ModelError("greedy deletion cannot rank the patches of this model's own embedding: without a CLS or "
                         "other prefix token, all patches half present read as the full image, so the first step "
                         "has no gradient; choose a class, prompt or patch target, or another method")


def _weighted_outputs(model: torch.nn.Module, t: torch.Tensor, bias: torch.Tensor) -> ModelOutputs:
    """:func:`head_outputs` of tokens ``t`` (1, T', C) with every token weighted by its presence exp(``bias``) (T'),
    as token removal drops it: from an average pool's mean, from an attention pool's softmax (a CLS-token head:
    unchanged)."""
    if getattr(model, "attn_pool", None) is not None:
        return _attention_pooled(model, t, bias)
    if model.global_pool != "avg":
        return head_outputs(model, t)
    feats = model.norm(t)
    start = 0 if getattr(model, "pool_include_prefix", False) else int(model.num_prefix_tokens)
    w = bias[:, start:].exp().to(feats.dtype)[..., None]  # (1, T' - start, 1)
    embedding = model.head_drop(model.fc_norm((feats[:, start:] * w).sum(1) / w.sum(1)))
    return ModelOutputs(tokens=feats, embedding=embedding, logits=model.head(embedding) if has_head(model) else None)


def _attention_pooled(model: torch.nn.Module, t: torch.Tensor, bias: torch.Tensor) -> ModelOutputs:
    """timm's ``forward_head`` (pool, fc_norm, head) with the key bias added to the pool's logits too: the latents'
    softmax(q·kᵀ·scale + b) over the pooled tokens, so the pool weighs token j by m_j as every block does."""
    feats = model.norm(t)
    # timm's ViT pools the patches unless pool_include_prefix; Eva's (PE's) pool reads every token
    start = 0 if getattr(model, "pool_include_prefix", True) else int(model.num_prefix_tokens)
    mask = bias[:, None, None, start:].to(feats.dtype)  # (1, 1, 1, N) over the pool's (B, H, Q, N) logits
    embedding = model.head_drop(model.fc_norm(model.attn_pool(feats[:, start:], attn_mask=mask)))
    return ModelOutputs(tokens=feats, embedding=embedding, logits=model.head(embedding) if has_head(model) else None)


def _presence_gradient(model: torch.nn.Module, tokens: torch.Tensor, kept: torch.Tensor, *, target: Target,
                       ref: torch.Tensor, protect: int | None, interrupt=None) -> torch.Tensor:
    """∂y/∂b_j (K,) at b = log PRESENCE for the ``kept`` patches: one forward and one backward of the walk."""
    p = int(model.num_prefix_tokens)
    with torch.inference_mode(False), torch.enable_grad():
        # our own copies: inference-mode tensors cannot be saved for backward
        t = _sequence(tokens, kept, num_prefix_tokens=p, protect=protect).clone()  # (1, p [+ 1] + K, C)
        ref = None if ref is None else ref.clone()
        delta = torch.zeros(1, kept.numel(), device=tokens.device, dtype=torch.float32, requires_grad=True)
        fixed = delta.new_zeros(1, t.shape[1] - kept.numel())  # prefix tokens and the protected patch: present
        bias = torch.cat([fixed, delta + math.log(PRESENCE)], dim=1)  # (1, T')
        how = Interventions(key_bias=bias, patches=_places(kept, protect), interrupt=interrupt)
        t = walk(model, t, probs=KeptProbs(), interventions=how)
        out = _weighted_outputs(model, t, bias)
        score, _logit = curve_score(model, target, out, ref, torch.tensor([p], device=t.device))
        (grad,) = torch.autograd.grad(score[0], delta)
    return grad.detach()[0]


def deletion_order(model: torch.nn.Module, x: torch.Tensor, *, target: Target | str = "auto",
                   steps: int = DELETION_STEPS, progress: Progress | None = None, interrupt=None) -> Deletion:
    """The greedy deletion of ``x``'s (1, 3, H, W) patches for ``target``; see the module docstring.

    ``steps`` S ≥ 2; more steps than patches are cut to one patch a step. ``progress(i, S)`` after each step;
    ``interrupt()`` before every block of the gradient walk and every step (it raises to stop).
    """
    check_one_image(model, x)
    _check_pool(model)
    steps = _whole_steps(steps)
    gh, gw = (int(v) for v in model.patch_embed.grid_size)
    with torch.inference_mode():
        tokens = embed_tokens(model, x)  # (1, T, C)
        full = head_outputs(model, run_blocks(model, tokens))
    resolved = resolve_target(model, target, None if full.logits is None else full.logits[0])
    _check_anchor(model, resolved)
    protect = resolved.index if resolved.kind == "patch" else None
    ref = target_reference(model, resolved, full)
    kept = torch.tensor([j for j in range(gh * gw) if j != protect], device=x.device)
    if kept.numel() == 0:
        raise ParameterError("there are no patches to remove besides the target patch")
    steps = min(steps, kept.numel())  # at most one step per patch
    first = removed_counts(kept.numel(), steps) if steps >= 2 else np.zeros(1, dtype=np.int64)
    counts = np.append(first, kept.numel())  # k_0..k_S
    order, scores = [], []
    for i in range(steps):
        if interrupt is not None:
            interrupt()
        y = _kept_score(model, tokens, kept, target=resolved, ref=ref, protect=protect)
        g = _presence_gradient(model, tokens, kept, target=resolved, ref=ref, protect=protect, interrupt=interrupt)
        rank = torch.argsort(g, descending=True, stable=True)
        n = int(counts[i + 1] - counts[i])
        order.append(kept[rank[:n]].cpu())
        kept = kept[rank[n:]]
        scores.append(y)
        if progress is not None:
            progress(i + 1, steps)
    sizes = np.diff(counts)
    order_np = torch.cat(order).numpy()
    heat = deletion_values(order_np, sizes, np.asarray(scores), num_patches=gh * gw).reshape(gh, gw)
    return Deletion(order=order_np, sizes=sizes, scores=np.asarray(scores), map=heat, target=resolved,
                    outputs=full)


def _whole_steps(steps) -> int:
    try:
        value = operator.index(steps)  # ints and numpy integers, not floats
    except TypeError:
        value = None
    if value is None or isinstance(steps, bool) or value < 2:
        raise ParameterError(f"deletion steps must be an integer of at least 2, got {steps!r}")
    return value


def deletion_values(order: np.ndarray, sizes: np.ndarray, scores: np.ndarray, *, num_patches: int) -> np.ndarray:
    """v per patch (N,) float32 from the removal ``order``, the step ``sizes`` n_i and the scores y_i (S each)."""
    order, sizes, scores = np.asarray(order), np.asarray(sizes), np.asarray(scores, dtype=np.float64)
    if sizes.shape != scores.shape or int(sizes.sum()) != order.size:
        raise ParameterError("deletion: the step sizes must match the scores and add up to the removal order")
    low = np.minimum.accumulate(scores)  # ȳ_0..ȳ_{S-1}
    nxt = np.append(low[1:], low[-1])  # ȳ_{i+1}, with ȳ_S = ȳ_{S-1}
    values = np.zeros(num_patches, dtype=np.float64)
    start = 0
    for i, n in enumerate(sizes):
        r = np.arange(n)
        values[order[start : start + n]] = low[i] - (low[i] - nxt[i]) * r / n - low[-1]
        start += n
    return values.astype(np.float32)


def deletion(model: torch.nn.Module, x: torch.Tensor, *, target: Target | str = "auto",
             steps: int = DELETION_STEPS, progress: Progress | None = None) -> np.ndarray:
    """The greedy-deletion map (gh, gw) float32 of ``target`` on ``x``: :func:`deletion_order`'s ``map``."""
    return deletion_order(model, x, target=target, steps=steps, progress=progress).map


@dataclass(frozen=True)
class DeletionSettings:
    steps: int = DELETION_STEPS

    def __post_init__(self) -> None:
        if type(self.steps) is not int or not 2 <= self.steps <= MAX_STEPS:
            raise ParameterError(f"deletion steps must be a whole number from 2 to {MAX_STEPS}, got {self.steps!r}")


@dataclass(frozen=True)
class DeletionPass:
    """Greedy deletion's own loop: S steps, each a forward and a forward + backward on the patches left."""

    steps: int

    def text(self, depth: int) -> str:
        return f"{self.steps} steps, each a forward and a forward + backward pass on the patches left"

    def run(self, model: torch.nn.Module, x: torch.Tensor, target: Target | str, *, progress: Progress | None = None,
            interrupt=None) -> PassResult:
        d = deletion_order(model, x, target=target, steps=self.steps, progress=progress, interrupt=interrupt)
        return PassResult(outputs=d.outputs, target=d.target, extra=d,
                          passes=DeletionPass(int(d.sizes.size)).text(len(model.blocks)))  # the steps that ran


DELETION = MethodSpec(name="deletion", title="greedy token deletion (most faithful by token removal)",
                      settings=DeletionSettings, needs=lambda s, geo: DeletionPass(s.steps),
                      map=lambda s, run, geo: run.extra.map)
