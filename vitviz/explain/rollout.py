"""Attention-only maps: attention rollout (Abnar & Zuidema 2020) and one layer's raw attention, of the readout's row,
from one captured pass (:mod:`vitviz.analysis.rollout` holds the arithmetic). They do not depend on the target.

The row is the model's readout (:mod:`vitviz.analysis.readout`): the CLS token's, or for a model without one the
mean-pooled readout's or the attention-pool head's weights over the tokens; the titles name none of them, since
one title serves every model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.rollout import FUSIONS, HeadFusion, cls_attention, rollout_matrices, rollout_row, tokens_to_grid
from ..errors import ParameterError
from ._base import Geometry, MethodSpec, PassResult, layer_index
from .passes import Capture

__all__ = ["ROLLOUT", "RAW", "RolloutSettings", "RawSettings"]


def _check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ParameterError(f"unknown head fusion {fusion!r}: choose one of {', '.join(FUSIONS)}")


@dataclass(frozen=True)
class RolloutSettings:
    start: int = 0  # the first layer included (rollout always ends at the last layer); negative: from the end
    discard: float = 0.0  # the lowest fraction of each fused attention matrix set to 0
    fusion: HeadFusion = "mean"

    def __post_init__(self) -> None:
        _check_fusion(self.fusion)
        if not 0.0 <= self.discard < 1.0:
            raise ParameterError(f"discard ratio must be in [0, 1), got {self.discard}")


@dataclass(frozen=True)
class RawSettings:
    layer: int = -1  # negative: from the end
    fusion: HeadFusion = "mean"

    def __post_init__(self) -> None:
        _check_fusion(self.fusion)


def _rollout(s: RolloutSettings, run: PassResult, geo: Geometry) -> torch.Tensor:
    depth = geo.depth
    # as Settings.layer_range: the default's layer 1 means layer 0 on a one-layer model
    start = 0 if depth == 1 and s.start == 1 else layer_index(s.start, depth, "rollout start layer")
    kept = run.attention[start:]  # a view of the capture's (L, H, T, T), or a tuple of layers
    kept = kept if isinstance(kept, torch.Tensor) else torch.stack(kept)
    w = run.extra  # the readout's weights (1, T) of a model without a CLS token (passes.Capture); None: the CLS row
    mats = rollout_matrices(kept, head_fusion=s.fusion, discard_ratio=s.discard, keep_column=0 if w is None else None)
    row = rollout_row(mats, start=0, end=depth - start - 1, source=0 if w is None else w[0])
    return tokens_to_grid(row, num_prefix_tokens=geo.num_prefix_tokens, grid=geo.grid)


def _raw(s: RawSettings, run: PassResult, geo: Geometry) -> torch.Tensor:
    layer = layer_index(s.layer, geo.depth, "raw attention layer")
    source = 0 if run.extra is None else run.extra[0]  # the CLS row, or a CLS-less model's readout weights
    rows = cls_attention(run.attention[layer][None], head_fusion=s.fusion, source=source)  # (1, T)
    return tokens_to_grid(rows[0], num_prefix_tokens=geo.num_prefix_tokens, grid=geo.grid)


_OF = "the CLS token (without one, of the head's readout)"
ROLLOUT = MethodSpec(name="rollout", title=f"attention rollout of {_OF}", settings=RolloutSettings,
                     uses_target=False, needs=lambda s, geo: Capture(), map=_rollout)
RAW = MethodSpec(name="raw", title=f"one layer's raw attention of {_OF}", settings=RawSettings,
                 uses_target=False, needs=lambda s, geo: Capture(), map=_raw)
