"""Maps derived from one pass: the pass itself (:mod:`.onepass`), rollout (:mod:`.rollout`), the maps of a pass
(:mod:`.maps`), tokens and features (:mod:`.tokens`), position embeddings (:mod:`.posembed`)."""

from __future__ import annotations

import importlib

_LAZY = {
    "Analysis": "onepass",
    "analyze": "onepass",
    "analyze_batch": "onepass",
    "analyze_with_fallback": "onepass",
    "input_size_for": "onepass",
    "rollout_map": "maps",
    "rollout_table": "maps",
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
