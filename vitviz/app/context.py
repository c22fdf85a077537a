"""What every view is given: one frozen context built once per run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitviz.analysis.onepass import Analysis
from vitviz.inputs.image import LoadedImage
from vitviz.models import ModelInfo

from . import cache
from .controls import AttentionChoice
from .sidebar import DisplayChoice

__all__ = ["ViewContext"]


@dataclass(frozen=True)
class ViewContext:
    """The analysis of the current image, its cache key, the model's weights, every section's choices (read also
    while another section is open) and the query patch."""

    res: Analysis
    key: cache.AnalysisKey
    weights: cache.Weights  # the model's (source, state dict): a second image and the explanations use the same model
    attention: AttentionChoice  # the Attention section's controls (what the downloads hold)
    display: DisplayChoice  # overlay opacity and colour scale, for every map
    token_layer: int  # the Tokens & features section's layer
    query: int  # row-major patch index
    image: LoadedImage  # the decoded original (what the downloads are drawn on)
    stem: str  # what downloads are named after: the image file's stem ("cat" for cat.jpg)
    second_key: cache.AnalysisKey | None = None
    second_image: LoadedImage | None = None

    @property
    def info(self) -> ModelInfo:
        return self.res.info

    def second(self) -> Analysis | None:
        """The second image's analysis by the same model at the same settings (one more pass, cached), if any."""
        if self.second_key is None:
            return None
        return cache.analysis(self.second_key, self.second_image, self.weights)[0]

    def cls_maps(self) -> tuple[np.ndarray, list[str], int]:
        """The Attention section's CLS view for every end layer: (maps (K, gh, gw), their labels, the index shown
        first)."""
        a = self.attention
        if a.view == "rollout":
            table = cache.rollout_table(self.key, a.head, a.discard, a.drop_artefacts, self.res)
            labels = [f"layers {a.start}-{b}" for b in range(a.start, self.info.depth)]
            return table[a.start, a.start:], labels, a.end - a.start
        maps = cache.raw_maps(self.key, a.head, self.res)
        return maps, [f"layer {b}" for b in range(self.info.depth)], a.end

    def cls_map(self) -> np.ndarray:
        """(gh, gw): the Attention section's view at its end layer (what the downloads hold)."""
        maps, _labels, active = self.cls_maps()
        return maps[active]
