"""vitviz: see how a Vision Transformer reads an image.

A plain library in layers, each a subpackage that imports only the ones listed before it:
:mod:`vitviz.walk` (the one walk of the blocks and the one-pass capture), :mod:`vitviz.models` (sources,
checkpoints, building, class names), :mod:`vitviz.inputs` (images and the CLI's inputs), :mod:`vitviz.analysis`
(maps derived from a pass: rollout, tokens, position embeddings), :mod:`vitviz.targets` (what is explained),
:mod:`vitviz.explain` (explanation methods with one shape), :mod:`vitviz.metrics` (faithfulness of finished maps),
:mod:`vitviz.figures` (plotly figures and PNG overlays), the CLI (:mod:`vitviz.cli`) and the app (:mod:`vitviz.app`,
the only package that imports streamlit).

The main API is re-exported here and imported on first use, so ``import vitviz`` (and ``vitviz --version``) stays
fast::

    from vitviz import analyze, get_model, load_image, rollout_map, Settings
    from vitviz import explain, faithfulness       # the modules: explain.explain(...), faithfulness.curves(...)
"""

from __future__ import annotations

import importlib

from .errors import (
    CaptureError,
    CheckpointError,
    ImageError,
    ModelError,
    ModelUnavailableError,
    ParameterError,
    ResourceError,
    VitvizError,
)

__version__ = "0.2.0"

_LAZY = {  # name -> (module, attribute); attribute None: the module itself
    "load_image": ("inputs.image", "load_image"),
    "get_model": ("models.build", "get_model"),
    "describe_model": ("models.build", "describe_model"),
    "analyze": ("analysis.onepass", "analyze"),
    "analyze_batch": ("analysis.onepass", "analyze_batch"),
    "Analysis": ("analysis.onepass", "Analysis"),
    "rollout_map": ("analysis.maps", "rollout_map"),
    "rollout_table": ("analysis.maps", "rollout_table"),
    "Settings": ("settings", "Settings"),
    "DEFAULTS": ("settings", "DEFAULTS"),
    "Target": ("targets", "Target"),
    "explain": ("explain", None),
    "faithfulness": ("metrics.faithfulness", None),
}

__all__ = [
    *_LAZY,
    "CaptureError",
    "CheckpointError",
    "ImageError",
    "ModelError",
    "ModelUnavailableError",
    "ParameterError",
    "ResourceError",
    "VitvizError",
    "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vitviz' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(f".{module}", __name__)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
