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

Supported blocks (:mod:`._families`): a ViT's ``Block`` (pre-norm) and ``ResPostBlock`` (post-norm) with
``timm.layers.Attention``; Eva's blocks, whose attention turns q and k by a rotary embedding (RoPE) before the
logits; Beit's, whose logits get a relative position bias b_rel (H, T, T) beside the key bias. :func:`check_walkable`
refuses anything else with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock

from ..errors import ModelError
from . import _families as fam
from ._families import Positions, check_family, has_class_token, positions
from .rules import Rules, apply_linear, apply_mlp, apply_norm, gamma_rule

__all__ = ["BLOCKS", "Rules", "Interventions", "BufferProbs", "KeptProbs", "softmax_probs", "check_walkable",
           "check_capturable", "embed", "apply_norm", "apply_linear", "apply_mlp", "gamma_rule", "walk",
           "run_blocks", "pool_attention"]

BLOCKS = (Block, ResPostBlock)


def check_walkable(model: torch.nn.Module) -> None:
    """Raise :class:`ModelError` unless vitviz can walk ``model``'s blocks and read their attention (a model
    without a CLS token is walkable: the gradient methods read its head; the capture's views read its readout,
    :func:`check_capturable`)."""
    check_family(model)


def check_capturable(model: torch.nn.Module) -> str:
    """How ``model``'s head reads its final tokens, the *readout* whose attention the capture's views follow:
    "cls" (the CLS token), "mean" (average pooling of the patch tokens: timm's ``*_gap`` ViTs) or "pool" (an
    attention-pool head, timm's "map": SigLIP's); a :class:`ModelError` unless ``model`` is walkable and reads its
    tokens one of these ways."""
    check_walkable(model)
    if has_class_token(model):
        return "cls"
    name, pool = type(model).__name__, getattr(model, "attn_pool", None)
    if pool is not None:
        if not hasattr(pool, "latent"):  # AttentionPoolPrr: parameter-free self-attention, no latent query
            raise ModelError(f"{name} has no CLS token and pools its tokens with a {type(pool).__name__}, whose "
                             "weights over the tokens vitviz cannot read yet")
        if pool.pool not in ("token", "avg"):  # every latent kept apart: no one summary of the image
            raise ModelError(f"{name} has no CLS token and its attention pool returns its {pool.latent_len} "
                             "latents unpooled, so no one row of weights over the tokens describes what it reads")
        return "pool"
    how = getattr(model, "global_pool", "")
    if how == "avg":
        return "mean"
    raise ModelError(f"{name} has no CLS token and its head pools the tokens by {how or 'nothing'!r}, which no "
                     "weights over the tokens describe: vitviz's views need a CLS token, average pooling or an "
                     "attention pool")


@dataclass(frozen=True)
class Interventions:
    """What the walk changes or watches, all optional; the default walk is the model's own forward.

    ``key_bias`` (B, T): added to every query's logit for key j in every layer and head (b_j = log m_j for a
    presence m_j; -inf removes token j as a key). ``head_scale`` (L, H), or (B, L, H) per sample: multiplies head
    h's output in layer l before the projection (0 ablates it). ``detach_inputs``: each block's input is detached,
    so layer l's attention reaches nothing but layer l's own output (LeGrad's per-layer gradients from one backward).
    ``interrupt``: called before each block; it raises to stop the walk (an abandoned or timed-out job).
    ``rules``: relevance-propagation rules for the backward (:class:`Rules`). ``patches`` (B, K): the sequence holds
    the prefix tokens and these patches only (token removal): Eva's rotary embedding and Beit's relative position
    bias are read at the kept patches' places (a ViT's position embeddings travel with its tokens already).
    """

    key_bias: torch.Tensor | None = None
    head_scale: torch.Tensor | None = None
    detach_inputs: bool = False
    interrupt: Callable[[], None] | None = None
    rules: Rules | None = None
    patches: torch.Tensor | None = None


