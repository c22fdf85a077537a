"""Knock out heads: remove one attention head, a layer's heads or a chosen set, and measure what the target loses.

Two ablations, both through the one walk of the blocks (:func:`vitviz.walk.blocks.walk`), nothing set on the model:

- ``zero``: the head's output A_h·v_h is multiplied by 0 before the projection (the walk's ``head_scale``);
- ``mean``: the head's output at every token is replaced by its mean over the tokens, (1/T) Σ_i (A_h·v_h)_i. Since
  that mean is (mean_i A_h[i, :])·v_h, it is made by the walk's ``probs`` argument: the head's attention rows are
  each replaced by their mean over the queries (every token then reads the same average), no new walk argument.

The effect is measured on the target: the class probability and logit when the model has a head (the intact run's
top-1 class, or a given one), and always the cosine of the embedding the head reads with the intact one: timm's
``forward_head(pre_logits=True)``: the CLS token for a token-pooling head, else what the head pools (the mean of
the patch tokens, or its attention pool's output), with or without a CLS token beside it (DINOv3 averages).
A head's *effect* is what the ablation takes away: p_intact − p_ablated for a class, 1 − cosine for a backbone.

The table ablates every head on its own, as one batch of the same image with a per-sample ``head_scale`` (B, L, H)
(one sample per head), split into chunks of ``batch_size`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..analysis.readout import readout_weights
from ..errors import ParameterError
from ..models.labels import class_name, has_classes
from ..targets import head_outputs
from ..walk.blocks import BufferProbs, Interventions, embed, softmax_probs, walk
from ..walk.capture import check_capturable

__all__ = ["AblationMode", "Reference", "Ablated", "HeadTable", "check_heads", "layer_heads", "reference",
           "ablate", "head_table"]

AblationMode = Literal["zero", "mean"]
Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class Reference:
    """The intact run of one image: its embedding (D,), its logits (C,) or None, and the class measured (or None)."""

    embedding: torch.Tensor
    logits: torch.Tensor | None
    target: int | None
    target_name: str | None

    @property
    def probability(self) -> float | None:
        return None if self.logits is None else float(self.logits.softmax(-1)[self.target])

    @property
    def logit(self) -> float | None:
        return None if self.logits is None else float(self.logits[self.target])


@dataclass(frozen=True)
class Ablated:
    """One ablation of a set of heads: the target's measures and, when asked for, the attention (L, H, T, T)."""

    heads: tuple[Head, ...]
    mode: AblationMode
    cosine: float  # of the embedding with the intact one
    probability: float | None  # of the target class; None for a backbone
    logit: float | None
    effect: float  # p_intact − p (a class) or 1 − cosine (a backbone)
    attention: np.ndarray | None = None
    # (T,) with the attention, for a model without a CLS token: its readout's weights under the ablation (the pooled
    # patches, or its attention pool's attention on the ablated tokens; vitviz.analysis.readout); None: the CLS token
    readout: np.ndarray | None = None


