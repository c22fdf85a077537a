"""Explanations of one target: which patches a class score or an embedding depends on.

A *target* is the scalar being explained:

- ``class`` c of a classifier head (default: the top-1 class): the logit y_c (the pre-softmax score, as in
  Chefer et al.'s and LeGrad's code); the faithfulness curves score its softmax probability;
- ``embedding``, label-free after Crabbé & van der Schaar (ICML 2022): s(x̃) = ⟨f(x), f(x̃)⟩ with f the embedding
  the head reads (the final CLS token after the final norm; a classifier's pre-logits) and f(x) held constant;
- ``patch`` p: the same with f the final (normed) feature of patch p, s(x̃) = ⟨g_p(x), g_p(x̃)⟩.

A model without a head (``num_classes == 0``, the default DINOv2) never gets a class target: :class:`ModelError`.

Methods (the maps are over the patch tokens; prefix tokens, CLS + registers + distillation token, are left out):

- ``rollout`` and ``raw``: attention rollout (Abnar & Zuidema 2020) and one layer's raw CLS attention, from
  :mod:`vitviz.rollout`, on one captured pass (they do not depend on the target);
- ``chefer``: Chefer, Gur & Wolf 2021 (ICCV, "generic"), :func:`chefer_map`;
- ``legrad``: Bousselham et al. 2024, :func:`legrad_map`;
- ``gradxattn``: E_h[(∇A_L ⊙ A_L)⁺] of the last layer only, :func:`grad_attention_map`;
- ``deletion``: greedy token deletion, the patches removed first that take the curves' score down fastest, one
  forward + backward per step on the shrinking token set (:mod:`vitviz.deletion`);
- ``random``: a seeded uniform map, the baseline every faithfulness table includes.

The gradient methods cost one forward and one backward: :func:`attention_gradients` walks the blocks itself with
autograd enabled, computing every layer's softmax(q·kᵀ·scale) explicitly as tensors it keeps, and takes
``torch.autograd.grad(score, probs)``. Nothing is set on the model (no hook, flag, attribute, ``requires_grad``
change; parameter ``.grad`` is never written), so one shared model may explain from several threads at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch
from timm.models.vision_transformer import ResPostBlock

from .attention import _qkv, attention_forward, check_capturable
from .errors import ModelError, ParameterError
from .labels import Prediction, class_names, has_head, top_predictions
from .rollout import FUSIONS, HeadFusion, cls_attention, rollout_matrices, rollout_row, tokens_to_grid

__all__ = [
    "METHOD_NAMES",
    "DEFAULT_METHOD",
    "TargetKind",
    "MethodName",
    "Target",
    "Method",
    "Explanation",
    "AttentionGradients",
    "ModelOutputs",
    "embed_tokens",
    "head_outputs",
    "resolve_target",
    "describe_target",
    "target_score",
    "attention_gradients",
    "chefer_map",
    "legrad_map",
    "grad_attention_map",
    "random_map",
    "explain",
    "explain_all",
]

TargetKind = Literal["auto", "class", "embedding", "patch"]
MethodName = Literal["rollout", "raw", "chefer", "legrad", "gradxattn", "deletion", "random"]
METHOD_NAMES: tuple[str, ...] = ("rollout", "raw", "chefer", "legrad", "gradxattn", "deletion", "random")
DELETION_STEPS = 32  # greedy deletion's default steps: more faithful than 16 on the shared photos (benchmarks/)
Progress = Callable[[int, int], None]  # (steps done, steps in all) of a method that runs in steps
# the app's and the CLI's default explanation: the most faithful of the offered maps that also stays on the objects,
# measured on the shared photos (README, benchmarks/results-faithfulness.md); every attention and gradient map
# scored lower there (the best of them: rollout from layer 1 with discard 0.9)
DEFAULT_METHOD = "deletion"
_TARGET_KINDS = ("auto", "class", "embedding", "patch")


# ------------------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """What is explained. ``index``: the class (None = top-1) or the patch (row-major over the grid)."""

    kind: TargetKind = "auto"
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _TARGET_KINDS:
            raise ParameterError(f"unknown target {self.kind!r}: choose auto, class, class:N, embedding or patch:N")
        if self.index is not None and (not isinstance(self.index, int) or isinstance(self.index, bool)
                                       or self.index < 0):
            raise ParameterError(f"a target index must be a non-negative integer, got {self.index!r}")
        if self.kind in ("auto", "embedding") and self.index is not None:
            raise ParameterError(f"the {self.kind} target takes no index")
        if self.kind == "patch" and self.index is None:
            raise ParameterError("the patch target needs a patch index: patch:N")

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """``auto``, ``class`` (top-1), ``class:N``, ``embedding`` or ``patch:N``."""
        if isinstance(text, Target):
            return text
        kind, _, index = str(text).strip().lower().partition(":")
        if index and not index.isdigit():
            raise ParameterError(f"target {text!r}: the index after ':' must be a non-negative integer")
        return cls(kind, int(index) if index else None)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class ModelOutputs:
    """What the head reads from final (normed) tokens: ``tokens`` (B, T, C), ``embedding`` (B, D), ``logits``."""

    tokens: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor | None  # (B, num_classes); None for a model without a head


def embed_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, C): patch embedding, prefix tokens and position embeddings, as timm's forward does."""
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.patch_drop(t)
    return model.norm_pre(t)


