"""The one walk of a timm Vision Transformer's blocks; every intervention is an argument, nothing is set on the model.

Everything in vitviz that runs a ViT's blocks itself runs them here: the one-pass capture (probabilities written into
preallocated buffers, :class:`BufferProbs`), the gradient methods (probabilities kept for autograd,
:class:`KeptProbs`), greedy deletion (a key bias on the attention logits) and whoever needs a head removed
(a per-head scale). No hook, flag or attribute touches the model, so several threads may walk one shared model.

A block is computed as timm's own ``Block.forward`` / ``ResPostBlock.forward`` in eval mode (drop-path and dropout
are identities there) with the standard ``Attention`` unfused:

    q, k, v = qkv(x) split into heads, with the attention's own q/k norms
    A = softmax(q·kᵀ·scale + b)          b: an optional key bias (B, T), added to every query's logit for key j
    out = proj(norm(A·v ⊙ gate))         each head's slice of A·v scaled by s_{l,h} when a head scale is given

Relevance propagation (AttnLRP, Achtibat et al. 2024, and its CP-LRP variant) is input × gradient of a walk whose
backward follows rules instead of the chain rule: :class:`Rules` makes the softmax probabilities, the normalisation
statistics and the activation's slope constants of the backward (the forward values are unchanged).

Supported blocks are ``Block`` (pre-norm) and ``ResPostBlock`` (post-norm) with ``timm.layers.Attention``;
:func:`check_walkable` refuses anything else with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from ..errors import ModelError

__all__ = ["BLOCKS", "Rules", "Interventions", "BufferProbs", "KeptProbs", "softmax_probs", "check_walkable", "embed",
           "apply_norm", "walk"]

BLOCKS = (Block, ResPostBlock)


def check_walkable(model: torch.nn.Module) -> None:
    """Raise :class:`ModelError` unless vitviz can walk ``model``'s blocks and read their attention."""
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"{name} is not a plain Vision Transformer: vitviz needs a timm VisionTransformer "
            "(global self-attention over patch tokens with absolute position embeddings)"
        )
    if getattr(model, "pos_embed", None) is None:
        raise ModelError(f"{name} has no absolute position embedding (relative or rotary positions are not supported)")
    if not model.has_class_token:
        raise ModelError(f"{name} has no CLS token, so there is no CLS attention to roll out")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in BLOCKS or type(blk.attn) is not Attention:
            raise ModelError(
                f"block {i} of {name} is a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}: "
                "vitviz reads attention from timm Block/ResPostBlock with the standard Attention only"
            )


@dataclass(frozen=True)
class Rules:
    """Backward rules of relevance propagation, as constants in the backward (the forward is unchanged).

    ``constant_attention``: the softmax probabilities A are constants, so relevance flows through the values only
    (CP-LRP, Ali et al. 2022; AttnLRP's recommendation for ViTs). ``constant_norms``: a LayerNorm's 1/σ is a
    constant, the centring stays (the identity rule for normalisation). ``identity_activations``: GELU/SiLU pass
    relevance on unchanged, y = x · (f(x)/x) with the ratio constant (the identity rule).
    """

    constant_attention: bool = True
    constant_norms: bool = True
    identity_activations: bool = True


@dataclass(frozen=True)
class Interventions:
    """What the walk changes or watches, all optional; the default walk is the model's own forward.

    ``key_bias`` (B, T): added to every query's logit for key j in every layer and head (b_j = log m_j for a
    presence m_j; -inf removes token j as a key). ``head_scale`` (L, H), or (B, L, H) per sample: multiplies head
    h's output in layer l before the projection (0 ablates it). ``detach_inputs``: each block's input is detached,
    so layer l's attention reaches nothing but layer l's own output (LeGrad's per-layer gradients from one backward).
    ``interrupt``: called before each block; it raises to stop the walk (an abandoned or timed-out job).
    ``rules``: relevance-propagation rules for the backward (:class:`Rules`).
    """

    key_bias: torch.Tensor | None = None
    head_scale: torch.Tensor | None = None
    detach_inputs: bool = False
    interrupt: Callable[[], None] | None = None
    rules: Rules | None = None