@dataclass(frozen=True)
class HeadTable:
    """Every head ablated on its own: (L, H) arrays of the measures and of the effect."""

    mode: AblationMode
    reference: Reference
    effect: np.ndarray  # (L, H): p_intact − p, or 1 − cosine for a backbone
    cosine: np.ndarray  # (L, H)
    probability: np.ndarray | None  # (L, H); None for a backbone
    logit: np.ndarray | None

    @property
    def measure(self) -> str:
        return "cosine" if self.probability is None else "probability"

    def ranked(self, n: int | None = None) -> list[tuple[int, int, float]]:
        """(layer, head, effect), the most important heads first (largest effect; ties by layer, then head)."""
        flat = self.effect.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))
        H = self.effect.shape[1]
        return [(int(i // H), int(i % H), float(flat[i])) for i in order[:n]]


def _geometry(model: torch.nn.Module) -> tuple[int, int]:
    return len(model.blocks), int(model.blocks[0].attn.num_heads)


def check_heads(model: torch.nn.Module, heads: Iterable[Sequence[int]]) -> tuple[Head, ...]:
    """``heads`` as sorted unique (layer, head) pairs; a :class:`ParameterError` for an empty set or a head that
    does not exist."""
    L, H = _geometry(model)
    out = set()
    for pair in heads:
        if len(pair) != 2:
            raise ParameterError(f"a head is named by (layer, head), got {tuple(pair)!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not 0 <= layer < L:
            raise ParameterError(f"layer {layer} does not exist: choose 0 to {L - 1}")
        if not 0 <= head < H:
            raise ParameterError(f"head {head} does not exist: choose 0 to {H - 1}")
        out.add((layer, head))
    if not out:
        raise ParameterError("choose at least one head to ablate")
    return tuple(sorted(out))


def layer_heads(model: torch.nn.Module, layer: int) -> tuple[Head, ...]:
    """Every head of ``layer``, as (layer, head) pairs."""
    L, H = _geometry(model)
    if not 0 <= layer < L:
        raise ParameterError(f"layer {layer} does not exist: choose 0 to {L - 1}")
    return tuple((layer, h) for h in range(H))


def _check_input(model: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    check_capturable(model)
    want = tuple(int(v) for v in model.patch_embed.img_size)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or tuple(x.shape[-2:]) != want:
        raise ParameterError(f"expected one image as a (1, 3, {want[0]}, {want[1]}) tensor, got {tuple(x.shape)}")
    if mode not in ("zero", "mean"):
        raise ParameterError(f"unknown ablation {mode!r}: choose zero or mean")


class _MeanRows:
    """The walk's probabilities with the chosen heads' rows replaced by their mean over the queries (per sample
    ``mask`` (B, L, H) bool), so those heads output their mean over the tokens; optionally kept in ``buf``."""

    def __init__(self, mask: torch.Tensor | None, buf: torch.Tensor | None = None) -> None:
        self.mask, self.buf = mask, buf

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                 key_bias: torch.Tensor | None) -> torch.Tensor:
        a = softmax_probs(layer, q, k, scale, key_bias)  # (B, H, T, T)
        if self.buf is not None:
            self.buf[layer].copy_(a)  # the attention the model computed, before the replacement
        if self.mask is None or not self.mask[:, layer].any():
            return a
        m = self.mask[:, layer][:, :, None, None]  # (B, H, 1, 1)
        return torch.where(m, a.mean(-2, keepdim=True).expand_as(a), a)


def _scratch(tokens: torch.Tensor, heads: int, depth: int) -> BufferProbs:
    """The capture's in-place softmax into one layer's buffer (B, H, T, T), reused by every layer (the walk reads
    a layer's probabilities before the next layer's are made): no (T, T) temporaries, nothing kept."""
    B, T, _ = tokens.shape
    one = torch.empty((B, heads, T, T), device=tokens.device, dtype=torch.promote_types(tokens.dtype, torch.float32))
    return BufferProbs(one.expand(depth, -1, -1, -1, -1))


def _walk(model: torch.nn.Module, tokens: torch.Tensor, ablations: Sequence[tuple[Head, ...]], mode: AblationMode,
          *, buf: torch.Tensor | None = None, interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """``tokens`` (1, T, C) walked once per ablation (a batch of B = len(ablations)): final tokens (B, T, C)."""
    L, H = _geometry(model)
    off = torch.zeros((len(ablations), L, H), dtype=torch.bool, device=tokens.device)
    for b, heads in enumerate(ablations):
        for layer, head in heads:
            off[b, layer, head] = True
    batch = tokens.expand(len(ablations), -1, -1)
    if mode == "zero":
        how = Interventions(head_scale=(~off).to(tokens.dtype), interrupt=interrupt)
        return walk(model, batch, probs=_MeanRows(None, buf) if buf is not None else _scratch(batch, H, L),
                    interventions=how)
    return walk(model, batch, probs=_MeanRows(off, buf), interventions=Interventions(interrupt=interrupt))


def reference(model: torch.nn.Module, x: torch.Tensor, *, target: int | None = None) -> Reference:
    """The intact run of one image ``x`` (1, 3, H, W): the embedding, the logits and the class measured (``target``,
    else the top-1 class; None for a backbone)."""
    _check_input(model, x, "zero")
    with torch.inference_mode():
        out = head_outputs(model, walk(model, embed(model, x), probs=softmax_probs))
    if not has_classes(model):
        if target is not None:
            raise ParameterError("the model has no classifier head, so there is no class to measure: leave the "
                                 "target out and the embedding's cosine is measured")
        return Reference(out.embedding[0], None, None, None)
    logits = out.logits[0]
    cls = int(logits.argmax()) if target is None else int(target)
    return Reference(out.embedding[0], logits, cls, class_name(model, cls))


def _measures(model: torch.nn.Module, final: torch.Tensor, ref: Reference,
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(B,) cosines with the intact embedding, the target's probabilities and logits (None for a backbone), and the
    final normed tokens (B, T, C)."""
    out = head_outputs(model, final)
    wide = torch.promote_types(final.dtype, torch.float32)
    cos = torch.nn.functional.cosine_similarity(out.embedding.to(wide), ref.embedding.to(wide)[None], dim=-1)
    if ref.logits is None:
        return cos, None, None, out.tokens
    logits = out.logits.to(wide)
    return cos, logits.softmax(-1)[:, ref.target], logits[:, ref.target], out.tokens


def ablate(model: torch.nn.Module, x: torch.Tensor, heads: Iterable[Sequence[int]], *, mode: AblationMode = "zero",
           ref: Reference | None = None, target: int | None = None, attention: bool = False) -> Ablated:
    """Ablate ``heads`` ((layer, head) pairs) together on one image ``x`` (1, 3, H, W): the target's measures
    against the intact run ``ref`` (made here when not given, for ``target``), and with ``attention`` every layer's
    attention (L, H, T, T) as the model computes it under the ablation (and, for a model without a CLS token, its
    readout's weights under the ablation)."""
    _check_input(model, x, mode)
    chosen = check_heads(model, heads)
    ref = reference(model, x, target=target) if ref is None else ref
    L, H = _geometry(model)
    with torch.inference_mode():
        tokens = embed(model, x)
        T = tokens.shape[1]
        wide = torch.promote_types(tokens.dtype, torch.float32)
        buf = torch.empty((L, 1, H, T, T), device=x.device, dtype=wide) if attention else None
        cos, p, logit, feats = _measures(model, _walk(model, tokens, [chosen], mode, buf=buf), ref)
        w = readout_weights(model, feats) if attention else None
    effect = float(1 - cos[0]) if p is None else ref.probability - float(p[0])
    return Ablated(heads=chosen, mode=mode, cosine=float(cos[0]), probability=None if p is None else float(p[0]),
                   logit=None if logit is None else float(logit[0]), effect=effect,
                   attention=None if buf is None else buf[:, 0].cpu().numpy(),
                   readout=None if w is None else w[0].cpu().numpy())


def head_table(model: torch.nn.Module, x: torch.Tensor, *, mode: AblationMode = "zero", ref: Reference | None = None,
               target: int | None = None, batch_size: int = 16,
               interrupt: Callable[[], None] | None = None) -> HeadTable:
    """Every head of ``model`` ablated on its own on one image ``x``: a (L, H) table of the effect on the target,
    computed as batches of ``batch_size`` copies of the image, each with another head ablated."""
    _check_input(model, x, mode)
    if batch_size < 1:
        raise ParameterError(f"batch size must be at least 1, got {batch_size}")
    ref = reference(model, x, target=target) if ref is None else ref
    L, H = _geometry(model)
    every = [((layer, head),) for layer in range(L) for head in range(H)]
    cos, prob, logit = [], [], []
    with torch.inference_mode():
        tokens = embed(model, x)
        for start in range(0, len(every), batch_size):
            c, p, lg, _feats = _measures(model, _walk(model, tokens, every[start:start + batch_size], mode,
                                              interrupt=interrupt), ref)
            cos.append(c.cpu())
            prob.append(p.cpu() if p is not None else None)
            logit.append(lg.cpu() if lg is not None else None)
    cosine = torch.cat(cos).reshape(L, H).numpy().astype(np.float64)
    if ref.logits is None:
        return HeadTable(mode=mode, reference=ref, effect=1 - cosine, cosine=cosine, probability=None, logit=None)
    probability = torch.cat(prob).reshape(L, H).numpy().astype(np.float64)
    return HeadTable(mode=mode, reference=ref, effect=ref.probability - probability, cosine=cosine,
                     probability=probability, logit=torch.cat(logit).reshape(L, H).numpy().astype(np.float64))
