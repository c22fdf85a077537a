"""Images and inputs: loading any image safely and fitting it to the model (:mod:`.image`); the CLI's files, folders
and list files, decoded by a DataLoader (:mod:`.folders`)."""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    # imported on first use: a package import never pulls in its siblings' dependencies (no import cycles)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