class BufferProbs:
    """The capture: softmax(q·kᵀ·scale) written in place into ``buf[layer]`` (L, B, H, T, T), no (T, T) temporaries.

    With a ``scratch`` (B, H, T, T) in a wider dtype (fp32 under half-precision storage) the softmax is computed
    there, copied into the buffer, and the block reads the wider one, as it would without storage.
    """

    def __init__(self, buf: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        self.buf, self.scratch = buf, scratch

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                 key_bias: torch.Tensor | None) -> torch.Tensor:
        out = self.buf[layer] if self.scratch is None else self.scratch
        B, H, T, d = q.shape
        flat = out.view(B * H, T, T)
        q, k = q.reshape(B * H, T, d).to(out.dtype), k.reshape(B * H, T, d).to(out.dtype)
        torch.baddbmm(flat, q, k.transpose(1, 2), beta=0, alpha=scale, out=flat)  # logits straight into the buffer
        if key_bias is not None:
            out.add_(key_bias.to(out.dtype)[:, None, None, :])
        torch.ops.aten._softmax.out(out, -1, False, out=out)  # in place
        if self.scratch is not None:
            self.buf[layer].copy_(out)
        return out


class KeptProbs:
    """Autograd: differentiable probabilities (softmax in fp32 at least), kept per layer in ``kept``."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                 key_bias: torch.Tensor | None) -> torch.Tensor:
        compute = torch.promote_types(q.dtype, torch.float32)
        logits = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)  # (B, H, T, T); scale on the smaller q
        if key_bias is not None:
            logits = logits + key_bias.to(compute)[:, None, None, :]
        probs = logits.softmax(-1)
        if not probs.requires_grad:  # weights without requires_grad: our own probabilities are the leaves
            probs.requires_grad_()
        self.kept.append(probs)
        return probs


def softmax_probs(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                  key_bias: torch.Tensor | None) -> torch.Tensor:
    """Differentiable probabilities kept nowhere (softmax in fp32 at least): for walks that read no attention."""
    compute = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)
    if key_bias is not None:
        logits = logits + key_bias.to(compute)[:, None, None, :]
    return logits.softmax(-1)


Probs = Callable[[int, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]


def embed(model: torch.nn.Module, x: torch.Tensor, *, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, C): patch embedding, prefix tokens and position embeddings, as timm's forward does.

    ``pos_embed`` (shaped as ``model.pos_embed``) replaces the model's own position embeddings, e.g. zeros to take
    them away. They are added to the last rows of the sequence in either layout: all tokens (original ViT, DeiT)
    or the patches only (``no_embed_class``, DeiT-3); exact up to one rounding of the swap.
    """
    t = model._pos_embed(model.patch_embed(x))
    if pos_embed is not None:
        own = model.pos_embed
        if tuple(pos_embed.shape) != tuple(own.shape):
            raise ModelError(f"position embeddings of shape {tuple(pos_embed.shape)} do not fit this model's "
                             f"{tuple(own.shape)}")
        rows = own.shape[1]
        t = torch.cat([t[:, :-rows], t[:, -rows:] - own + pos_embed.to(t.dtype)], dim=1)
    return model.norm_pre(model.patch_drop(t))


def apply_norm(norm: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """``norm(x)``; under ``constant_norms`` a LayerNorm's 1/σ is a constant of the backward."""
    if rules is None or not rules.constant_norms or isinstance(norm, torch.nn.Identity):
        return norm(x)
    if not isinstance(norm, torch.nn.LayerNorm):
        raise ModelError(f"relevance propagation has no rule for a {type(norm).__name__} normalisation yet")
    centred = x - x.mean(-1, keepdim=True)
    sigma = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt().detach()
    y = centred / sigma
    return y * norm.weight + norm.bias if norm.elementwise_affine else y


def _activation(act: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """``act(x)``; under ``identity_activations``, x · (act(x)/x) with the ratio a constant of the backward."""
    y = act(x)
    if rules is None or not rules.identity_activations:
        return y
    ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x))
    return x * ratio.detach()


