"""Attention rollout from the CLS token (Abnar & Zuidema, 2020) and raw per-layer CLS attention.

Per layer l the heads are fused (mean / max / min, or one head), the weakest entries may be discarded, the
identity is added for the residual path and rows are re-normalised:

    Â_l = norm_rows(discard(fuse(A_l)) + I)

and rollout over layers a..b is the CLS row of Â_b · Â_{b-1} ··· Â_a (the paper's Ã(l) = Â(l)·Ã(l-1): the CLS token
after layer b draws on the tokens after layer b-1 through Â_b, and so on down to the input of layer a). Only that row
is needed, so it is computed as vector–matrix products (O(L·T²)) — and every (a, b) range the layer control can
reach comes from one sweep.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import ParameterError

__all__ = [
    "HeadFusion",
    "fuse_heads",
    "discard_lowest",
    "rollout_matrices",
    "rollout_row",
    "rollout_all",
    "cls_attention",
    "readout_row",
    "tokens_to_grid",
    "check_layer_range",
]

HeadFusion = Literal["mean", "max", "min"]
FUSIONS = ("mean", "max", "min")


def _per_layer(attn: torch.Tensor, op, dtype: torch.dtype) -> torch.Tensor:
    """``op(a, out=...)`` over heads of ``attn`` in ``dtype``: (..., H, T, T) -> (..., T, T).

    A half capture is converted one layer at a time into one reused fp32 scratch, and every layer's result written
    into one output: no full fp32 copy, and no fresh pages per layer (faulting in fresh memory costs as much as
    the arithmetic here: 19 -> 12 ms for the mean of 12 x 6 x 785² fp16 probabilities).
    """
    if attn.requires_grad and torch.is_grad_enabled():  # autograd cannot write into out=: plain ops
        return op(attn.to(dtype), out=None)
    out = torch.empty(attn.shape[:-3] + attn.shape[-2:], dtype=dtype, device=attn.device)
    if attn.dtype == dtype or attn.ndim < 4:
        op(attn.to(dtype), out=out)
        return out
    scratch = torch.empty(attn.shape[1:], dtype=dtype, device=attn.device)
    for layer, o in zip(attn, out, strict=True):
        op(scratch.copy_(layer), out=o)
    return out


def fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion | int = "mean") -> torch.Tensor:
    """(..., H, T, T) -> (..., T, T) in fp32 or better: mean, max or min over heads, or one head by index."""
    dtype = torch.promote_types(attn.dtype, torch.float32)
    if isinstance(head_fusion, int) and not isinstance(head_fusion, bool):
        num_heads = attn.shape[-3]
        if not 0 <= head_fusion < num_heads:
            raise ParameterError(f"head {head_fusion} does not exist: choose 0 to {num_heads - 1}")
        return attn[..., head_fusion, :, :].to(dtype)
    ops = {
        "mean": lambda a, out: torch.mean(a, dim=-3, out=out),
        "max": lambda a, out: torch.amax(a, dim=-3, out=out),
        "min": lambda a, out: torch.amin(a, dim=-3, out=out),
    }
    if head_fusion not in ops:
        raise ParameterError(f"unknown head fusion {head_fusion!r}: choose mean, max, min or a head index")
    return _per_layer(attn, ops[head_fusion], dtype)


def discard_lowest(a: torch.Tensor, ratio: float, *, keep_column: int | None = 0) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each (T, T) matrix's entries, never touching column ``keep_column`` (CLS; None:
    no column is kept, for a model without a CLS token).

    The count is ``int(ratio * T * (T - 1))`` of the T·(T-1) candidate entries (``int(ratio * T * T)`` of all T·T
    without a kept column), per matrix (per sample, per layer). Equal values at the threshold are dropped in
    row-major order, so the result does not depend on a sort's whims. Finding the threshold is a selection
    (``np.partition``, linear time), not a sort or a top-k.
    """
    if not 0.0 <= ratio < 1.0:
        raise ParameterError(f"discard ratio must be in [0, 1), got {ratio}")
    T = a.shape[-1]
    num = int(ratio * T * (T - 1 if keep_column is not None else T))
    if num == 0:
        return a
    out = a.reshape(-1, T, T).clone(memory_format=torch.contiguous_format)  # (M, T, T), our own, viewable flat
    keep = slice(0, 0) if keep_column is None else keep_column  # an empty slice: no column protected
    cls = out[:, :, keep].clone()
    out[:, :, keep] = float("inf")  # protected: never below the threshold (NaN neither: it selects last)
    flat = out.view(-1, T * T)
    vals = flat.detach().to("cpu", torch.promote_types(flat.dtype, torch.float32))  # exact; any device, bf16 too
    thr = torch.from_numpy(_nth_lowest(vals.numpy(), num - 1)).to(flat)  # (M, 1)
    drop = flat <= thr
    drop.view(-1, T, T)[:, :, keep] = False  # even where real entries are +inf and so is the threshold
    extra = np.count_nonzero(drop.cpu().numpy(), axis=-1) - num  # > 0 where more values equal the threshold than needed
    for m in np.flatnonzero(extra > 0).tolist():
        ties = (drop[m] & (flat[m] == thr[m])).nonzero().flatten()
        drop[m, ties[len(ties) - int(extra[m]) :]] = False  # keep the last ones: the first are dropped
    flat.masked_fill_(drop, 0.0)
    out[:, :, keep] = cls
    return out.view(a.shape)