def head_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> ModelOutputs:
    """Un-normed final tokens (B, T, C) -> the final norm, the embedding the head reads and the logits.

    The embedding is timm's ``forward_head(pre_logits=True)``: the normed CLS token for token pooling (the mean
    of the CLS and distillation tokens for a distilled DeiT, the pooled patches for average pooling).
    """
    feats = model.norm(tokens)
    embedding = model.forward_head(feats, pre_logits=True)
    logits = model.forward_head(feats) if has_head(model) else None
    return ModelOutputs(tokens=feats, embedding=embedding, logits=logits)


def _num_patches(model: torch.nn.Module) -> int:
    gh, gw = model.patch_embed.grid_size
    return int(gh) * int(gw)


def resolve_target(model: torch.nn.Module, target: Target | str, logits: torch.Tensor | None) -> Target:
    """``auto`` -> class (with a head) or embedding; ``class`` -> its index (top-1 of ``logits`` (C,) when None).

    Raises :class:`ModelError` for a class target on a model without a head, :class:`ParameterError` for an index
    out of range.
    """
    target = Target.parse(target)
    kind = ("class" if has_head(model) else "embedding") if target.kind == "auto" else target.kind
    if kind == "class":
        if not has_head(model):
            raise ModelError(
                "the model has no classifier head, so there is no class to explain: use the embedding target"
            )
        num = int(model.num_classes)
        index = int(logits.argmax()) if target.index is None else target.index
        if not 0 <= index < num:
            raise ParameterError(f"class {index} does not exist: choose 0 to {num - 1}")
        return Target("class", index)
    if kind == "patch" and not 0 <= target.index < _num_patches(model):
        raise ParameterError(f"patch {target.index} does not exist: choose 0 to {_num_patches(model) - 1}")
    return Target(kind, target.index)


def describe_target(model: torch.nn.Module, target: Target, logits: torch.Tensor | None) -> str:
    """A person's description of a resolved target, e.g. ``class 207 'golden retriever' (p = 0.83)``."""
    if target.kind == "class":
        names = class_names(model)
        probs = logits.detach().float().softmax(-1)
        c = target.index
        return Prediction(c, names[c] if names else None, float(probs[c]), float(logits[c])).describe()
    if target.kind == "patch":
        gw = int(model.patch_embed.grid_size[1])
        row, col = divmod(target.index, gw)
        return f"patch {target.index}'s own feature (row {row}, column {col})"
    if getattr(model, "dist_token", None) is not None:
        return "the image's own embedding (mean of its CLS and distillation tokens)"
    if getattr(model, "global_pool", "token") != "token":
        return f"the image's own {model.global_pool}-pooled embedding"
    return "the image's own CLS embedding" + (" (pre-logits)" if has_head(model) else "")


def _reference(model: torch.nn.Module, target: Target, out: ModelOutputs) -> torch.Tensor | None:
    """f(x) held constant (detached): the embedding, or patch p's feature; None for a class target."""
    if target.kind == "embedding":
        return out.embedding[0].detach()
    if target.kind == "patch":
        return out.tokens[0, int(model.num_prefix_tokens) + target.index].detach()
    return None


