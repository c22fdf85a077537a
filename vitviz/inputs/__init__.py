"""Images and inputs: loading any image safely and fitting it to the model (:mod:`.image`); the CLI's files, folders
and list files, decoded by a DataLoader (:mod:`.folders`)."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "LoadedImage": "image",
    "FittedImage": "fit",
    "load_image": "image",
    "decode_bytes": "image",
    "fit_image": "fit",
    "to_tensor": "fit",
    "IMAGE_SUFFIXES": "image",
    "MAX_UPLOAD_BYTES": "image",
    "collect_inputs": "folders",
    "loader": "folders",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
