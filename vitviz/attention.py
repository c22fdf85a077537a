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


def _attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention.forward, unfused, also returning the probabilities: x (B, T, C) -> (B, T, C), (B, H, T, T)."""
    B, T, _ = x.shape
    gate_proj = getattr(attn, "gate", None)  # newer timm only
    gate = gate_proj(x).sigmoid() if gate_proj is not None else None
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, T, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    probs = logits.float().softmax(dim=-1)  # softmax in fp32 also under half precision
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out), probs


def _block(blk: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block in eval mode (drop-path and dropout are identities there)."""
    if type(blk) is ResPostBlock:
        y, probs = _attention(blk.attn, x)
        x = x + blk.norm1(y)
        return x + blk.norm2(blk.mlp(x)), probs
    y, probs = _attention(blk.attn, blk.norm1(x))
    x = x + blk.ls1(y)
    return x + blk.ls2(blk.mlp(blk.norm2(x))), probs


@dataclass(frozen=True)
class Capture:
    """What one pass yields. ``attention`` is (B, L, H, T, T), rows sum to 1; ``features`` the normed tokens."""

    attention: torch.Tensor
    features: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.attention.shape[1]


def attention_forward(
        model: VisionTransformer,
        x: torch.Tensor,
        *,
        store_dtype: torch.dtype = torch.float32,
        store_device: torch.device | str | None = "cpu",
) -> Capture:
    """Run ``model`` on ``x`` (B, 3, H, W) once, returning every layer's attention probabilities and the features.

    Equivalent to ``model.forward_features(x)`` in eval mode. Nothing is attached to the model, so this is safe to
    call from several threads on one shared model. ``store_device=None`` keeps the attention where it was made.
    """
    check_capturable(model)
    if model.training:
        raise ModelError("the model is in training mode: call model.eval() first (dropout would change attention)")
    want = tuple(int(v) for v in model.patch_embed.img_size)
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != want:
        raise ParameterError(f"expected images as a (B, 3, {want[0]}, {want[1]}) tensor, got {tuple(x.shape)}")
    layers = []
    with torch.inference_mode():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.patch_drop(t)
        t = model.norm_pre(t)
        for blk in model.blocks:
            t, probs = _block(blk, t)
            layers.append(probs.to(device=store_device or probs.device, dtype=store_dtype))
        t = model.norm(t)
    if not layers:
        raise CaptureError("the model has no transformer blocks, so there is no attention to capture")
    return Capture(attention=torch.stack(layers, dim=1), features=t)


def capture_attention(model: VisionTransformer, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Shorthand for ``attention_forward(model, x).attention`` of a single image: (L, H, T, T)."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ParameterError(f"expected one image as a (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
    return attention_forward(model, x, **kwargs).attention[0]
