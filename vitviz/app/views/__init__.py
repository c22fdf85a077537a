"""The app's views, one module each with ``TITLE`` and ``render(ctx)``, grouped in sections.

``SECTIONS`` is the one list: the page shows the sections in this order (one chosen at a time) and, inside the open
section, its views as tabs in this order. ``VIEWS`` is the same views as one flat list.
"""

from . import (
    ablation,
    distance,
    explain,
    features,
    heads,
    norms,
    patch_grid,
    position,
    position_experiment,
    query,
    rollout,
    similarity,
    sinks,
    train,
)

__all__ = ["SECTIONS", "VIEWS", "ATTENTION", "TOKENS"]

ATTENTION, TOKENS = "Attention", "Tokens & features"  # the sections with controls of their own (controls.py)
SECTIONS = {
    "Input": [patch_grid, position],
    ATTENTION: [rollout, heads, query, distance],
    "Explain": [explain],
    TOKENS: [norms, sinks, features, similarity],
    "Experiments": [position_experiment, ablation, train],
}
VIEWS = [view for views in SECTIONS.values() for view in views]
