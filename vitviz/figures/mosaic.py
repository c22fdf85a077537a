"""Patch-to-patch similarity (the ViT paper's Fig. 7 mosaic, one patch's map) and the small multiples of a head grid.

Pure functions: numpy arrays in, a :class:`plotly.graph_objects.Figure` out; geometry and clicks as in
:mod:`vitviz.figures._common`. Mosaic plot coordinates are mosaic cells, not image pixels.
"""

import copy
from functools import lru_cache

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import ParameterError
from ._checks import _check_grid, _check_image_array, _check_index, _check_opacity, _check_patch_size, _range
from ._common import (
    _OUTLINE,
    _click_targets,
    _colorbar,
    _heat_trace,
    _image_axes,
    _image_trace,
    _outline,
    _patch_targets,
    _scale_arg,
    _target_customdata,
)
from .png import _png_data_uri

__all__ = [
    "MOSAIC_MAX_TOKENS",
    "similarity_mosaic_figure",
    "mosaic_point_to_patch",
    "similarity_map_figure",
    "head_grid_figure",
]

MOSAIC_MAX_TOKENS = 576  # 24 x 24 patches -> a 599 x 599 mosaic; beyond that show one map at a time


def _mosaic_shape(gh: int, gw: int) -> tuple[int, int]:
    return gh * (gh + 1) - 1, gw * (gw + 1) - 1


def similarity_mosaic_figure(
    sim: np.ndarray,
    *,
    grid: tuple[int, int],
    title: str | None = None,
    colorscale: str = "Viridis",
    zmin: float | None = None,
    zmax: float | None = None,
    highlight: int | None = None,
) -> go.Figure:
    """ViT paper Fig. 7 (centre): tile ``(r, c)`` of a ``gh x gw`` mosaic is row ``r*gw + c`` of ``sim`` on the grid.

    Tiles are ``gh x gw`` maps separated by one blank (NaN) cell. Plot coordinates are mosaic cells (cell ``(Y, X)``
    centred on ``(X, Y)``). The click targets sit at the tile centres (``customdata[0]`` is the query patch);
    :func:`mosaic_point_to_patch` turns any plot point back into the query patch index. ``highlight`` outlines the
    tile of one query patch.
    """
    gh, gw = _check_grid(grid)
    n = gh * gw
    sim = np.asarray(sim, dtype=np.float32)
    if sim.shape != (n, n):
        raise ParameterError(f"sim must be ({n}, {n}) for a {gh}x{gw} grid, got shape {sim.shape}.")
    if n > MOSAIC_MAX_TOKENS:
        raise ParameterError(
            f"a mosaic of {n} patches ({gh}x{gw}) is too large to draw (at most {MOSAIC_MAX_TOKENS} patches); "
            "show one patch's similarity with similarity_map_figure instead."
        )
    highlight = _check_index(highlight, n, name="highlight")
    heat = go.Heatmap(z=_mosaic(sim, gh, gw), hoverinfo="skip", colorscale=_scale_arg(colorscale), zmin=zmin, zmax=zmax,
                      colorbar=_colorbar("similarity"))
    # tile (r, c) spans cells [r (gh + 1), r (gh + 1) + gh) x [c (gw + 1), c (gw + 1) + gw): centre + (g - 1) / 2
    targets = _click_targets(
        (gh, gw), step=(gw + 1, gh + 1), first=((gw - 1) / 2, (gh - 1) / 2), customdata=_target_customdata(gh, gw),
        hovertemplate="query patch %{customdata[0]} · row %{customdata[1]}, col %{customdata[2]}<extra></extra>",
    )
    fig = go.Figure(data=[heat, targets], layout=_mosaic_axes(title, gh, gw))
    if highlight is not None:
        r, c = divmod(highlight, gw)
        x0, y0 = c * (gw + 1) - 0.5, r * (gh + 1) - 0.5
        fig.add_shape(type="rect", x0=x0, x1=x0 + gw, y0=y0, y1=y0 + gh, line=_OUTLINE)
    return fig


