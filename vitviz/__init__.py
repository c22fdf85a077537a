"""vitviz: see how a Vision Transformer reads an image.

A plain library (it never imports streamlit): model loading and description, image loading, one-pass attention
capture, attention rollout, position-embedding analysis, plotly figure builders and a CLI.
"""

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

__version__ = "0.1.0"

__all__ = [
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
