"""Maps derived from one pass: the pass itself (:mod:`.onepass`), rollout (:mod:`.rollout`), the maps of a pass
(:mod:`.maps`), tokens and features (:mod:`.tokens`), position embeddings (:mod:`.posembed`)."""

from __future__ import annotations

from .._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