def _nth_lowest(vals: np.ndarray, n: int) -> np.ndarray:
    """(M, K) -> (M, 1): each row's n-th lowest value (0-based), by selection.

    Non-negative floats (attention) order like their bit patterns read as integers, and integer selection is twice
    as fast (785 tokens, 12 layers: 9.6 vs 20.7 ms); other values (negatives, NaN of either sign) are selected as
    floats, where NaN sorts last.
    """
    ints = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}.get(vals.dtype)
    if ints is None or not (vals >= 0).all():
        return np.partition(vals, n, axis=-1)[:, n : n + 1]
    return np.partition(vals.view(ints), n, axis=-1)[:, n : n + 1].view(vals.dtype)


def rollout_matrices(
        attn: torch.Tensor,
        *,
        head_fusion: HeadFusion | int = "mean",
        discard_ratio: float = 0.0,
        keep_column: int | None = 0,
        drop_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """(L, H, T, T) attention -> (L, T, T) row-stochastic Â_l = norm_rows(discard(fuse(A_l)) + I).

    ``drop_tokens`` (artefact-aware rollout): a bool mask of tokens to leave out, (T,) for every layer or (L, T)
    per layer. Their columns of each fused layer are zeroed and the rows renormalised before the discard,
    A'_l = norm_rows(fuse(A_l) · (1 - m_l)), so no other token draws on them and the rollout gives them no mass;
    the zeroed entries count among the discarded ones (they are the lowest). ``keep_column``: the CLS token's
    column, never discarded nor dropped; None for a model without one.
    """
    a = fuse_heads(attn, head_fusion)
    if isinstance(head_fusion, int):
        a = a.clone()  # one fp32 head may be a view of the caller's (shared) capture: never change it in place
    if drop_tokens is not None:
        a = _drop_columns(a, drop_tokens, keep_column=keep_column)
    a = discard_lowest(a, discard_ratio, keep_column=keep_column)
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)  # + I, in place on our own tensor
    return a.div_(a.sum(dim=-1, keepdim=True))


def _drop_columns(a: torch.Tensor, drop: torch.Tensor, *, keep_column: int | None) -> torch.Tensor:
    """Zero the ``drop`` columns of (..., L, T, T) fused layers, in place, and renormalise their rows."""
    T = a.shape[-1]
    L = a.shape[-3] if a.ndim >= 3 else 1
    drop = torch.as_tensor(drop, device=a.device)
    if drop.dtype != torch.bool or drop.shape not in ((T,), (L, T)):
        raise ParameterError(f"tokens to drop must be a bool mask of shape ({T},) or ({L}, {T}), got "
                             f"{drop.dtype} {tuple(drop.shape)}")
    if keep_column is not None and drop[..., keep_column].any():
        raise ParameterError(f"token {keep_column % T} (the CLS token) cannot be left out of the rollout")
    m = drop.reshape(-1, 1, T) if drop.ndim == 2 else drop  # (L, 1, T) or (T,): broadcast over the rows
    a.masked_fill_(m, 0.0)  # our own tensor (fuse_heads made it, or the clone of one head)
    # a softmax row is positive, so with the CLS column kept a row sums to 0 only if fp16 storage underflowed it (or,
    # without a CLS token, if every token it attends to is dropped): such a row stays 0 and becomes the identity's
    # (the token keeps itself) after + I
    return a.div_(a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny))


