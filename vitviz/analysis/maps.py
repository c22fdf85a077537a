"""Maps derived from one captured pass: rollout for one or every layer range, raw and query attention, distances.

Each is arithmetic on the (L, H, T, T) capture of :func:`vitviz.analysis.analyze` (rows sum to 1, prefix tokens
first), so moving a control never re-runs the model. Maps come out on the patch grid (gh, gw), prefix tokens (CLS,
registers, distillation token) left out. They follow the model's readout (:mod:`.readout`): the CLS token's row, or
for a model without one (``readout`` weights w (T,), :attr:`Analysis.readout`) the rows its head pools, w·M.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ParameterError
from ..models import ModelInfo
from ..settings import DEFAULTS, Settings
from .rollout import (
    HeadFusion,
    check_layer_range,
    cls_attention,
    readout_row,
    rollout_all,
    rollout_matrices,
    rollout_row,
    tokens_to_grid,
)

__all__ = [
    "rollout_table",
    "rollout_map",
    "raw_attention_maps",
    "query_attention_maps",
    "attention_distance",
    "rollout_table_bytes",
]


def rollout_table_bytes(info: ModelInfo) -> int:
    """Memory of :func:`rollout_table`'s work: the (L, T, T) fp32 rollout matrices and the (L, L, T) rows."""
    L, T = info.depth, info.num_tokens
    return 4 * (L * T * T + 2 * L * L * T)


def _source(readout: np.ndarray | None) -> int | torch.Tensor:
    """The row the maps read: 0 (the CLS token) or the readout's weights (T,)."""
    return 0 if readout is None else torch.as_tensor(np.asarray(readout, dtype=np.float32))


def _keep(info: ModelInfo) -> int | None:
    """The column rollout never discards: the CLS token's, if there is one."""
    return 0 if info.has_class_token else None


def rollout_table(
        attention: np.ndarray,
        *,
        info: ModelInfo,
        head_fusion: HeadFusion | int = "mean",
        discard_ratio: float = 0.0,
        drop_tokens: np.ndarray | None = None,
        readout: np.ndarray | None = None,
) -> np.ndarray:
    """Rollout maps for every layer range: (L, L, gh, gw), [a, b] over layers a..b (NaN where a > b).

    ``drop_tokens`` (T,) bool: artefact-aware rollout, those tokens left out of every layer (their map cells 0; a
    readout's weights on them too, the rest renormalised). ``readout`` (T,): the weights of a model without a CLS
    token (None: the CLS token's row).
    """
    drop = None if drop_tokens is None else torch.from_numpy(np.asarray(drop_tokens, dtype=bool))
    if drop is not None and drop.ndim != 1 and readout is not None:
        raise ParameterError("a readout's artefact-aware rollout takes one set of dropped tokens (T,) for every "
                             f"layer, got an array of shape {tuple(drop.shape)}")
    mats = rollout_matrices(torch.from_numpy(attention), head_fusion=head_fusion, discard_ratio=discard_ratio,
                            drop_tokens=drop, keep_column=_keep(info))
    source = _source(readout)
    if drop is not None and not isinstance(source, int):
        source = source.masked_fill(drop, 0.0)
        source = source / source.sum().clamp_min(torch.finfo(source.dtype).tiny)
    table = rollout_all(mats, source=source)
    return tokens_to_grid(table, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy().astype(np.float32)


def rollout_map(attention: np.ndarray, *, info: ModelInfo, settings: Settings = DEFAULTS,
                readout: np.ndarray | None = None) -> np.ndarray:
    """The rollout map for ``settings``' layer range, head fusion and discard ratio: (gh, gw). ``readout`` (T,): the
    weights of a model without a CLS token (None: the CLS token's row)."""
    settings.check()
    start, end = settings.layer_range(info.depth)
    mats = rollout_matrices(
        torch.from_numpy(attention[start : end + 1]),
        head_fusion=settings.head_fusion,
        discard_ratio=settings.discard_ratio,
        keep_column=_keep(info),
    )
    row = rollout_row(mats, start=0, end=end - start, source=_source(readout))
    return tokens_to_grid(row, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy().astype(np.float32)


def raw_attention_maps(attention: np.ndarray, *, info: ModelInfo, head_fusion: HeadFusion | int = "mean",
                       readout: np.ndarray | None = None) -> np.ndarray:
    """Each layer's own attention of the readout (the CLS token, or the ``readout`` weights' rows) to the patches,
    no rollout: (L, gh, gw)."""
    rows = cls_attention(torch.from_numpy(attention), head_fusion=head_fusion, source=_source(readout))
    return tokens_to_grid(rows, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy().astype(np.float32)


def query_attention_maps(attention: np.ndarray, *, info: ModelInfo, layer: int, query: int | None = None,
                         readout: np.ndarray | None = None) -> np.ndarray:
    """Per-head attention of one query token in one layer: (H, gh, gw). ``query`` is a patch index, None = the
    readout (the CLS token, or each head's rows weighted by ``readout`` (T,) for a model without one)."""
    check_layer_range(layer, layer, info.depth)
    if query is not None and not 0 <= query < info.num_patches:
        raise ParameterError(f"patch {query} does not exist: choose 0 to {info.num_patches - 1}")
    if query is None and readout is not None:
        rows = readout_row(torch.from_numpy(attention[layer]), _source(readout))  # (H, T)
        return tokens_to_grid(rows, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy()
    token = 0 if query is None else info.num_prefix_tokens + query
    rows = torch.from_numpy(attention[layer, :, token, :].astype(np.float32))  # (H, T)
    return tokens_to_grid(rows, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy()


def attention_distance(attention: np.ndarray, *, info: ModelInfo) -> np.ndarray:
    """Mean attention distance in input pixels per layer and head (ViT paper, Fig. 7 right): (L, H).

    For each patch query, the distance to each patch key weighted by the attention (renormalised over patch keys,
    since prefix tokens have no position), averaged over the query patches. One layer at a time, so the work never
    holds more than one layer's fp32 copy of the capture.
    """
    gh, gw = info.grid
    p = info.num_prefix_tokens
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    d = (np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]) * info.patch_size).astype(np.float32)
    out = np.empty(attention.shape[:2], dtype=np.float32)
    for layer, a in enumerate(attention):
        a = a[:, p:, p:].astype(np.float32)  # (H, N, N), this layer only
        a /= np.maximum(a.sum(-1, keepdims=True), 1e-12)
        out[layer] = np.einsum("hqk,qk->h", a, d) / (gh * gw)
    return out
