"""One-pass attention capture for timm Vision Transformers.

The model is never modified: no hook, no flag, no attribute is set on it. Instead we walk its blocks ourselves
with their own weights, computing each block's attention probabilities explicitly (softmax(q·kᵀ·scale), after the
block's own q/k norms) and reusing them for the block output, so the capture costs one forward pass and several
browser sessions may share one cached model from several threads.

Supported blocks are timm's pre-norm ``Block`` and post-norm ``ResPostBlock`` with the standard ``Attention``
module; anything else is refused by :func:`check_capturable` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from .errors import CaptureError, ModelError, ParameterError

__all__ = ["Capture", "attention_forward", "capture_attention", "check_capturable"]

_BLOCKS = (Block, ResPostBlock)


def check_capturable(model: torch.nn.Module) -> None:
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
        if type(blk) not in _BLOCKS or type(blk.attn) is not Attention:
            raise ModelError(
                f"block {i} of {name} is a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}: "
                "vitviz reads attention from timm Block/ResPostBlock with the standard Attention only"
            )


def _probs_into(q: torch.Tensor, k: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale) written into ``out`` (B, H, T, T), in ``out``'s dtype (fp32 under half weights)."""
    B, H, T, d = q.shape
    flat = out.view(B * H, T, T)
    q, k = q.reshape(B * H, T, d).to(out.dtype), k.reshape(B * H, T, d).to(out.dtype)
    torch.baddbmm(flat, q, k.transpose(1, 2), beta=0, alpha=scale, out=flat)  # logits straight into the buffer
    return torch.ops.aten._softmax.out(out, -1, False, out=out)  # in place: no (T, T) temporaries


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, C) -> q, k, v, each (B, H, T, d), with the attention's own q/k norms applied."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attention(attn: Attention, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """timm Attention.forward, unfused, writing the probabilities into ``probs``: x (B, T, C) -> (B, T, C)."""
    B, T, _ = x.shape
    gate_proj = getattr(attn, "gate", None)  # newer timm only
    gate = gate_proj(x).sigmoid() if gate_proj is not None else None
    q, k, v = _qkv(attn, x)
    _probs_into(q, k, attn.scale, probs)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out)


def _last_probs(blk: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> None:
    """Only ``blk``'s probabilities, from the same input and ops as :func:`_block`; nothing after them."""
    q, k, _v = _qkv(blk.attn, x if type(blk) is ResPostBlock else blk.norm1(x))
    _probs_into(q, k, blk.attn.scale, probs)


def _block(blk: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """One block in eval mode (drop-path and dropout are identities there)."""
    if type(blk) is ResPostBlock:
        x = x + blk.norm1(_attention(blk.attn, x, probs))
        return x + blk.norm2(blk.mlp(x))
    x = x + blk.ls1(_attention(blk.attn, blk.norm1(x), probs))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def _walk(blocks, t: torch.Tensor, buf: torch.Tensor, *, scratch: torch.Tensor | None, kept: torch.Tensor | None,
          last_block: bool) -> torch.Tensor:
    """Every block on t (B, T, C), its probabilities into buf[layer] (through ``scratch`` when that is given) and
    its output into kept[layer] (when given); without ``last_block``, only the last layer's probabilities."""
    for layer, blk in enumerate(blocks):
        probs = buf[layer] if scratch is None else scratch
        if layer == len(blocks) - 1 and not last_block:
            _last_probs(blk, t, probs)
        else:
            t = _block(blk, t, probs)
            if kept is not None:
                kept[layer].copy_(t)
        if scratch is not None:
            buf[layer].copy_(scratch)
    return t


@dataclass(frozen=True)
class Capture:
    """What one pass yields. ``attention`` is (B, L, H, T, T), rows sum to 1; ``features`` the normed tokens.

    ``tokens`` is (B, L, T, D): every block's output before the final norm, prefix tokens (CLS, registers,
    distillation token) first as timm orders them: what ``model.forward_intermediates(x, norm=False)`` returns per
    block, with its prefix and patch tokens put back together.
    """

    attention: torch.Tensor
    features: torch.Tensor | None  # None when asked for attention only
    tokens: torch.Tensor | None = None  # None unless asked for


def _check_input(model: VisionTransformer, x: torch.Tensor) -> None:
    check_capturable(model)
    if model.training:
        raise ModelError("the model is in training mode: call model.eval() first (dropout would change attention)")
    want = tuple(int(v) for v in model.patch_embed.img_size)
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != want:
        raise ParameterError(f"expected images as a (B, 3, {want[0]}, {want[1]}) tensor, got {tuple(x.shape)}")


def attention_forward(
        model: VisionTransformer,
        x: torch.Tensor,
        *,
        store_dtype: torch.dtype = torch.float32,
        store_device: torch.device | str | None = "cpu",
        features: bool = True,
        tokens: bool = False,
) -> Capture:
    """Run ``model`` on ``x`` (B, 3, H, W) once, returning every layer's attention probabilities and the features.

    Equivalent to ``model.forward_features(x)`` in eval mode. Nothing is attached to the model, so this is safe to
    call from several threads on one shared model. ``store_device=None`` keeps the attention where it was made.
    ``features=False`` stops as soon as the last layer's probabilities exist: that layer's value mixing,
    projection and MLP (and the final norm) feed nothing but the features, so skipping them saves about 3/4 of a
    block (6% of a 12-block pass). ``tokens=True`` also keeps every block's output (B, L, T, D) from the same pass,
    in ``store_dtype`` on ``store_device`` like the attention; then the last block always runs to its end.
    """
    _check_input(model, x)
    with torch.inference_mode():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))  # (B, T, D)
        if len(model.blocks) == 0:
            raise CaptureError("the model has no transformer blocks, so there is no attention to capture")
        B, T, _ = t.shape
        depth, heads = len(model.blocks), model.blocks[0].attn.num_heads
        # one buffer for every layer's probabilities: (L, B, H, T, T); softmax is computed in fp32 at least
        buf = torch.empty((depth, B, heads, T, T), device=t.device, dtype=store_dtype)
        compute = torch.promote_types(store_dtype, torch.float32)
        scratch = None if compute == store_dtype else torch.empty(buf.shape[1:], device=t.device, dtype=compute)
        # every block's output: (L, B, T, D), filled as the walk goes (no list of tensors to stack afterwards)
        kept = torch.empty((depth, *t.shape), device=t.device, dtype=store_dtype) if tokens else None
        t = _walk(model.blocks, t, buf, scratch=scratch, kept=kept, last_block=features or tokens)
        attention, outputs = buf.transpose(0, 1), None  # (B, L, H, T, T), a view
        if kept is not None:
            outputs = kept.transpose(0, 1)  # (B, L, T, D), a view
        if store_device is not None:
            attention = attention.to(store_device)
            outputs = outputs.to(store_device) if outputs is not None else None
        return Capture(attention=attention, features=model.norm(t) if features else None, tokens=outputs)


def capture_attention(model: VisionTransformer, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Shorthand for ``attention_forward(model, x).attention`` of a single image: (L, H, T, T)."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ParameterError(f"expected one image as a (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
    return attention_forward(model, x, **kwargs).attention[0]
