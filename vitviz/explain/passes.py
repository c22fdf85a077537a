"""The passes explanation methods need, each a frozen request: equal requests are one pass, mergeable ones merge.

- :class:`Capture`: one forward with every layer's attention (rollout, raw attention);
- :class:`Gradients`: one forward + one backward through the walk with autograd on the probabilities, the total
  gradients ∂s/∂A_l (Chefer, gradient × attention) or LeGrad's per-layer ones, for the layers asked (merged to the
  union);
- :class:`Plain`: one forward, only to resolve the target (the random baseline);
- a method's own loop (greedy deletion, :mod:`.deletion`) is a request of the same shape.

``run(model, x, target, *, progress, interrupt)`` returns a :class:`PassResult`. Nothing is set on the model (no
hook, flag, attribute, ``requires_grad`` change; parameter ``.grad`` is never written), so one shared model may be
explained from several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..analysis.readout import pool_weights, readout_weights
from ..errors import ParameterError
from ..models.labels import has_head
from ..targets import (
    ModelOutputs,
    Target,
    check_one_image,
    embed_tokens,
    head_outputs,
    resolve_target,
    target_reference,
    target_score,
)
from ..walk.blocks import Interventions, KeptProbs, run_blocks, walk
from ..walk.capture import attention_forward
from ._base import PassResult, Progress

__all__ = ["Capture", "Plain", "Gradients", "AttentionGradients", "attention_gradients", "merge_passes",
           "pool_readout"]

Interrupt = Callable[[], None]


def _resolved(model: torch.nn.Module, target: Target | str, out: ModelOutputs) -> Target:
    return resolve_target(model, target, None if out.logits is None else out.logits[0])


@dataclass(frozen=True)
class Capture:
    """One forward pass keeping every layer's attention: what rollout and raw attention read (``extra``: the
    readout's weights (1, T) of a model without a CLS token, :mod:`vitviz.analysis.readout`; None: the CLS row)."""

    def text(self, depth: int) -> str:
        return "1 forward (attention only)"

    def run(self, model: torch.nn.Module, x: torch.Tensor, target: Target | str, *, progress: Progress | None = None,
            interrupt: Interrupt | None = None) -> PassResult:
        cap = attention_forward(model, x, store_device=None)  # (1, L, H, T, T) and the normed features
        with torch.inference_mode():
            feats = cap.features
            out = ModelOutputs(feats, model.forward_head(feats, pre_logits=True),
                               model.forward_head(feats) if has_head(model) else None)
        return PassResult(outputs=out, target=_resolved(model, target, out), attention=cap.attention[0],
                          extra=readout_weights(model, feats), passes=self.text(len(model.blocks)))


@dataclass(frozen=True)
class Plain:
    """One forward pass (timm's own), only to resolve the target and read the predictions."""

    def text(self, depth: int) -> str:
        return "none"

    def run(self, model: torch.nn.Module, x: torch.Tensor, target: Target | str, *, progress: Progress | None = None,
            interrupt: Interrupt | None = None) -> PassResult:
        with torch.inference_mode():
            out = head_outputs(model, run_blocks(model, embed_tokens(model, x)))
        return PassResult(outputs=out, target=_resolved(model, target, out), passes=self.text(len(model.blocks)))


