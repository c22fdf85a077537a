"""The app's views, one module each with ``TITLE`` and ``render(ctx)``; the tabs appear in this order."""

from . import distance, explain, features, heads, norms, patch_grid, position, query, rollout, similarity, sinks

__all__ = ["VIEWS"]

VIEWS = [
    patch_grid,
    position,
    rollout,
    explain,
    heads,
    query,
    distance,
    norms,
    sinks,
    features,
    similarity,
]