class BufferProbs:
    """The capture: softmax(q·kᵀ·scale) written in place into ``buf[layer]`` (L, B, H, T, T), no (T, T) temporaries.

    With a ``scratch`` (B, H, T, T) in a wider dtype (fp32 under half-precision storage) the softmax is computed
    there, copied into the buffer, and the block reads the wider one, as it would without storage.
    """

    def __init__(self, buf: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        self.buf, self.scratch = buf, scratch

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                 bias: torch.Tensor | None) -> torch.Tensor:
        out = self.buf[layer] if self.scratch is None else self.scratch
        B, H, T, d = q.shape
        flat = out.view(B * H, T, T)
        q, k = q.reshape(B * H, T, d).to(out.dtype), k.reshape(B * H, T, d).to(out.dtype)
        torch.baddbmm(flat, q, k.transpose(1, 2), beta=0, alpha=scale, out=flat)  # logits straight into the buffer
        if bias is not None:
            out.add_(bias.to(out.dtype))
        torch.ops.aten._softmax.out(out, -1, False, out=out)  # in place
        if self.scratch is not None:
            self.buf[layer].copy_(out)
        return out


class KeptProbs:
    """Autograd: differentiable probabilities (softmax in fp32 at least), kept per layer in ``kept``."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                 bias: torch.Tensor | None) -> torch.Tensor:
        compute = torch.promote_types(q.dtype, torch.float32)
        logits = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)  # (B, H, T, T); scale on the smaller q
        if bias is not None:
            logits = logits + bias.to(compute)
        probs = logits.softmax(-1)
        if not probs.requires_grad:  # weights without requires_grad: our own probabilities are the leaves
            probs.requires_grad_()
        self.kept.append(probs)
        return probs


def softmax_probs(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Differentiable probabilities kept nowhere (softmax in fp32 at least): for walks that read no attention."""
    compute = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.to(compute)
    return logits.softmax(-1)


# probs(layer, q, k, scale, bias): bias an additive logit bias broadcast to (B, H, T, T) (key bias, relative positions)
Probs = Callable[[int, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]


def embed(model: torch.nn.Module, x: torch.Tensor, *, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, C): patch embedding, prefix tokens and position embeddings, as timm's forward does.

    ``pos_embed`` (shaped as ``model.pos_embed``) replaces the model's own position embeddings, e.g. zeros to take
    them away. They are added to the last rows of the sequence in either layout: all tokens (original ViT, DeiT)
    or the patches only (``no_embed_class``, DeiT-3); exact up to one rounding of the swap. Rotary embeddings
    (Eva) and relative position biases (Beit) are not tokens: the walk applies them inside attention.
    """
    t, rows = fam.embed_tokens(model, x)
    if pos_embed is not None:
        own = getattr(model, "pos_embed", None)
        if own is None:
            raise ModelError(f"{type(model).__name__} has no learned absolute position embedding to replace (its "
                             "positions are rotary or relative, inside attention)")
        if tuple(pos_embed.shape) != tuple(own.shape):
            raise ModelError(f"position embeddings of shape {tuple(pos_embed.shape)} do not fit this model's "
                             f"{tuple(own.shape)}")
        t = torch.cat([t[:, :-rows], t[:, -rows:] - own + pos_embed.to(t.dtype)], dim=1)
    if fam.family(model) != "vit":  # Eva drops patches inside _pos_embed; Beit has neither
        return getattr(model, "norm_pre", torch.nn.Identity())(t)
    return model.norm_pre(model.patch_drop(t))


def _qkv(attn: Attention, x: torch.Tensor, rules: Rules | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, C) -> q, k, v, each (B, H, T, d), with the attention's own q/k norms applied."""
    B, T, _ = x.shape
    C = attn.num_heads * attn.head_dim  # the attention's width, which timm lets differ from the tokens'
    if rules is not None and rules.constant_attention and rules.gamma != 0.0:
        # CP-LRP: relevance reaches q and k nowhere (the probabilities are constants), so the γ-rule's second
        # product is needed for the value rows only
        y = attn.qkv(x)
        bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * C:]
        y = torch.cat([y[..., :2 * C], gamma_rule(x, y[..., 2 * C:], attn.qkv.weight[2 * C:], bias, rules.gamma)], -1)
    else:
        y = apply_linear(attn.qkv, x, rules)
    q, k, v = y.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _qkv_of(attn: torch.nn.Module, x: torch.Tensor, layer: int, pos: Positions,
            rules: Rules | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T, d) of any family's attention: Eva's q and k turned by the rotary embedding (then grouped
    k/v heads repeated), a ViT's and Beit's as they are. Under CP-LRP the γ-rule reaches the value rows only (q and k
    carry no relevance there); without CP-LRP all of a ViT's fused qkv."""
    if type(attn) is Attention:
        return _qkv(attn, x, rules)
    q, k, v = fam.qkv(attn, x)
    if rules is not None and rules.constant_attention and rules.gamma != 0.0:
        v = _gamma_values(attn, x, v, rules.gamma)
    q, k = fam.rotate(attn, q, k, pos.rope_of(layer))
    k, v = fam.expand_kv(q, k, v)
    return q, k, v


