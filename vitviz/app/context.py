"""What every view is given: one frozen context built once per run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitviz.analysis.onepass import Analysis
from vitviz.inputs.image import LoadedImage
from vitviz.models import ModelInfo

from . import cache
from .sidebar import AttentionChoice

__all__ = ["ViewContext"]


@dataclass(frozen=True)
class ViewContext:
    """The analysis of the current image, its cache key, the attention choices and the query patch."""

    res: Analysis
    key: cache.AnalysisKey
    attention: AttentionChoice
    query: int  # row-major patch index
    image: LoadedImage  # the decoded original (what the downloads are drawn on)
    loaded: tuple = ()  # the model's (source, weights), to analyse a second image with the same model
    second_key: cache.AnalysisKey | None = None
    second_image: LoadedImage | None = None

    @property
    def info(self) -> ModelInfo:
        return self.res.info

    def second(self) -> Analysis | None:
        """The second image's analysis by the same model at the same settings (one more pass, cached), if any."""
        if self.second_key is None:
            return None
        return cache.analysis(self.second_key, self.second_image, self.loaded)[0]

    def cls_maps(self) -> tuple[np.ndarray, list[str], int]:
        """The sidebar's CLS view for every end layer: (maps (K, gh, gw), their labels, the index shown first)."""
        a = self.attention
        if a.view == "rollout":
            table = cache.rollout_table(self.key, a.head, a.discard, a.drop_artefacts, self.res)
            labels = [f"layers {a.start}-{b}" for b in range(a.start, self.info.depth)]
            return table[a.start, a.start:], labels, a.end - a.start
        maps = cache.raw_maps(self.key, a.head, self.res)
        return maps, [f"layer {b}" for b in range(self.info.depth)], a.end

    def cls_map(self) -> np.ndarray:
        """(gh, gw): the sidebar's view at its end layer (what the downloads hold)."""
        maps, _labels, active = self.cls_maps()
        return maps[active]
