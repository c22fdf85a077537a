"""One-pass attention capture for timm Vision Transformers.

The model is never modified: no hook, no flag, no attribute is set on it. The blocks are walked by
:func:`vitviz.walk.blocks.walk` with their own weights, each block's attention probabilities computed explicitly
(softmax(q·kᵀ·scale), after the block's own q/k norms) straight into one preallocated buffer and reused for the block
output, so the capture costs one forward pass and several browser sessions may share one cached model from several
threads. A model without a CLS token (average or attention pooling) is captured the same way, its prefix tokens
(registers) first; what its views read instead of the CLS row is :mod:`vitviz.analysis.readout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import CaptureError, ModelError, ParameterError
from .blocks import BufferProbs, check_capturable, embed, walk

__all__ = ["Capture", "attention_forward", "capture_attention", "check_capturable"]



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
        t = embed(model, x)  # (B, T, D)
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
        taps = None if kept is None else (lambda layer, out: kept[layer].copy_(out))
        t = walk(model, t, probs=BufferProbs(buf, scratch), taps=taps, last_block=features or tokens)
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