def _gamma_values(attn: torch.nn.Module, x: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eva's and Beit's v (B, H_kv, T, d), the same values with the γ-rule's backward: the last rows of a fused qkv
    (with Eva's/Beit's own v bias) or the separate v projection."""
    B, H, T, d = v.shape
    if attn.qkv is None:  # separate q/k/v projections
        w, b = attn.v_proj.weight, attn.v_proj.bias
    else:
        w = attn.qkv.weight[-H * d:]
        b = getattr(attn, "v_bias", None)
        b = b if b is not None else None if attn.qkv.bias is None else attn.qkv.bias[-H * d:]
    out = gamma_rule(x, v.transpose(1, 2).reshape(B, T, H * d), w, b, gamma)
    return out.reshape(B, T, H, d).transpose(1, 2)


def _logit_bias(attn: torch.nn.Module, pos: Positions, how: Interventions) -> torch.Tensor | None:
    """What is added to the logits q·kᵀ·scale: Beit's relative position bias (1, H, T, T), the key bias (B, 1, 1, T)."""
    key = None if how.key_bias is None else how.key_bias[:, None, None, :]
    rel = fam.block_bias(attn, pos.shared_bias) if hasattr(attn, "relative_position_bias_table") else None
    if rel is None:
        return key
    rel = pos.bias_of(rel)
    return rel if key is None else rel + key.to(rel.dtype)


def _attention(attn: torch.nn.Module, x: torch.Tensor, layer: int, probs: Probs, how: Interventions,
               pos: Positions) -> torch.Tensor:
    """The attention's forward, unfused, its probabilities made by ``probs``: x (B, T, C) -> (B, T, C)."""
    B, T, _ = x.shape
    gate_proj = getattr(attn, "gate", None)  # newer timm only
    gate = gate_proj(x).sigmoid() if gate_proj is not None else None
    if gate is not None and how.rules is not None and how.rules.constant_attention:
        gate = gate.detach()  # an output gate, like the probabilities, steers what flows: a constant under CP-LRP
    q, k, v = _qkv_of(attn, x, layer, pos, how.rules)
    a = probs(layer, q, k, attn.scale, _logit_bias(attn, pos, how))
    if how.rules is not None and how.rules.constant_attention:
        a = a.detach()
    mixed = a.to(v.dtype) @ v  # (B, H, T, d)
    if how.head_scale is not None:  # (H,) for every sample or (B, H) per sample, over (B, H, T, d)
        s = how.head_scale[layer] if how.head_scale.ndim == 2 else how.head_scale[:, layer]
        mixed = mixed * s.to(mixed.dtype)[..., None, None]
    out = apply_norm(getattr(attn, "norm", _IDENTITY), mixed.transpose(1, 2).reshape(B, T, -1), how.rules)
    if gate is not None:
        out = out * gate
    return apply_linear(attn.proj, out, how.rules)


_IDENTITY = torch.nn.Identity()  # Beit's attention has no norm after the value mixing
_POST_NORM = (ResPostBlock, fam.EvaBlockPostNorm)  # norms after attention and MLP


def _scaled(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if gamma is None else gamma * x  # Eva's and Beit's layer scale γ (a ViT's is a module, ls1/ls2)


def _block(blk: torch.nn.Module, x: torch.Tensor, layer: int, probs: Probs, how: Interventions,
           pos: Positions) -> torch.Tensor:
    r = how.rules
    if type(blk) in _POST_NORM:  # post-norm (ResPostBlock, EvaBlockPostNorm): the norms sit after attention and MLP
        x = x + apply_norm(blk.norm1, _attention(blk.attn, x, layer, probs, how, pos), r)
        return x + apply_norm(blk.norm2, apply_mlp(blk.mlp, x, r), r)
    if type(blk) is Block:
        x = x + blk.ls1(_attention(blk.attn, apply_norm(blk.norm1, x, r), layer, probs, how, pos))
        return x + blk.ls2(apply_mlp(blk.mlp, apply_norm(blk.norm2, x, r), r))
    x = x + _scaled(blk.gamma_1, _attention(blk.attn, apply_norm(blk.norm1, x, r), layer, probs, how, pos))
    return x + _scaled(blk.gamma_2, apply_mlp(blk.mlp, apply_norm(blk.norm2, x, r), r))


def _probs_only(blk: torch.nn.Module, x: torch.Tensor, layer: int, probs: Probs, how: Interventions,
                pos: Positions) -> None:
    """Only ``blk``'s probabilities, from the same input and ops as :func:`_block`; nothing after them."""
    q, k, _v = _qkv_of(blk.attn, x if type(blk) in _POST_NORM else apply_norm(blk.norm1, x, how.rules), layer, pos,
                       how.rules)
    probs(layer, q, k, blk.attn.scale, _logit_bias(blk.attn, pos, how))


def _at_layer(how: Interventions, layer: int) -> Interventions:
    """``how`` with block ``layer``'s rules (the γ-rule may cover some blocks only)."""
    if how.rules is None or how.rules.gamma_blocks is None:
        return how
    return replace(how, rules=how.rules.at(layer))


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
    pos = positions(model, patches=how.patches)  # Eva's RoPE, Beit's shared relative bias: once per walk
    for layer, blk in enumerate(model.blocks):
        if how.interrupt is not None:
            how.interrupt()
        x = tokens.detach() if how.detach_inputs else tokens
        if layer == depth - 1 and not last_block:
            _probs_only(blk, x, layer, probs, how, pos)
            return tokens
        tokens = _block(blk, x, layer, probs, _at_layer(how, layer), pos)
        if taps is not None:
            taps(layer, tokens)
    return tokens


def run_blocks(model: torch.nn.Module, tokens: torch.Tensor, *, patches: torch.Tensor | None = None) -> torch.Tensor:
    """The blocks without reading attention: (B, T, C) -> (B, T, C), un-normed; timm's own fused blocks.

    ``patches`` (B, K): each sequence holds the prefix tokens and these patches only (token removal). A ViT's
    positions travel with its tokens, so its own blocks run as they are; Eva's and Beit's positions live inside
    attention, so their shortened sequences are walked here with the positions read at the kept patches.
    """
    if patches is None or fam.family(model) == "vit":
        return fam.own_blocks(model, tokens)
    return walk(model, tokens, probs=softmax_probs, interventions=Interventions(patches=patches))


def pool_attention(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor | None:
    """An attention-pool head's own attention (timm's "map" pooling, SigLIP's and PE's heads): its latent queries
    over the final normed tokens ``features`` (B, T, C) -> (B, H, Q, T) probabilities, rows summing to 1; None for
    a head that pools otherwise. softmax(q·kᵀ·scale) with q from the learned latent and k from the tokens (plus the
    pool's own position embedding, if any), after its q/k norms, as ``AttentionPoolLatent`` computes them."""
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return None
    B, T, _ = features.shape
    x = features if pool.pos_embed is None else features + pool.pos_embed[None].to(features.dtype)
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim)
    k = pool.kv(x).reshape(B, T, 2, pool.num_heads, pool.head_dim)[:, :, 0]
    q, k = pool.q_norm(q.transpose(1, 2)), pool.k_norm(k.transpose(1, 2))
    return softmax_probs(0, q, k, pool.scale, None)