def pool_readout(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor | None:
    """An attention-pool head's weights over this pass's final tokens ``features`` (1, T, C) -> (T,)
    (:func:`vitviz.analysis.readout.pool_weights`), here also for a head that pools beside a CLS token it never
    reads (whose readout the capture's views take as that token); None for a head without a latent-query attention
    pool that pools its latents."""
    pool = getattr(model, "attn_pool", None)
    if pool is None or not hasattr(pool, "latent") or pool.pool not in ("token", "avg"):
        return None  # average, token or max pooling; AttentionPoolPrr; latents left unpooled
    return pool_weights(model, features)[0]


@dataclass(frozen=True)
class AttentionGradients:
    """One forward and one backward: every layer's attention A_l (H, T, T each) and the gradients of some layers.

    ``gradients_by_layer`` holds ∂s/∂A_l (H, T, T) for l in ``layers``; with ``per_layer`` LeGrad's ∂s_l/∂A_l,
    s_l the target read from layer l's own output tokens. All detached, kept per layer as the walk made them.
    ``readout``: an attention-pool head's weights (T,) over this pass's final tokens (:func:`pool_readout`), the row
    the gradient-weighted maps read for it; None for other heads.
    """

    attention_by_layer: tuple[torch.Tensor, ...]
    gradients_by_layer: tuple[torch.Tensor, ...]
    layers: tuple[int, ...]
    target: Target  # resolved
    score: float  # the target's value s(x) on the image
    outputs: ModelOutputs  # final outputs, detached
    per_layer: bool
    readout: torch.Tensor | None = None

    @property
    def attention(self) -> torch.Tensor:
        """(L, H, T, T)."""
        return torch.stack(self.attention_by_layer)

    @property
    def gradients(self) -> torch.Tensor:
        """(len(layers), H, T, T)."""
        return torch.stack(self.gradients_by_layer)


def _layers(layers: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(depth))
    out = tuple(sorted({int(v) if v >= 0 else depth + int(v) for v in layers}))
    if not out or not all(0 <= v < depth for v in out):
        raise ParameterError(f"gradient layers {list(layers)} are out of range: the model has layers 0 to {depth - 1}")
    return out


def _detached(out: ModelOutputs) -> ModelOutputs:
    return ModelOutputs(tokens=out.tokens.detach(), embedding=out.embedding.detach(),
                        logits=None if out.logits is None else out.logits.detach())


def attention_gradients(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        target: Target | str = "auto",
        per_layer: bool = False,
        layers: Sequence[int] | None = None,
        interrupt: Interrupt | None = None,
) -> AttentionGradients:
    """Walk ``model``'s blocks on ``x`` (1, 3, H, W) with autograd, then one ``torch.autograd.grad``.

    ``per_layer=False``: ∇A_l = ∂s/∂A_l, the total derivative of the final target score through every later layer.
    ``per_layer=True`` (LeGrad): each block's input is detached, so A_l reaches nothing but layer l's output, and
    ∂(Σ_l s_l)/∂A_l = ∂s_l/∂A_l exactly, with s_l the target read through the final norm and head from layer l's
    tokens (s_L = s): all layers' gradients from one backward, as LeGrad's L separate backwards would give them.
    ``layers`` (default all; negative from the end): the gradients wanted. The backward then stops at the
    earliest of them (the last layer alone costs about one block's backward).
    """
    check_one_image(model, x)
    depth = len(model.blocks)
    wanted = _layers(layers, depth)
    probs = KeptProbs()
    readouts: list[torch.Tensor] = []  # per_layer: layer l's tokens, for the wanted layers before the last

    def tap(layer: int, out: torch.Tensor) -> None:
        if per_layer and layer in wanted and layer < depth - 1:
            readouts.append(out)

    with torch.inference_mode(False), torch.enable_grad():
        t = embed_tokens(model, x.clone())  # a clone: an inference-mode input cannot be saved for backward
        t = walk(model, t, probs=probs, taps=tap,
                 interventions=Interventions(detach_inputs=per_layer, interrupt=interrupt))
        final = head_outputs(model, t)
        resolved = _resolved(model, target, final)
        ref = target_reference(model, resolved, final)
        score = target_score(model, resolved, final, ref)[0]
        # s_l of the wanted earlier layers through the same norm and head (s_L is the score itself)
        total = score + sum(target_score(model, resolved, head_outputs(model, o), ref)[0] for o in readouts)
        grads = torch.autograd.grad(total, [probs.kept[i] for i in wanted], allow_unused=True)
    grads = [torch.zeros_like(probs.kept[i]) if g is None else g for i, g in zip(wanted, grads, strict=True)]
    return AttentionGradients(
        attention_by_layer=tuple(p.detach()[0] for p in probs.kept),
        gradients_by_layer=tuple(g.detach()[0] for g in grads),
        layers=wanted, target=resolved, score=float(score.detach()), outputs=_detached(final), per_layer=per_layer,
        readout=pool_readout(model, final.tokens),
    )


@dataclass(frozen=True)
class Gradients:
    """One forward + one backward: total gradients (``per_layer=False``) or LeGrad's per-layer ones, of ``layers``."""

    per_layer: bool
    layers: tuple[int, ...]

    def merge(self, other: Gradients) -> Gradients:
        """One backward serves both: the union of the layers asked."""
        return Gradients(self.per_layer, tuple(sorted(set(self.layers) | set(other.layers))))

    def text(self, depth: int) -> str:
        return "1 forward + 1 backward" + (" (through the last layer only)" if self.layers == (depth - 1,) else "")

    def run(self, model: torch.nn.Module, x: torch.Tensor, target: Target | str, *, progress: Progress | None = None,
            interrupt: Interrupt | None = None) -> PassResult:
        g = attention_gradients(model, x, target=target, per_layer=self.per_layer, layers=self.layers,
                                interrupt=interrupt)
        return PassResult(outputs=g.outputs, target=g.target, attention=g.attention_by_layer, extra=g,
                          passes=self.text(len(model.blocks)))


def merge_passes(requests: Sequence[object]) -> dict[object, object]:
    """Each request -> the pass that serves it: equal requests share, :class:`Gradients` of one kind merge."""
    merged: dict[object, object] = {}
    for r in requests:
        key = ("gradients", r.per_layer) if isinstance(r, Gradients) else r
        merged[key] = merged[key].merge(r) if key in merged and isinstance(r, Gradients) else r
    return {r: merged[("gradients", r.per_layer) if isinstance(r, Gradients) else r] for r in requests}