def target_score(model: torch.nn.Module, target: Target, out: ModelOutputs, ref: torch.Tensor | None) -> torch.Tensor:
    """The explained scalar per image (B,): y_c, or ⟨f(x), f(x̃)⟩ with ``ref`` = f(x) (constant)."""
    if target.kind == "class":
        return out.logits[:, target.index]
    if target.kind == "embedding":
        return out.embedding @ ref.to(out.embedding.dtype)
    return out.tokens[:, int(model.num_prefix_tokens) + target.index] @ ref.to(out.tokens.dtype)


# ------------------------------------------------------------------------------------------- differentiable walk


def _attend(attn: torch.nn.Module, x: torch.Tensor, keep: list[torch.Tensor],
            key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm Attention.forward, unfused and differentiable; appends its probabilities (B, H, T, T) to ``keep``.

    ``key_bias`` (B, T), optional: added to every query's logit for each key (b_j = log m_j for a presence m_j;
    -inf removes token j as a key), in every head.
    """
    B, T, _ = x.shape
    gate_proj = getattr(attn, "gate", None)  # newer timm only
    gate = gate_proj(x).sigmoid() if gate_proj is not None else None
    q, k, v = _qkv(attn, x)  # (B, H, T, d) each
    compute = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least, as the capture does
    logits = (q.to(compute) * attn.scale) @ k.to(compute).transpose(-2, -1)  # (B, H, T, T); scale on the smaller q
    if key_bias is not None:
        logits = logits + key_bias.to(compute)[:, None, None, :]
    probs = logits.softmax(-1)
    if not probs.requires_grad:  # weights without requires_grad: our own probabilities are the leaves
        probs.requires_grad_()
    keep.append(probs)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out)


def _block(blk: torch.nn.Module, x: torch.Tensor, keep: list[torch.Tensor],
           key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One block in eval mode, as vitviz.attention's walk, but with autograd through the probabilities."""
    if type(blk) is ResPostBlock:
        x = x + blk.norm1(_attend(blk.attn, x, keep, key_bias))
        return x + blk.norm2(blk.mlp(x))
    x = x + blk.ls1(_attend(blk.attn, blk.norm1(x), keep, key_bias))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def _check_input(model: torch.nn.Module, x: torch.Tensor) -> None:
    check_capturable(model)
    if model.training:
        raise ModelError("the model is in training mode: call model.eval() first (dropout would change the maps)")
    want = tuple(int(v) for v in model.patch_embed.img_size)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or tuple(x.shape[-2:]) != want:
        raise ParameterError(f"expected one image as a (1, 3, {want[0]}, {want[1]}) tensor, got {tuple(x.shape)}")
    if len(model.blocks) == 0:
        raise ModelError("the model has no transformer blocks, so there is no attention to explain")


@dataclass(frozen=True)
class AttentionGradients:
    """One forward and one backward: every layer's attention A_l (H, T, T each) and the gradients of some layers.

    ``gradients_by_layer`` holds ∂s/∂A_l (H, T, T) for l in ``layers``; with ``per_layer`` LeGrad's ∂s_l/∂A_l,
    s_l the target read from layer l's own output tokens. All detached. Kept per layer, as the walk made them: the
    maps read them layer by layer, and ``attention`` / ``gradients`` stack them (a copy) for whoever wants one tensor.
    """

    attention_by_layer: tuple[torch.Tensor, ...]
    gradients_by_layer: tuple[torch.Tensor, ...]
    layers: tuple[int, ...]
    target: Target  # resolved
    score: float  # the target's value s(x) on the image
    outputs: ModelOutputs  # final outputs, detached
    per_layer: bool

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


