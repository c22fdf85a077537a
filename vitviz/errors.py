"""Typed errors of vitviz.

Every failure that a user can cause (a bad image, a bad parameter, a model or checkpoint that does not fit)
raises a subclass of :class:`VitvizError`. They also subclass :class:`ValueError`, so a UI can turn any of
them into a message with one ``except ValueError``.
"""

__all__ = [
    "VitvizError",
    "ImageError",
    "ParameterError",
    "ModelError",
    "CheckpointError",
    "ModelUnavailableError",
    "ResourceError",
    "OutOfMemoryError",
    "CaptureError",
]


class VitvizError(ValueError):
    """Base class of every error vitviz raises on purpose; the message is meant for a person."""


class ImageError(VitvizError):
    """The image cannot be read or used (empty, corrupt, not an image, too large, too small)."""


class ParameterError(VitvizError):
    """A setting is out of range; the message names the allowed range."""


class ModelError(VitvizError):
    """The model is not one vitviz can analyse (not a ViT with absolute position embeddings, ...)."""


class CheckpointError(ModelError):
    """A checkpoint file cannot be loaded safely or does not match the architecture."""


class ModelUnavailableError(ModelError):
    """The weights cannot be had here (offline, not downloaded, package missing); the message says what to do."""


class ResourceError(VitvizError):
    """The work would need more memory than the configured budget."""


class OutOfMemoryError(ResourceError):
    """The accelerator ran out of memory during the pass; callers may retry on the CPU."""


class CaptureError(VitvizError):
    """Attention capture produced nothing or failed part way."""