def _mosaic(sim: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """(N, N) -> the mosaic array: tile (r, c) is row r*gw + c on the grid, one NaN row / column between tiles."""
    # (r, c, i, j) -> (r, i, c, j): query row, key row, query col, key col; pad one NaN row / col after each tile
    tiles = sim.reshape(gh, gw, gh, gw).transpose(0, 2, 1, 3)
    mosaic = np.full((gh, gh + 1, gw, gw + 1), np.nan, dtype=np.float32)
    mosaic[:, :gh, :, :gw] = tiles
    hm, wm = _mosaic_shape(gh, gw)
    return mosaic.reshape(gh * (gh + 1), gw * (gw + 1))[:hm, :wm]


def _mosaic_axes(title: str | None, gh: int, gw: int) -> dict:
    """Axes ticked by query patch row and column, at the tile centres."""
    layout = _image_axes(title or "Similarity of each patch (tile) to every patch")
    # the margins grow to hold the tick numbers and the axis titles (automargin), the axis titles stand off from
    # the numbers, and the figure title sits above the top axis's numbers and title (its own automargin, on paper)
    ticks = dict(showgrid=False, zeroline=False, ticks="", showline=False, automargin=True)
    layout["xaxis"] = dict(
        constrain="domain", title=dict(text="query patch column", standoff=_STANDOFF), side="top",
        tickvals=[cc * (gw + 1) + (gw - 1) / 2 for cc in range(gw)], ticktext=[str(cc) for cc in range(gw)], **ticks,
    )
    layout["yaxis"].update(
        visible=True, title=dict(text="query patch row", standoff=_STANDOFF),
        tickvals=[rr * (gh + 1) + (gh - 1) / 2 for rr in range(gh)], ticktext=[str(rr) for rr in range(gh)], **ticks,
    )
    layout["title"].update(yref="paper", y=1, yanchor="bottom", automargin=True, pad=dict(b=_STANDOFF))
    layout["margin"] = dict(l=10, r=0, b=0, t=10)
    return layout


_STANDOFF = 10  # px between a mosaic axis's numbers and its title, and between the top axis's title and the title


def mosaic_point_to_patch(x: float, y: float, *, grid: tuple[int, int]) -> int | None:
    """Query patch index of the mosaic tile under plot point ``(x, y)``; None on a gap or outside the mosaic."""
    gh, gw = _check_grid(grid)
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    xc, yc = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))  # cell (Y, X) spans [X - .5, X + .5)
    hm, wm = _mosaic_shape(gh, gw)
    if not (0 <= xc < wm and 0 <= yc < hm):
        return None
    (r, i), (c, j) = divmod(yc, gh + 1), divmod(xc, gw + 1)
    return None if i == gh or j == gw else r * gw + c


