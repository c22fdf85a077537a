"""Figure builders: numpy arrays in, a plotly figure, PNG bytes or HTML text out. No model, no torch, no streamlit.

- :mod:`vitviz.figures.png`: colour tables and PNG overlays (numpy and PIL only: ``vitviz analyze`` writes its PNGs
  without importing plotly);
- :mod:`vitviz.figures.image`: the patch grid, a heat map overlay, an RGB patch map, the layer scrubber;
- :mod:`vitviz.figures.mosaic`: the similarity mosaic and map, the head grid;
- :mod:`vitviz.figures.charts`: histogram, curves, mean attention distance, standalone HTML;
- :mod:`vitviz.figures._common`: geometry, click targets and the traces shared by the plotly builders.

Every public name is importable from here (``from vitviz import figures as vf; vf.overlay_figure(...)``) but is
imported on first use, so reaching ``vf.overlay_png`` loads only :mod:`~vitviz.figures.png`: plotly comes in with
the first plotly builder.
"""

import importlib

_LAZY = {
    "MOSAIC_MAX_TOKENS": "mosaic",
    "patch_grid_figure": "image",
    "overlay_figure": "image",
    "rgb_patch_figure": "image",
    "histogram_figure": "charts",
    "curves_figure": "charts",
    "layer_scrub_figure": "image",
    "similarity_mosaic_figure": "mosaic",
    "mosaic_point_to_patch": "mosaic",
    "similarity_map_figure": "mosaic",
    "head_grid_figure": "mosaic",
    "attention_distance_figure": "charts",
    "layer_head_figure": "charts",
    "heat_to_rgba": "png",
    "overlay_png": "png",
    "overlay_original_png": "png",
    "figure_html": "charts",
}
# public before the split but never in __all__: still reachable as vitviz.figures.screen_colorscale
_EXTRA = {"screen_colorscale": "_common"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name) or _EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_EXTRA))