def check_layer_range(start: int, end: int, num_layers: int) -> None:
    if not (0 <= start < num_layers and 0 <= end < num_layers):
        raise ParameterError(f"layers must be in 0 to {num_layers - 1} (got {start} to {end})")
    if start > end:
        raise ParameterError(f"the layer range is reversed: start {start} is after end {end}")


def rollout_row(mats: torch.Tensor, *, start: int, end: int, source: int | torch.Tensor = 0) -> torch.Tensor:
    """Row ``source`` of Â_end ··· Â_start (inclusive), from (L, T, T) rollout matrices: (T,). A (T,) ``source``
    weights the rows (w · Â_end ··· Â_start): a read-out that averages several tokens."""
    check_layer_range(start, end, mats.shape[0])
    r = mats[end, source] if isinstance(source, int) else source.to(mats.dtype) @ mats[end]  # after layer `end`
    for layer in range(end - 1, start - 1, -1):  # back towards the input of layer `start`
        r = r @ mats[layer]
    return r


def rollout_all(mats: torch.Tensor, *, source: int | torch.Tensor = 0) -> torch.Tensor:
    """Every range at once: (L, T, T) -> (L, L, T) with [a, b] = rollout over a..b for a <= b, NaN for a > b.

    Sweeping the start a downward, the rows of all ends b >= a advance together: one (L-a-1, T)·(T, T) product
    per layer. After step a, rows[b] = e_source · Â_b ··· Â_a; a (T,) ``source`` is a readout's weights w over the
    rows (:mod:`.readout`): rows[b] = w · Â_b ··· Â_a.
    """
    L, T, _ = mats.shape
    out = torch.full((L, L, T), float("nan"), dtype=mats.dtype, device=mats.device)
    # rows[b] starts as the rollout over b..b: the source row of Â_b
    rows = mats[:, source, :].clone() if isinstance(source, int) else readout_row(mats, source).to(mats.dtype)
    for a in range(L - 1, -1, -1):
        if a < L - 1:
            rows[a + 1 :] = rows[a + 1 :] @ mats[a]
        out[a, a:] = rows[a:]
    return out


def cls_attention(attn: torch.Tensor, *, head_fusion: HeadFusion | int = "mean",
                  source: int | torch.Tensor = 0) -> torch.Tensor:
    """Raw attention of the ``source`` token per layer: (L, H, T, T) -> (L, T), no identity, no rollout. A (T,)
    ``source`` is a readout's weights w: each head's w·A_h, then the heads fused."""
    rows = attn[..., source, :] if isinstance(source, int) else readout_row(attn, source)  # (L, H, T)
    return fuse_heads(rows.unsqueeze(-2), head_fusion)[..., 0, :]  # (L, H, 1, T) -> (L, T)


def readout_row(matrices: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The readout's row of (..., T, T) matrices -> (..., T): row 0 as it is for ``weights`` None (the CLS token),
    else w·M in fp32 at least (one (T, T) matrix at a time, so a half capture is never copied whole)."""
    if weights is None:
        return matrices[..., 0, :]
    dtype = torch.promote_types(matrices.dtype, torch.float32)
    w = weights.to(device=matrices.device, dtype=dtype)
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    out = torch.stack([w @ m.to(dtype) for m in flat]) if len(flat) else flat.new_zeros((0, w.numel()), dtype=dtype)
    return out.reshape(*matrices.shape[:-2], w.numel())


def tokens_to_grid(values: torch.Tensor, *, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """(..., T) token values -> (..., gh, gw) over the patch tokens, prefix tokens (CLS, registers, ...) left out."""
    gh, gw = grid
    patches = values[..., num_prefix_tokens:]
    assert patches.shape[-1] == gh * gw, f"{patches.shape[-1]} patch tokens do not fill a {gh}x{gw} grid"
    return patches.reshape(*values.shape[:-1], gh, gw)
