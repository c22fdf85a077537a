"""Plotly figure builders.

Pure functions: numpy arrays in, a :class:`plotly.graph_objects.Figure` (or PNG bytes, or HTML text) out. No model,
no torch, no streamlit.

Geometry shared by every builder: ``pixels`` is the ``(H, W, 3) uint8`` model input, the patch grid is ``(gh, gw)``
and ``H = gh * P``, ``W = gw * P`` for the patch size ``P``. Plot coordinates are image pixels with the origin at the
top-left corner and y pointing down: pixel column ``x`` covers ``[x, x + 1)``, so grid cell ``(r, c)`` covers
``[c * P, (c + 1) * P) x [r * P, (r + 1) * P)`` and has its centre at ``((c + 0.5) * P, (r + 0.5) * P)``. Heat maps
stay on the patch grid (one plotly cell per patch, never upsampled) and the image goes in once, as a PNG data URI.
Patches are numbered row-major, as timm flattens the grid: ``index = r * gw + c``.

Clicks: plotly.js selects (and Streamlit's ``on_select`` reports) scatter points only, never heatmap cells or image
pixels. So every figure a user clicks to pick a patch carries one invisible marker per patch at its centre, in
row-major order, with ``customdata = [index, row, col(, value)]``; the marker trace gives the hover text (heat maps
skip hover) and ``hoverdistance=-1`` makes the centre nearest the cursor, i.e. the patch under it, the hovered and
clicked point. A clicked point's ``customdata[0]`` is its patch index.
"""

import base64
import copy
import hashlib
import io
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Literal

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from .errors import ImageError, ParameterError

__all__ = [
    "MOSAIC_MAX_TOKENS",
    "patch_grid_figure",
    "overlay_figure",
    "rgb_patch_figure",
    "histogram_figure",
    "curves_figure",
    "layer_scrub_figure",
    "similarity_mosaic_figure",
    "mosaic_point_to_patch",
    "similarity_map_figure",
    "head_grid_figure",
    "attention_distance_figure",
    "heat_to_rgba",
    "overlay_png",
    "overlay_original_png",
    "figure_html",
]

MOSAIC_MAX_TOKENS = 576  # 24 x 24 patches -> a 599 x 599 mosaic; beyond that show one map at a time

_CELL_HOVER = "patch %{customdata[0]} · row %{customdata[1]}, col %{customdata[2]}"
_CLEAR = "rgba(0, 0, 0, 0)"
_HOVER_LABEL = dict(bgcolor="rgba(20, 20, 20, 0.85)", bordercolor="rgba(255, 255, 255, 0.6)", font=dict(color="white"))
_CLICK_LAYOUT = dict(hovermode="closest", hoverdistance=-1)  # the nearest click target is hovered (and clicked)
_OUTLINE = dict(color="#00e5ff", width=2)
_MARK = dict(color="rgb(255, 255, 255)", width=1.5, dash="dot")  # patches marked as outliers
_GRID_LINE = dict(color="rgba(255, 255, 255, 0.55)", width=1)


# ----------------------------------------------------------------------------------------------------------- checks


def _check_patch_size(patch_size: int) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ParameterError(f"patch_size must be a positive integer (pixels per patch side), got {patch_size!r}.")
    return int(patch_size)


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    try:
        gh, gw = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ParameterError(f"grid must be a pair (rows, columns) of patches, got {grid!r}.") from None
    if gh < 1 or gw < 1:
        raise ParameterError(f"grid must have at least one row and one column of patches, got {grid!r}.")
    return gh, gw


def _check_image_array(pixels: np.ndarray, *, patch_size: int, grid: tuple[int, int]) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ImageError(f"pixels must be an (H, W, 3) uint8 RGB image, got shape {pixels.shape} {pixels.dtype}.")
    (gh, gw), p = grid, patch_size
    if pixels.shape[:2] != (gh * p, gw * p):
        raise ParameterError(
            f"the image is {pixels.shape[0]}x{pixels.shape[1]} (HxW) but a {gh}x{gw} grid of {p}-pixel patches "
            f"needs {gh * p}x{gw * p}; pass the model input image and its own grid and patch size."
        )
    return pixels


