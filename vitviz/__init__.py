"""vitviz: see how a Vision Transformer reads an image.

A plain library: model loading and description (:mod:`vitviz.models`), image loading (:mod:`vitviz.image`), the
one-pass capture (:mod:`vitviz.attention`), the analysis pass (:mod:`vitviz.analysis`), rollout
(:mod:`vitviz.rollout`) and the maps derived from a pass (:mod:`vitviz.maps`), position embeddings
(:mod:`vitviz.posembed`), the export format (:mod:`vitviz.export`), plotly figure builders (:mod:`vitviz.figures`)
and the CLI (:mod:`vitviz.cli`).

Only :mod:`vitviz.app` imports streamlit; nothing else in the package does (tests/test_layout.py checks it).

The main API is re-exported here and imported on first use, so ``import vitviz`` (and ``vitviz --version``) stays
fast::

    from vitviz import analyze, get_model, load_image, rollout_map, Settings
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

_LAZY = {
    "load_image": "image",
    "get_model": "models",
    "describe_model": "models",
    "analyze": "analysis",
    "analyze_batch": "analysis",
    "Analysis": "analysis",
    "rollout_map": "maps",
    "rollout_table": "maps",
    "Settings": "settings",
    "DEFAULTS": "settings",
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
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
