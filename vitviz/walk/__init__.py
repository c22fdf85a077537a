"""The one walk of a ViT's blocks (:mod:`.blocks`) and the one-pass capture built on it (:mod:`.capture`)."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "Capture": "capture",
    "attention_forward": "capture",
    "capture_attention": "capture",
    "check_capturable": "capture",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