def _check_map(heat: np.ndarray) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ParameterError(f"heat must be a 2-D (rows, columns) map over the patch grid, got shape {heat.shape}.")
    return heat


def _check_index(index: int | None, n: int, *, name: str) -> int | None:
    if index is None:
        return None
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise ParameterError(f"{name} must be a patch index in [0, {n - 1}], got {index!r}.")
    return int(index)


def _check_opacity(opacity: float) -> float:
    if not isinstance(opacity, (int, float, np.number)) or not 0.0 <= float(opacity) <= 1.0:
        raise ParameterError(f"opacity must be in [0, 1], got {opacity!r}.")
    return float(opacity)


def _range(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    """Colour range of ``values`` (NaN ignored); explicit ``lo`` / ``hi`` win; never empty."""
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if lo is None and finite.size else (0.0 if lo is None else float(lo))
    hi = float(finite.max()) if hi is None and finite.size else (1.0 if hi is None else float(hi))
    return (lo, hi) if hi > lo else (lo, lo + max(abs(lo), 1.0) * 1e-6)


# ---------------------------------------------------------------------------------------------------------- helpers

_PNG_CACHE: "OrderedDict[tuple, str]" = OrderedDict()
_PNG_LOCK = threading.Lock()


def _png_data_uri(pixels: np.ndarray, *, max_side: int | None = None) -> str:
    """``data:image/png;base64,...`` of ``pixels`` (optionally shrunk to ``max_side``); the last few are cached."""
    key = (pixels.shape, max_side, hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16).digest())
    with _PNG_LOCK:  # streamlit runs sessions in threads
        if key in _PNG_CACHE:
            _PNG_CACHE.move_to_end(key)
            return _PNG_CACHE[key]
    img = Image.fromarray(pixels)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    with _PNG_LOCK:
        _PNG_CACHE[key] = uri
        while len(_PNG_CACHE) > 8:
            _PNG_CACHE.popitem(last=False)
    return uri