def attention_gradients(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        target: Target | str = "auto",
        per_layer: bool = False,
        layers: Sequence[int] | None = None,
) -> AttentionGradients:
    """Walk ``model``'s blocks on ``x`` (1, 3, H, W) with autograd, then one ``torch.autograd.grad``.

    ``per_layer=False``: ∇A_l = ∂s/∂A_l, the total derivative of the final target score through every later layer.
    ``per_layer=True`` (LeGrad): each block's input is detached, so A_l reaches nothing but layer l's output, and
    ∂(Σ_l s_l)/∂A_l = ∂s_l/∂A_l exactly, with s_l the target read through the final norm and head from layer l's
    tokens (s_L = s): all layers' gradients from one backward, as LeGrad's L separate backwards would give them.
    ``layers`` (default all; negative from the end): the gradients wanted. The backward then stops at the
    earliest of them (the last layer alone costs about one block's backward).
    """
    _check_input(model, x)
    wanted = _layers(layers, len(model.blocks))
    with torch.inference_mode(False), torch.enable_grad():
        t = embed_tokens(model, x.clone())  # a clone: an inference-mode input cannot be saved for backward
        probs: list[torch.Tensor] = []
        readouts: list[torch.Tensor] = []  # per_layer: layer l's tokens, for the wanted layers before the last
        for layer, blk in enumerate(model.blocks):
            t = _block(blk, t.detach() if per_layer else t, probs)
            if per_layer and layer in wanted and layer < len(model.blocks) - 1:
                readouts.append(t)
        final = head_outputs(model, t)
        resolved = resolve_target(model, target, None if final.logits is None else final.logits[0])
        ref = _reference(model, resolved, final)
        score = target_score(model, resolved, final, ref)[0]
        # s_l of the wanted earlier layers through the same norm and head (s_L is the score itself; with A_L not
        # wanted it contributes nothing to the gradients asked for)
        total = score + sum(target_score(model, resolved, head_outputs(model, o), ref)[0] for o in readouts)
        grads = torch.autograd.grad(total, [probs[i] for i in wanted], allow_unused=True)
    grads = [torch.zeros_like(probs[i]) if g is None else g for i, g in zip(wanted, grads, strict=True)]
    return AttentionGradients(
        attention_by_layer=tuple(p.detach()[0] for p in probs),
        gradients_by_layer=tuple(g.detach()[0] for g in grads),
        layers=wanted,
        target=resolved,
        score=float(score.detach()),
        outputs=ModelOutputs(
            tokens=final.tokens.detach(),
            embedding=final.embedding.detach(),
            logits=None if final.logits is None else final.logits.detach(),
        ),
        per_layer=per_layer,
    )


# ------------------------------------------------------------------------------------------------------- maps


def chefer_map(attention: torch.Tensor | Sequence[torch.Tensor], gradients: torch.Tensor | Sequence[torch.Tensor], *,
               num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Chefer, Gur & Wolf 2021 ("generic attention-model explainability", ICCV), eqs. (5)-(6) with self-attention:

        Ā_l = E_h[(∇A_l ⊙ A_l)⁺],   R⁰ = I,   R^l = R^{l-1} + Ā_l · R^{l-1}   (l = 1..L)

    and the map is R^L's CLS row over the patch tokens. R^L = (I + Ā_L) ··· (I + Ā_1), so only that row is formed,
    as vector–matrix products (O(L·T²)). (L, H, T, T) attention and total gradients (or L tensors of (H, T, T)
    each) -> (gh, gw).
    """
    abar = torch.stack([(g * a).clamp(min=0).mean(dim=0) for a, g in zip(attention, gradients, strict=True)])
    abar.diagonal(dim1=-2, dim2=-1).add_(1.0)  # I + Ā_l, in place on our own tensor
    row = rollout_row(abar, start=0, end=abar.shape[0] - 1, source=0)  # e_CLS · (I+Ā_L) ··· (I+Ā_1): (T,)
    return tokens_to_grid(row, num_prefix_tokens=num_prefix_tokens, grid=grid)


def legrad_map(gradients: torch.Tensor | Sequence[torch.Tensor], *, num_prefix_tokens: int,
               grid: tuple[int, int]) -> torch.Tensor:
    """LeGrad (Bousselham et al. 2024), from per-layer gradients ∇A_l = ∂s_l/∂A_l (K, H, T, T) of the K layers used:

        Ê_l = 1/(H·T) Σ_h Σ_i (∇A_l)⁺[h, i, :],   E = Σ_l Ê_l over the patch columns,   map = min-max(E)

    Follows the paper and the authors' code (WalBouss/LeGrad, ``compute_legrad_clip``): s_l is the target read from
    layer l's tokens through the model's final norm and head (their ``ln_post`` and ``proj``), the gradient is
    taken with respect to layer l's own attention only, clamped at 0, averaged over heads and over every query
    row (CLS, prefix and patch queries), summed over layers and min-max normalised. Departures: s_l reads the
    model's own pooling (the CLS token for token pooling; their CLIP code averages all tokens) and the target
    here is a class logit or ⟨f(x), f_l(x)⟩ rather than a text embedding's similarity; the authors' wrapper
    defaults to the last two layers (``layer_index=-2``), the paper aggregates all layers: the method's
    ``start_layer`` chooses (default 0, all layers). One backward gives every layer's gradient (see
    :func:`attention_gradients`), where the authors run one per layer.
    """
    e = sum(g.clamp(min=0).mean(dim=(0, 1)) for g in gradients)  # (T,): heads and queries averaged, layers summed
    heat = tokens_to_grid(e, num_prefix_tokens=num_prefix_tokens, grid=grid)
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def grad_attention_map(attention: torch.Tensor, gradient: torch.Tensor, *, num_prefix_tokens: int,
                       grid: tuple[int, int]) -> torch.Tensor:
    """Gradient × attention of one layer (the last, as vitviz uses it): A_l and ∇A_l (H, T, T) -> (gh, gw),

        map = CLS row of E_h[(∇A_l ⊙ A_l)⁺] over the patches,

    Chefer et al.'s Ā_l alone, without the propagation through the earlier layers.
    """
    abar_cls = (gradient[:, 0] * attention[:, 0]).clamp(min=0).mean(dim=0)  # (T,)
    return tokens_to_grid(abar_cls, num_prefix_tokens=num_prefix_tokens, grid=grid)


def random_map(grid: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) values from ``numpy.random.default_rng(seed)``: (gh, gw) float32."""
    return np.random.default_rng(seed).random(grid).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the methods