def similarity_map_figure(
    sim: np.ndarray,
    *,
    grid: tuple[int, int],
    index: int,
    patch_size: int | None = None,
    pixels: np.ndarray | None = None,
    colorscale: str = "Viridis",
    opacity: float = 0.7,
    title: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Similarity of patch ``index`` to every patch, at full size, with the query patch outlined.

    With ``pixels`` the map lies over the image (``patch_size`` defaults to ``H // gh``); without, plot units are
    ``patch_size`` pixels per cell (1 when not given).
    """
    gh, gw = _check_grid(grid)
    n = gh * gw
    sim = np.asarray(sim, dtype=np.float32)
    if sim.shape != (n, n):
        raise ParameterError(f"sim must be ({n}, {n}) for a {gh}x{gw} grid, got shape {sim.shape}.")
    index = _check_index(index, n, name="index")
    if patch_size is None:
        patch_size = np.asarray(pixels).shape[0] // gh if pixels is not None else 1
    p = _check_patch_size(patch_size)
    r, c = divmod(index, gw)
    title = title or f"Similarity of patch {index} (row {r}, col {c}) to every patch"
    heat_kw = dict(colorscale=colorscale, zmin=zmin, zmax=zmax, colorbar=_colorbar("similarity"))
    data = []
    if pixels is not None:
        data.append(_image_trace(_check_image_array(pixels, patch_size=p, grid=(gh, gw))))
        heat_kw["opacity"] = _check_opacity(opacity)
    row = sim[index].reshape(gh, gw)
    data += [_heat_trace(row, patch_size=p, **heat_kw),
             _patch_targets(row, grid=(gh, gw), patch_size=p, hover="similarity")]
    fig = go.Figure(data=data, layout=_image_axes(title))
    fig.add_shape(_outline(index, gw, p))
    return fig


def head_grid_figure(
    maps: np.ndarray,
    *,
    patch_size: int,
    pixels: np.ndarray | None = None,
    cols: int = 4,
    titles: list[str] | None = None,
    colorscale: str = "Inferno",
    shared_scale: bool = False,
    opacity: float = 0.6,
    tile_height: int = 180,
    colorbar_title: str | None = None,
) -> go.Figure:
    """Small multiples, one heat map per head (``maps`` is ``(heads, gh, gw)``), optionally over the image.

    Each subplot holds one heatmap trace; the image, when given, is one layout image per subplot (a shrunk PNG,
    shared by all of them). ``shared_scale`` puts every head on one colour range with one colour bar; otherwise each
    head spans its own range, which its subplot title states ("head 3 · 0.01–0.42": darkest to brightest), and
    hover gives the values.
    """
    p = _check_patch_size(patch_size)
    maps, titles = _check_head_maps(maps, cols=cols, titles=titles)
    n_heads, gh, gw = maps.shape
    cols = min(int(cols), n_heads)
    rows = -(-n_heads // cols)
    h, w = gh * p, gw * p

    layout = _subplot_layout(rows, cols, tuple(titles))  # axis domains and title annotations from make_subplots
    heat_kw = dict(colorscale=colorscale)
    if shared_scale:
        lo, hi = _range(maps)
        layout["coloraxis"] = dict(colorscale=_scale_arg(colorscale), cmin=lo, cmax=hi,
                                   colorbar=_colorbar(colorbar_title))
        heat_kw = dict(coloraxis="coloraxis")
    else:
        heat_kw["showscale"] = False
        for k, note in enumerate(layout["annotations"]):  # make_subplots' titles, in head order
            lo, hi = _range(maps[k])
            note.update(text=f"{titles[k]} · {_number(lo)}–{_number(hi)}", font=dict(size=12))
    if pixels is not None:
        pixels = _check_image_array(pixels, patch_size=p, grid=(gh, gw))
        heat_kw["opacity"] = _check_opacity(opacity)
        uri = _png_data_uri(pixels, max_side=tile_height)  # one PNG per subplot: keep it thumbnail-sized
    traces, images = _head_traces(maps, titles, layout, patch_size=p, heat_kw=heat_kw,
                                  image=dict(source=uri, x=0, y=0, sizex=w, sizey=h, sizing="stretch", layer="below",
                                             xanchor="left", yanchor="top") if pixels is not None else None)
    layout.update(images=images, height=rows * tile_height + 30, margin=dict(l=0, r=0, b=0, t=30),
                  plot_bgcolor="rgba(0, 0, 0, 0)")
    return go.Figure(data=traces, layout=layout)


def _head_traces(maps: np.ndarray, titles: list[str], layout: dict, *, patch_size: int, heat_kw: dict,
                 image: dict | None) -> tuple[list, list]:
    """One heatmap per head on its own subplot axes (set up in ``layout``), and the image under each when given."""
    traces, images = [], []
    for k in range(maps.shape[0]):
        ax = "" if k == 0 else str(k + 1)
        traces.append(_heat_trace(maps[k], patch_size=patch_size, xaxis=f"x{ax}", yaxis=f"y{ax}",
                                  hover=f"{titles[k]}:", **heat_kw))  # not a click target (one trace per head)
        layout[f"xaxis{ax}"].update(visible=False, constrain="domain")
        layout[f"yaxis{ax}"].update(visible=False, autorange="reversed", scaleanchor=f"x{ax}", scaleratio=1,
                                    constrain="domain")
        if image is not None:
            images.append(dict(image, xref=f"x{ax}", yref=f"y{ax}"))
    return traces, images


def _number(v: float) -> str:
    """A colour range's end in two significant digits: 0.012, 0.42, 37, 2.5e-06."""
    return f"{v:.2g}"


def _check_head_maps(maps, *, cols: int, titles: list[str] | None) -> tuple[np.ndarray, list[str]]:
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ParameterError(f"maps must be (heads, rows, columns) with at least one head, got shape {maps.shape}.")
    n_heads = maps.shape[0]
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
        raise ParameterError(f"cols must be a positive integer, got {cols!r}.")
    titles = [f"head {k}" for k in range(n_heads)] if titles is None else [str(t) for t in titles]
    if len(titles) != n_heads:
        raise ParameterError(f"titles must name each of the {n_heads} heads, got {len(titles)}.")
    return maps, titles


@lru_cache(maxsize=8)
def _subplot_grid(rows: int, cols: int, titles: tuple[str, ...]) -> dict:
    spacing = min(0.3 / rows, 0.08)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=spacing)
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)  # keep whatever template is the default when the figure is built
    return layout


def _subplot_layout(rows: int, cols: int, titles: tuple[str, ...]) -> dict:
    """A fresh copy of make_subplots' layout (axes, domains, title annotations); the grid itself is cached."""
    return copy.deepcopy(_subplot_grid(rows, cols, titles))
