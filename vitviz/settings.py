"""The knobs of one analysis and their defaults, shared by the library, the CLI and the app.

Each option name is defined once: fits by :data:`vitviz.image.Fit`, head fusions by :data:`vitviz.rollout.FUSIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from .analysis.rollout import FUSIONS, HeadFusion, check_layer_range
from .errors import ParameterError
from .inputs.fit import Fit

__all__ = ["FITS", "Settings", "DEFAULTS"]

FITS: tuple[str, ...] = get_args(Fit)


@dataclass(frozen=True)
class Settings:
    """The knobs of one analysis; the app's and the CLI's defaults both come from ``DEFAULTS``.

    The start layer defaults to 1: the default DINOv2 model's layer 0 sends most CLS attention to one or two
    'spike' patches, and a rollout that includes it shows those instead of the objects. Discarding the weakest 90%
    of each layer's attention (never the CLS column) sharpens the map onto the objects (tests/test_analysis.py
    measures both on an object pasted on a flat background).
    """

    model: str = "default"
    patch_size: int | None = None  # None: the model's own
    img_size: int = 224
    fit: Fit = "crop"
    start_layer: int = 1
    end_layer: int = -1  # -1: the last layer
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.9
    device: str = "auto"
    precision: str = "auto"

    def layer_range(self, depth: int) -> tuple[int, int]:
        start = self.start_layer if self.start_layer >= 0 else depth + self.start_layer
        end = self.end_layer if self.end_layer >= 0 else depth + self.end_layer
        if depth <= start and self.start_layer == DEFAULTS.start_layer:  # a one-layer model has no layer 1
            start = 0
        check_layer_range(start, end, depth)
        return start, end

    def check(self) -> None:
        if self.head_fusion not in FUSIONS:
            raise ParameterError(f"unknown head fusion {self.head_fusion!r}: choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ParameterError(f"discard ratio must be in [0, 1), got {self.discard_ratio}")
        if self.fit not in FITS:
            raise ParameterError(f"unknown fit {self.fit!r}: choose one of {', '.join(FITS)}")


DEFAULTS = Settings()