@lru_cache(maxsize=16)
def _cell_customdata(gh: int, gw: int) -> np.ndarray:
    """(gh, gw, 3) [index, row, col] per patch, for the hover templates of heat maps (head grid)."""
    r, c = np.divmod(np.arange(gh * gw), gw)
    out = np.stack([r * gw + c, r, c], axis=-1).reshape(gh, gw, 3)
    out = out.astype(np.uint16 if gh * gw < 2**16 else np.int32)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def _target_xy(gh: int, gw: int, step: tuple[float, float], first: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """(n,) x and y of the click targets, row-major: patch (r, c) at ``(first_x + c step_x, first_y + r step_y)``."""
    r, c = np.divmod(np.arange(gh * gw), gw)
    x, y = (np.asarray(f + k * d, dtype=np.float32) for f, k, d in ((first[0], c, step[0]), (first[1], r, step[1])))
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _target_customdata(gh: int, gw: int, values: np.ndarray | None = None) -> np.ndarray:
    """(n, 3) float32 [index, row, col] per patch, row-major; with ``values`` (gh, gw) a 4th column holds them."""
    cells = _cell_customdata(gh, gw).reshape(-1, 3).astype(np.float32)
    return cells if values is None else np.concatenate([cells, values.reshape(-1, 1).astype(np.float32)], axis=1)


def _click_targets(
    grid: tuple[int, int],
    *,
    step: tuple[float, float],
    first: tuple[float, float],
    customdata: np.ndarray,
    hovertemplate: str,
    **kwargs,
) -> go.Scatter:
    """One invisible marker per patch, row-major, at ``(first_x + c step_x, first_y + r step_y)``: the trace that
    plotly hovers and selects on a click (see the module docstring)."""
    x, y = _target_xy(*grid, tuple(map(float, step)), tuple(map(float, first)))
    return go.Scatter(
        x=x, y=y, mode="markers", marker=dict(color=_CLEAR, size=6), customdata=customdata, name="patches",
        hovertemplate=hovertemplate, hoverlabel=_HOVER_LABEL, showlegend=False, **kwargs,
    )


def _patch_targets(heat: np.ndarray | None, *, grid: tuple[int, int], patch_size: float, hover: str = "value",
                   **kwargs) -> go.Scatter:
    """Click targets at the patch centres ``((c + .5) P, (r + .5) P)``; with ``heat`` hover also shows its value."""
    p = patch_size
    template = _CELL_HOVER if heat is None else f"{_CELL_HOVER}<br>{hover} %{{customdata[3]:.4g}}"
    return _click_targets(grid, step=(p, p), first=(p / 2, p / 2), customdata=_target_customdata(*grid, heat),
                          hovertemplate=template + "<extra></extra>", **kwargs)


def _image_trace(pixels: np.ndarray) -> go.Image:
    """The image as one PNG trace spanning ``[0, W] x [0, H]``: pixel (i, j) centred on (j + .5, i + .5)."""
    return go.Image(source=_png_data_uri(pixels), x0=0.5, y0=0.5, dx=1, dy=1, hoverinfo="skip")


@lru_cache(maxsize=32)
def screen_colorscale(colorscale: str | tuple) -> tuple[tuple[float, str], ...]:
    """A colour scale as explicit ``(position, "rgb(r, g, b)")`` stops, the form every figure sends to the browser.

    Streamlit's front end swaps some literal hex colours (``#000001``, ``#000004``, ... are the placeholders of its
    plotly theme) for theme colours even with ``theme=None``: Inferno and Magma start with ``#000004``, which then
    showed pink. rgb() strings are never swapped, and they are the same colours.
    """
    scale = pcolors.get_colorscale(colorscale) if isinstance(colorscale, str) else [list(s) for s in colorscale]
    return tuple((float(pos), _rgb_text(colour)) for pos, colour in scale)


def _scale_arg(colorscale) -> list:
    """``screen_colorscale`` for a name or a list of stops, a bad one refused with the names to use."""
    try:
        key = colorscale if isinstance(colorscale, str) else tuple(tuple(s) for s in colorscale)
        return [list(s) for s in screen_colorscale(key)]
    except Exception as err:  # plotly raises PlotlyError, ValueError, TypeError on a bad scale
        raise ParameterError(
            f"unknown colorscale {colorscale!r}: use a plotly name such as 'Inferno' or 'Viridis' (add '_r' to "
            "reverse), or a list of [position, 'rgb(...)' or '#hex'] pairs."
        ) from err


def _rgb_text(colour: str) -> str:
    if colour.startswith("#"):
        r, g, b = pcolors.hex_to_rgb(colour)
        return f"rgb({r}, {g}, {b})"
    return colour


def _heat_trace(heat: np.ndarray, *, patch_size: float, hover: str | None = None, **kwargs) -> go.Heatmap:
    """One heatmap cell per patch: cell (r, c) covers ``[c*P, (c+1)*P) x [r*P, (r+1)*P)``.

    Hover is skipped (the click targets give it) unless ``hover`` names the value: then the cell hovers itself.
    """
    p = patch_size
    if "colorscale" in kwargs:
        kwargs["colorscale"] = _scale_arg(kwargs["colorscale"])
    if hover is None:
        return go.Heatmap(z=heat, x0=p / 2, dx=p, y0=p / 2, dy=p, hoverinfo="skip", **kwargs)
    return go.Heatmap(
        z=heat, x0=p / 2, dx=p, y0=p / 2, dy=p, customdata=_cell_customdata(*heat.shape), hoverongaps=False,
        hovertemplate=f"{_CELL_HOVER}<br>{hover} %{{z:.4g}}<extra></extra>", **kwargs,
    )


def _outline(index: int, gw: int, patch_size: float, **kwargs) -> dict:
    r, c = divmod(index, gw)
    p = patch_size
    return dict(type="rect", x0=c * p, x1=(c + 1) * p, y0=r * p, y1=(r + 1) * p, **{"line": _OUTLINE, **kwargs})


def _image_axes(title: str | None) -> dict:
    """Layout of a picture: y down, square pixels, no axes, margins only for the title."""
    return dict(
        xaxis=dict(visible=False, constrain="domain"),
        yaxis=dict(visible=False, autorange="reversed", scaleanchor="x", scaleratio=1, constrain="domain"),
        margin=dict(l=0, r=0, b=0, t=40 if title else 0),
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)) if title else None,
        plot_bgcolor="rgba(0, 0, 0, 0)",
        **_CLICK_LAYOUT,
    )