def _mlp(mlp: torch.nn.Module, x: torch.Tensor, rules: Rules | None) -> torch.Tensor:
    """timm ``Mlp.forward`` (fc1, act, norm, fc2; dropouts are identities in eval mode), with the rules."""
    if rules is None:
        return mlp(x)
    if not hasattr(mlp, "fc1") or not hasattr(mlp, "act"):
        raise ModelError(f"relevance propagation has no rule for a {type(mlp).__name__} MLP yet")
    return mlp.fc2(apply_norm(mlp.norm, _activation(mlp.act, mlp.fc1(x), rules), rules))


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, C) -> q, k, v, each (B, H, T, d), with the attention's own q/k norms applied."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attention(attn: Attention, x: torch.Tensor, layer: int, probs: Probs, how: Interventions) -> torch.Tensor:
    """timm Attention.forward, unfused, its probabilities made by ``probs``: x (B, T, C) -> (B, T, C)."""
    B, T, _ = x.shape
    gate_proj = getattr(attn, "gate", None)  # newer timm only
    gate = gate_proj(x).sigmoid() if gate_proj is not None else None
    q, k, v = _qkv(attn, x)
    a = probs(layer, q, k, attn.scale, how.key_bias)
    if how.rules is not None and how.rules.constant_attention:
        a = a.detach()
    mixed = a.to(v.dtype) @ v  # (B, H, T, d)
    if how.head_scale is not None:  # (H,) for every sample or (B, H) per sample, over (B, H, T, d)
        s = how.head_scale[layer] if how.head_scale.ndim == 2 else how.head_scale[:, layer]
        mixed = mixed * s.to(mixed.dtype)[..., None, None]
    out = apply_norm(attn.norm, mixed.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim), how.rules)
    if gate is not None:
        out = out * gate
    return attn.proj(out)


def _block(blk: torch.nn.Module, x: torch.Tensor, layer: int, probs: Probs, how: Interventions) -> torch.Tensor:
    r = how.rules
    if type(blk) is ResPostBlock:  # post-norm (ResPostBlock): the norms sit after attention and MLP
        x = x + apply_norm(blk.norm1, _attention(blk.attn, x, layer, probs, how), r)
        return x + apply_norm(blk.norm2, _mlp(blk.mlp, x, r), r)
    x = x + blk.ls1(_attention(blk.attn, apply_norm(blk.norm1, x, r), layer, probs, how))
    return x + blk.ls2(_mlp(blk.mlp, apply_norm(blk.norm2, x, r), r))


def _probs_only(blk: torch.nn.Module, x: torch.Tensor, layer: int, probs: Probs, how: Interventions) -> None:
    """Only ``blk``'s probabilities, from the same input and ops as :func:`_block`; nothing after them."""
    q, k, _v = _qkv(blk.attn, x if type(blk) is ResPostBlock else apply_norm(blk.norm1, x, how.rules))
    probs(layer, q, k, blk.attn.scale, how.key_bias)


def walk(
        model: torch.nn.Module,
        tokens: torch.Tensor,
        *,
        probs: Probs,
        interventions: Interventions = Interventions(),
        taps: Callable[[int, torch.Tensor], None] | None = None,
        last_block: bool = True,
) -> torch.Tensor:
    """Every block of ``model`` on ``tokens`` (B, T, C) -> the last block's output (B, T, C), un-normed.

    ``probs`` makes each layer's attention probabilities (:class:`BufferProbs`, :class:`KeptProbs`);
    ``taps(layer, output)`` sees every block's output; without ``last_block`` the last block stops once its
    probabilities exist (its value mixing, projection and MLP feed nothing but the features), and the tokens
    entering it are returned.
    """
    how, depth = interventions, len(model.blocks)
    for layer, blk in enumerate(model.blocks):
        if how.interrupt is not None:
            how.interrupt()
        x = tokens.detach() if how.detach_inputs else tokens
        if layer == depth - 1 and not last_block:
            _probs_only(blk, x, layer, probs, how)
            return tokens
        tokens = _block(blk, x, layer, probs, how)
        if taps is not None:
            taps(layer, tokens)
    return tokens
