"""Metrics of finished maps: faithfulness curves (:mod:`.faithfulness`). They import targets, never methods."""

from __future__ import annotations

import importlib

_LAZY = {
    "Curves": "faithfulness",
    "Perturbation": "faithfulness",
    "PERTURBATIONS": "faithfulness",
    "curves": "faithfulness",
    "faithfulness": "faithfulness",
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