def _colorbar(title: str | None = None) -> dict:
    return dict(thickness=12, len=0.9, title=dict(text=title, side="right") if title else None)


# ---------------------------------------------------------------------------------------------------------- figures


def patch_grid_figure(
    pixels: np.ndarray,
    *,
    patch_size: int,
    grid: tuple[int, int],
    highlight: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """The image cut into its patch grid; hovering a cell names the patch index, row and column.

    The default title states ``N = H·W / P²``, the number of patch tokens; prefix tokens (CLS, registers) are the
    caller's to add through ``title``. ``highlight`` outlines one patch (row-major index).
    """
    p, (gh, gw) = _check_patch_size(patch_size), _check_grid(grid)
    pixels = _check_image_array(pixels, patch_size=p, grid=(gh, gw))
    highlight = _check_index(highlight, gh * gw, name="highlight")
    h, w = pixels.shape[:2]
    if title is None:
        title = f"{gh} x {gw} patches of {p} x {p} px: N = H·W / P² = {h}·{w} / {p}² = {gh * gw}"

    xs, ys = np.arange(0, w + 1, p).tolist(), np.arange(0, h + 1, p).tolist()
    lines_x = [v for x in xs for v in (x, x, None)] + [v for _ in ys for v in (0, w, None)]
    lines_y = [v for _ in xs for v in (0, h, None)] + [v for y in ys for v in (y, y, None)]
    fig = go.Figure(
        data=[
            _image_trace(pixels),
            go.Scatter(x=lines_x, y=lines_y, mode="lines", line=_GRID_LINE, hoverinfo="skip", showlegend=False),
            _patch_targets(None, grid=(gh, gw), patch_size=p),
        ],
        layout=_image_axes(title),
    )
    if highlight is not None:
        fig.add_shape(_outline(highlight, gw, p))
    return fig


def overlay_figure(
    pixels: np.ndarray,
    heat: np.ndarray,
    *,
    patch_size: int,
    opacity: float = 0.6,
    colorscale: str = "Inferno",
    title: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    highlight: int | None = None,
    outlined: list[int] | np.ndarray | None = None,
    colorbar_title: str | None = None,
    hover: str = "value",
) -> go.Figure:
    """A ``(gh, gw)`` heat map over the image, one cell per patch, with a colour bar and the value on hover.

    ``highlight`` outlines the query patch; ``outlined`` marks further patches (e.g. outlier tokens) with a dashed
    outline of another colour.
    """
    p = _check_patch_size(patch_size)
    heat = _check_map(heat)
    pixels = _check_image_array(pixels, patch_size=p, grid=heat.shape)
    highlight = _check_index(highlight, heat.size, name="highlight")
    marks = [_check_index(int(i), heat.size, name="outlined") for i in (outlined if outlined is not None else [])]
    heat_kw = dict(colorscale=colorscale, opacity=_check_opacity(opacity), zmin=zmin, zmax=zmax,
                   colorbar=_colorbar(colorbar_title))
    data = [_image_trace(pixels), _heat_trace(heat, patch_size=p, **heat_kw),
            _patch_targets(heat, grid=heat.shape, patch_size=p, hover=hover)]
    fig = go.Figure(data=data, layout=_image_axes(title))
    for i in marks:
        fig.add_shape(_outline(i, heat.shape[1], p, line=_MARK))
    if highlight is not None:
        fig.add_shape(_outline(highlight, heat.shape[1], p))
    return fig


def rgb_patch_figure(
    rgb: np.ndarray,
    *,
    patch_size: int,
    pixels: np.ndarray | None = None,
    opacity: float = 1.0,
    title: str | None = None,
    highlight: int | None = None,
    hover: np.ndarray | None = None,
) -> go.Figure:
    """A ``(gh, gw, 3)`` map of colours in [0, 1] (e.g. three principal components as RGB), one block per patch,
    optionally over the image, clickable like the heat maps; ``hover`` (gh, gw) values show on hover."""
    p = _check_patch_size(patch_size)
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ParameterError(f"rgb must be (rows, columns, 3) colours in [0, 1], got shape {rgb.shape}.")
    grid = rgb.shape[:2]
    highlight = _check_index(highlight, grid[0] * grid[1], name="highlight")
    blocks = np.kron(np.nan_to_num(np.clip(rgb, 0.0, 1.0)), np.ones((p, p, 1)))  # (H, W, 3): one block per patch
    picture = np.rint(blocks * 255).astype(np.uint8)
    alpha = _check_opacity(opacity)
    if pixels is not None:
        base = _check_image_array(pixels, patch_size=p, grid=grid).astype(np.float32)
        picture = np.rint(base * (1 - alpha) + picture * alpha).astype(np.uint8)
    data = [_image_trace(picture), _patch_targets(None if hover is None else np.asarray(hover), grid=grid,
                                                  patch_size=p)]
    fig = go.Figure(data=data, layout=_image_axes(title))
    if highlight is not None:
        fig.add_shape(_outline(highlight, grid[1], p))
    return fig


def histogram_figure(
    values: np.ndarray,
    *,
    marked: np.ndarray | None = None,
    title: str | None = None,
    x_title: str = "value",
    log_x: bool = True,
    extra: dict[str, np.ndarray] | None = None,
) -> go.Figure:
    """A histogram of ``values`` (patches), the ``marked`` ones (e.g. outliers) in their own colour; ``extra``
    named values (e.g. the CLS token, registers) as vertical lines."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ParameterError("values must hold at least one value.")
    marked = np.zeros(values.shape, bool) if marked is None else np.asarray(marked, bool).ravel()
    x = np.log10(np.maximum(values, 1e-12)) if log_x else values
    traces = [go.Histogram(x=x[~marked], name="patches", marker=dict(color="rgb(120, 120, 140)"), nbinsx=60)]
    if marked.any():
        traces.append(go.Histogram(x=x[marked], name="outliers", marker=dict(color="rgb(0, 229, 255)"), nbinsx=60))
    layout = dict(barmode="overlay", margin=dict(l=0, r=0, b=0, t=40 if title else 10),
                  xaxis=dict(title=dict(text=f"log10 {x_title}" if log_x else x_title)),
                  yaxis=dict(title=dict(text="patches")), showlegend=True,
                  title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)) if title else None)
    fig = go.Figure(data=traces, layout=layout)
    palette = pcolors.qualitative.Dark24
    for k, (name, v) in enumerate((extra or {}).items()):
        for val in np.atleast_1d(v):
            pos = float(np.log10(max(float(val), 1e-12)) if log_x else val)
            fig.add_vline(x=pos, line=dict(color=palette[k % 24], dash="dot"), annotation_text=name)
    return fig


def curves_figure(
    fractions: np.ndarray,
    curves: dict[str, np.ndarray],
    *,
    title: str | None = None,
    y_title: str = "score",
) -> go.Figure:
    """Line plots against the removed fraction (faithfulness curves): ``curves`` maps a label to its values."""
    fractions = np.asarray(fractions, dtype=np.float64)
    palette = pcolors.qualitative.Dark24
    traces = []
    for k, (label, values) in enumerate(curves.items()):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != fractions.shape:
            raise ParameterError(f"curve {label!r} has {values.size} values for {fractions.size} fractions.")
        dash = "dot" if "random" in label.lower() else "solid"
        traces.append(go.Scatter(x=fractions, y=values, mode="lines+markers", name=label,
                                 line=dict(color=palette[k % 24], dash=dash)))
    # ticks and legend inside the figure's own box: a half-width column leaves no room for a legend at the side
    layout = dict(margin=dict(l=10, r=10, b=10, t=40 if title else 10),
                  xaxis=dict(title=dict(text="share of patches removed"), automargin=True,
                             range=[0, max(1e-9, float(fractions.max())) * 1.02], tickformat=".0%"),
                  yaxis=dict(title=dict(text=y_title), automargin=True),
                  legend=dict(orientation="h", x=0, xanchor="left", y=-0.25, yanchor="top"),
                  title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)) if title else None)
    return go.Figure(data=traces, layout=layout)


def layer_scrub_figure(
    pixels: np.ndarray,
    maps: np.ndarray,
    *,
    patch_size: int,
    labels: list[str],
    active: int = 0,
    opacity: float = 0.6,
    colorscale: str = "Inferno",
    normalize: Literal["per_layer", "global"] = "per_layer",
    title: str | None = None,
    colorbar_title: str | None = None,
) -> go.Figure:
    """One heat map per layer over the image, scrubbed with a slider (and played with a button) in the browser.

    Plotly frames hold only the heatmap and the click targets' hover values of each layer, so moving the slider needs
    no server round trip and never resends the image. ``z`` of frame ``k`` is ``maps[k]`` as given (hover shows real
    values); ``normalize`` picks the colour range: ``"per_layer"`` spans each layer's own min..max, ``"global"`` one
    min..max over all layers.
    """
    p = _check_patch_size(patch_size)
    maps = _check_layer_maps(maps, labels=labels, active=active, normalize=normalize)
    n_layers = maps.shape[0]
    pixels = _check_image_array(pixels, patch_size=p, grid=maps.shape[1:])

    lo, hi = _range(maps)
    ranges = [_range(m) for m in maps] if normalize == "per_layer" else [(lo, hi)] * n_layers
    heat = _heat_trace(
        maps[active], patch_size=p, colorscale=colorscale, opacity=_check_opacity(opacity),
        zmin=ranges[active][0], zmax=ranges[active][1], colorbar=_colorbar(colorbar_title),
    )
    grid = maps.shape[1:]
    targets = _patch_targets(maps[active], grid=grid, patch_size=p)
    frames = [
        go.Frame(name=str(k), traces=[1, 2], data=[
            go.Heatmap(z=maps[k], zmin=ranges[k][0], zmax=ranges[k][1]),
            go.Scatter(customdata=_target_customdata(*grid, maps[k])),
        ])
        for k in range(n_layers)
    ]
    layout = _image_axes(title)
    layout.update(_scrub_controls(labels, active))
    return go.Figure(data=[_image_trace(pixels), heat, targets], frames=frames, layout=layout)


def _check_layer_maps(maps, *, labels: list[str], active: int, normalize: str) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ParameterError(f"maps must be (layers, rows, columns) with at least one layer, got shape {maps.shape}.")
    n_layers = maps.shape[0]
    if len(labels) != n_layers:
        raise ParameterError(f"labels must name each of the {n_layers} layers, got {len(labels)} labels.")
    if normalize not in ("per_layer", "global"):
        raise ParameterError(f"normalize must be 'per_layer' or 'global', got {normalize!r}.")
    if isinstance(active, bool) or not isinstance(active, (int, np.integer)) or not 0 <= active < n_layers:
        raise ParameterError(f"active must be a layer position in [0, {n_layers - 1}], got {active!r}.")
    return maps


def _scrub_controls(labels: list[str], active: int) -> dict:
    """A slider with one step per frame and play/pause buttons, all in the browser."""
    still = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    steps = [dict(method="animate", label=str(label), args=[[str(k)], still]) for k, label in enumerate(labels)]
    play = dict(fromcurrent=True, frame=dict(duration=400, redraw=True), transition=dict(duration=0))
    return dict(
        sliders=[dict(active=active, steps=steps, x=0.1, len=0.9, y=0, yanchor="top", pad=dict(t=8, b=0),
                      currentvalue=dict(prefix="", visible=True, xanchor="left"))],
        updatemenus=[dict(
            type="buttons", direction="left", x=0.0, y=0, xanchor="left", yanchor="top", pad=dict(t=8, r=8),
            showactive=False,
            buttons=[dict(label="▶", method="animate", args=[None, play]),
                     dict(label="❚❚", method="animate", args=[[None], still])],
        )],
    )


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
    ticks = dict(showgrid=False, zeroline=False, ticks="", showline=False, automargin=True)
    layout["xaxis"] = dict(
        constrain="domain", title=dict(text="query patch column"), side="top",
        tickvals=[cc * (gw + 1) + (gw - 1) / 2 for cc in range(gw)], ticktext=[str(cc) for cc in range(gw)], **ticks,
    )
    layout["yaxis"].update(
        visible=True, title=dict(text="query patch row"),
        tickvals=[rr * (gh + 1) + (gh - 1) / 2 for rr in range(gh)], ticktext=[str(rr) for rr in range(gh)], **ticks,
    )
    layout["margin"] = dict(l=0, r=0, b=0, t=80)
    return layout


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
    head spans its own range and hover gives the values.
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


def attention_distance_figure(dist: np.ndarray, *, title: str | None = None) -> go.Figure:
    """ViT paper Fig. 7 (right): mean attention distance (pixels) per head against depth, one colour per head.

    ``dist`` is ``(layers, heads)``; layers are numbered from 0, as timm's ``blocks`` and the app's layer controls.
    """
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim != 2 or dist.size == 0:
        raise ParameterError(f"dist must be (layers, heads), got shape {dist.shape}.")
    n_layers, n_heads = dist.shape
    palette = pcolors.qualitative.Dark24
    layers = np.arange(n_layers)
    traces = [
        go.Scatter(
            x=layers, y=dist[:, k], mode="markers", name=f"head {k}", marker=dict(size=7, color=palette[k % 24]),
            hovertemplate=f"layer %{{x}} · head {k}<br>%{{y:.1f}} px<extra></extra>",
        )
        for k in range(n_heads)
    ]
    layout = dict(
        title=dict(text=title or "Mean attention distance", x=0.0, xanchor="left", font=dict(size=14)),
        xaxis=dict(title=dict(text="network depth (layer)"), dtick=1, range=[-0.5, n_layers - 0.5], automargin=True),
        yaxis=dict(title=dict(text="mean attention distance (pixels)"), rangemode="tozero", automargin=True),
        margin=dict(l=0, r=0, b=0, t=40), legend=dict(title=dict(text="head")),
    )
    return go.Figure(data=traces, layout=layout)


# ---------------------------------------------------------------------------------------------- rasters and export


@lru_cache(maxsize=32)
def _lut(colorscale: str | tuple) -> np.ndarray:
    """(256, 3) uint8 colours sampled evenly from a plotly colorscale (a name or ((pos, colour), ...))."""
    scale = colorscale if isinstance(colorscale, str) else [list(pair) for pair in colorscale]
    try:
        colours = pcolors.sample_colorscale(scale, np.linspace(0.0, 1.0, 256).tolist(), colortype="tuple")
    except Exception as err:  # plotly raises PlotlyError, TypeError, ... on a bad scale
        raise ParameterError(
            f"unknown colorscale {colorscale!r}: use a plotly name such as 'Inferno' or 'Viridis' (add '_r' to "
            "reverse), or a list of [position, 'rgb(...)' or '#hex'] pairs."
        ) from err
    lut = np.rint(np.asarray(colours, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _scale_key(colorscale: str | list) -> str | tuple:
    return colorscale if isinstance(colorscale, str) else tuple(tuple(pair) for pair in colorscale)


def _normalise(heat: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    """``heat`` mapped to [0, 1] over ``vmin..vmax`` (default: its own finite range); NaN stays NaN."""
    lo, hi = _range(heat, vmin, vmax)
    return np.clip((heat - lo) / (hi - lo), 0.0, 1.0)


def heat_to_rgba(
    heat: np.ndarray,
    *,
    colorscale: str | list = "Inferno",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """(gh, gw, 4) uint8 colours of a map: ``vmin`` gets the scale's first colour, ``vmax`` its last; NaN is clear."""
    t = _normalise(_check_map(heat), vmin, vmax)
    finite = np.isfinite(t)
    rgb = _lut(_scale_key(colorscale))[np.rint(np.where(finite, t, 0.0) * 255).astype(np.intp)]
    alpha = np.where(finite, 255, 0).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def overlay_png(
    pixels: np.ndarray,
    heat: np.ndarray,
    *,
    patch_size: int,
    opacity: float = 0.6,
    colorscale: str | list = "Inferno",
    smooth: bool = True,
) -> bytes:
    """PNG bytes of the image with the heat map blended on top at full image resolution (downloads, CLI).

    The map's values are resized to the image (bilinear if ``smooth``, else nearest: crisp patch blocks), then
    coloured; NaN cells leave the image as it is.
    """
    p = _check_patch_size(patch_size)
    heat = _check_map(heat)
    pixels = _check_image_array(pixels, patch_size=p, grid=heat.shape)
    return _blend_png(pixels, heat, opacity=opacity, colorscale=colorscale, smooth=smooth)


def overlay_original_png(
    image: Image.Image,
    box: tuple[float, float, float, float],
    heat: np.ndarray,
    *,
    opacity: float = 0.6,
    colorscale: str | list = "Inferno",
) -> bytes:
    """PNG bytes of the part of the original ``image`` the model saw (``box``: left, top, right, bottom), at the
    original's resolution, with the map on top as crisp patch blocks, as on screen."""
    heat = _check_map(heat)
    left, top, right, bottom = (int(round(v)) for v in box)
    if right <= left or bottom <= top:
        raise ParameterError(f"box must have a positive width and height, got {box!r}.")
    region = np.asarray(image.convert("RGB").crop((left, top, right, bottom)), dtype=np.uint8)
    return _blend_png(region, heat, opacity=opacity, colorscale=colorscale, smooth=False)


def _blend_png(pixels: np.ndarray, heat: np.ndarray, *, opacity: float, colorscale, smooth: bool) -> bytes:
    alpha = _check_opacity(opacity)
    h, w = pixels.shape[:2]
    t = _normalise(heat, None, None)
    valid = np.isfinite(t)
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    # resize value * coverage and coverage, then divide: NaN cells neither bleed in nor pull neighbours to 0
    tv, cover = (np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), resample))
                 for a in (np.where(valid, t, 0.0), valid))  # (H, W) each
    value = np.clip(tv / np.maximum(cover, 1e-6), 0.0, 1.0)
    rgb = _lut(_scale_key(colorscale))[np.rint(value * 255).astype(np.intp)]
    a = (alpha * np.clip(cover, 0.0, 1.0))[..., None]
    out = np.rint(pixels * (1.0 - a) + rgb * a).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def figure_html(fig: go.Figure) -> str:
    """Standalone HTML page of ``fig`` with plotly.js inlined, so it works offline."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