_METHOD_KEYS = {  # what each method reads; the other fields stay at their defaults so a label names one method
    "rollout": ("start_layer", "discard_ratio", "head_fusion"),
    "raw": ("layer", "head_fusion"),
    "chefer": (),
    "legrad": ("start_layer",),
    "gradxattn": (),
    "deletion": ("steps",),
    "random": ("seed",),
}
_SHORT = {"start_layer": "start", "discard_ratio": "discard", "head_fusion": "fusion", "layer": "layer",
          "steps": "steps", "seed": "seed"}


@dataclass(frozen=True)
class Method:
    """A method and its settings; ``label`` writes it as ``name`` or ``name:key=value,...`` (what ``parse`` reads).

    Layers count from 0; negative values count from the end (-1 = the last layer).
    """

    name: MethodName
    start_layer: int = 0  # rollout, legrad: the first layer included (rollout always ends at the last layer)
    discard_ratio: float = 0.0  # rollout
    head_fusion: HeadFusion = "mean"  # rollout, raw
    layer: int = -1  # raw
    steps: int = DELETION_STEPS  # deletion
    seed: int = 0  # random

    def __post_init__(self) -> None:
        if self.name not in _METHOD_KEYS:
            raise ParameterError(f"unknown method {self.name!r}: choose one of {', '.join(METHOD_NAMES)}")
        if self.head_fusion not in FUSIONS:
            raise ParameterError(f"unknown head fusion {self.head_fusion!r}: choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ParameterError(f"discard ratio must be in [0, 1), got {self.discard_ratio}")
        if type(self.steps) is not int or not 2 <= self.steps <= 1024:
            raise ParameterError(f"deletion steps must be a whole number from 2 to 1024, got {self.steps!r}")
        defaults = Method.__dataclass_fields__
        for f in fields(self)[1:]:
            if f.name not in _METHOD_KEYS[self.name] and getattr(self, f.name) != defaults[f.name].default:
                raise ParameterError(f"method {self.name} takes no {_SHORT[f.name]} setting")

    @property
    def label(self) -> str:
        parts = [f"{_SHORT[k]}={getattr(self, k)}" for k in _METHOD_KEYS[self.name]
                 if getattr(self, k) != Method.__dataclass_fields__[k].default]
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def parse(cls, text: str | Method) -> Method:
        """``chefer``, ``legrad:start=-2``, ``rollout:start=1,discard=0.9,fusion=mean``, ``deletion:steps=16``..."""
        if isinstance(text, Method):
            return text
        name, _, rest = str(text).strip().partition(":")
        long = {v: k for k, v in _SHORT.items()}
        kwargs: dict = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in long:
                raise ParameterError(f"method {text!r}: settings are key=value with keys {', '.join(long)}")
            key = long[key.strip()]
            try:
                kwargs[key] = value.strip() if key == "head_fusion" else (
                    float(value) if key == "discard_ratio" else int(value))
            except ValueError:
                raise ParameterError(f"method {text!r}: {_SHORT[key]}={value.strip()!r} is not a number") from None
        return cls(name.strip(), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Explanation:
    """One map (gh, gw) float32 (read-only), what made it and what it explains."""

    map: np.ndarray
    method: Method
    target: Target  # resolved: class (with its index), embedding or patch
    target_description: str  # "class 207 'golden retriever' (p = 0.83)", "the image's own CLS embedding"
    uses_target: bool  # False for attention-only and random maps: the same map for every target
    predictions: tuple[Prediction, ...]  # a classifier's top 5 on this image; () for a model without a head
    seconds: float  # its pass(es) and the map arithmetic
    passes: str  # "1 forward + 1 backward", "1 forward (attention only)", "none"
    notes: tuple[str, ...] = field(default=())


def _layer_index(layer: int, depth: int, what: str) -> int:
    index = layer if layer >= 0 else depth + layer
    if not 0 <= index < depth:
        raise ParameterError(f"{what} {layer} is out of range: the model has layers 0 to {depth - 1}")
    return index


def _plan(methods: Sequence[Method], depth: int) -> list[tuple]:
    """Each method's pass: ("capture",), ("total", layers), ("layer", layers), ("deletion", steps) or ("plain",);
    shared where equal.

    grad×attn needs the last layer's gradient only (a backward through one block) unless Chefer's pass runs
    anyway; every LeGrad variant shares one per-layer pass from the earliest start layer among them.
    """
    chefer = any(m.name == "chefer" for m in methods)
    starts = [_layer_index(m.start_layer, depth, "LeGrad start layer") for m in methods if m.name == "legrad"]
    keys = []
    for m in methods:
        if m.name in ("rollout", "raw"):
            keys.append(("capture",))
        elif m.name == "chefer" or (m.name == "gradxattn" and chefer):
            keys.append(("total", tuple(range(depth))))
        elif m.name == "gradxattn":
            keys.append(("total", (depth - 1,)))
        elif m.name == "legrad":
            keys.append(("layer", tuple(range(min(starts), depth))))
        elif m.name == "deletion":
            keys.append(("deletion", m.steps))
        else:
            keys.append(("plain",))
    return keys


def _passes_text(key: tuple, depth: int) -> str:
    if key[0] == "capture":
        return "1 forward (attention only)"
    if key[0] == "plain":
        return "none"
    if key[0] == "deletion":
        return f"{key[1]} steps, each a forward and a forward + backward pass on the patches left"
    return "1 forward + 1 backward" + (" (through the last layer only)" if key[1] == (depth - 1,) else "")


def _run_pass(model: torch.nn.Module, x: torch.Tensor, key: tuple, target: Target | str,
              progress: Progress | None = None):
    """(attention (L, H, T, T) or None, AttentionGradients or Deletion or None, outputs, resolved target)."""
    if key[0] == "deletion":
        from .deletion import deletion_order  # it builds on this module

        d = deletion_order(model, x, target=target, steps=key[1], progress=progress)
        return None, d, d.outputs, d.target
    if key[0] in ("total", "layer"):
        g = attention_gradients(model, x, target=target, per_layer=key[0] == "layer", layers=key[1])
        return g.attention_by_layer, g, g.outputs, g.target
    if key[0] == "capture":
        cap = attention_forward(model, x, store_device=None)  # (1, L, H, T, T) and the normed features
        with torch.inference_mode():
            feats = cap.features
            out = ModelOutputs(feats, model.forward_head(feats, pre_logits=True),
                               model.forward_head(feats) if has_head(model) else None)
        attn = cap.attention[0]
    else:
        with torch.inference_mode():
            out = head_outputs(model, model.blocks(embed_tokens(model, x)))
        attn = None
    return attn, None, out, resolve_target(model, target, None if out.logits is None else out.logits[0])


def _method_map(model: torch.nn.Module, method: Method, attn: torch.Tensor | None,
                grads) -> torch.Tensor | np.ndarray:
    """The (gh, gw) map of ``method`` from its pass's attention (L, H, T, T) and gradients (or its Deletion)."""
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    p = int(model.num_prefix_tokens)
    depth = len(model.blocks)
    if method.name == "random":
        return random_map(grid, seed=method.seed)
    if method.name == "deletion":
        return grads.map
    if method.name == "rollout":
        # as Settings.layer_range: the default's layer 1 means layer 0 on a one-layer model
        start = 0 if depth == 1 and method.start_layer == 1 else _layer_index(method.start_layer, depth,
                                                                                 "rollout start layer")
        mats = rollout_matrices(attn[start:], head_fusion=method.head_fusion, discard_ratio=method.discard_ratio)
        return tokens_to_grid(rollout_row(mats, start=0, end=depth - start - 1), num_prefix_tokens=p, grid=grid)
    if method.name == "raw":
        layer = _layer_index(method.layer, depth, "raw attention layer")
        rows = cls_attention(attn[layer : layer + 1], head_fusion=method.head_fusion)  # (1, T)
        return tokens_to_grid(rows[0], num_prefix_tokens=p, grid=grid)
    if method.name == "chefer":
        return chefer_map(attn, grads.gradients_by_layer, num_prefix_tokens=p, grid=grid)
    if method.name == "gradxattn":
        last = grads.layers.index(depth - 1)
        return grad_attention_map(attn[-1], grads.gradients_by_layer[last], num_prefix_tokens=p, grid=grid)
    start = _layer_index(method.start_layer, depth, "LeGrad start layer")
    return legrad_map(grads.gradients_by_layer[grads.layers.index(start):], num_prefix_tokens=p, grid=grid)


def _frozen(heat: torch.Tensor | np.ndarray) -> np.ndarray:
    a = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else heat
    a = np.array(a, dtype=np.float32)  # our own copy
    a.flags.writeable = False
    return a


def explain_all(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        methods: Sequence[Method | str],
        target: Target | str = "auto",
        progress: Progress | None = None,
) -> list[Explanation]:
    """Explanations of one target on one image ``x`` (1, 3, H, W) by several methods, sharing their passes.

    Each pass runs only if a method needs it: one attention capture (rollout, raw), one forward + backward for the
    total gradients (Chefer; grad×attn alone backpropagates through the last layer only), one for LeGrad's
    per-layer gradients (all its variants), and greedy deletion's steps (one run per step count; ``progress(i, S)``
    after each of its S steps). Each explanation's ``seconds`` is its pass (a shared pass
    is charged in full to each method using it) plus its map; the random map costs its map only.
    """
    _check_input(model, x)
    methods = [Method.parse(m) for m in methods]
    if not methods:
        raise ParameterError("no methods to explain with")
    depth = len(model.blocks)
    keys = _plan(methods, depth)
    # random maps need no pass: a plain forward resolves the target only when no other method runs a pass
    runs: dict[tuple, tuple] = {}
    for key in [k for k in dict.fromkeys(keys) if k != ("plain",)] or [("plain",)]:
        t0 = time.perf_counter()
        runs[key] = (_run_pass(model, x, key, target, progress), time.perf_counter() - t0)
    (_a, _g, out, resolved), _s = next(iter(runs.values()))
    logits = None if out.logits is None else out.logits[0]
    description = describe_target(model, resolved, logits)
    predictions = top_predictions(logits, names=class_names(model)) if logits is not None else ()
    explanations = []
    for m, key in zip(methods, keys, strict=True):
        (attn, grads, _o, _t), pass_seconds = runs.get(key, ((None, None, None, None), 0.0))
        t0 = time.perf_counter()
        heat = _frozen(_method_map(model, m, attn, grads))
        explanations.append(Explanation(
            map=heat, method=m, target=resolved, target_description=description,
            uses_target=key[0] in ("total", "layer", "deletion"), predictions=predictions,
            seconds=(pass_seconds if m.name != "random" else 0.0) + time.perf_counter() - t0,
            passes=_passes_text(("deletion", grads.sizes.size) if key[0] == "deletion" else key, depth),
        ))
    return explanations


def explain(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        method: Method | str = "chefer",
        target: Target | str = "auto",
        progress: Progress | None = None,
) -> Explanation:
    """One explanation of ``target`` on one image ``x`` (1, 3, H, W): see :func:`explain_all`."""
    return explain_all(model, x, methods=[method], target=target, progress=progress)[0]
