"""Figures over the model input image: the patch grid, a heat map overlay, an RGB patch map, a layer scrubber.

Pure functions: numpy arrays in, a :class:`plotly.graph_objects.Figure` out; geometry and clicks as in
:mod:`vitviz.figures._common`.
"""

from typing import Literal

import numpy as np
import plotly.graph_objects as go

from ..errors import ParameterError
from ._checks import (
    _check_grid,
    _check_image_array,
    _check_index,
    _check_map,
    _check_opacity,
    _check_patch_size,
    _range,
)
from ._common import (
    _GRID_LINE,
    _MARK,
    _colorbar,
    _heat_trace,
    _image_axes,
    _image_trace,
    _outline,
    _patch_targets,
    _target_customdata,
)

__all__ = ["patch_grid_figure", "overlay_figure", "rgb_patch_figure", "layer_scrub_figure"]


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


def _scrub_frames(maps: np.ndarray, ranges, grid: tuple[int, int]) -> list[go.Frame]:
    """One frame per layer: only the heat map and the click targets' hover values change."""
    return [
        go.Frame(name=str(k), traces=[1, 2], data=[
            go.Heatmap(z=maps[k], zmin=ranges[k][0], zmax=ranges[k][1]),
            go.Scatter(customdata=_target_customdata(*grid, maps[k])),
        ])
        for k in range(maps.shape[0])
    ]


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
    highlight: int | None = None,
) -> go.Figure:
    """One heat map per layer over the image, scrubbed with a slider (and played with a button) in the browser.

    Plotly frames hold only the heatmap and the click targets' hover values of each layer, so moving the slider needs
    no server round trip and never resends the image. ``z`` of frame ``k`` is ``maps[k]`` as given (hover shows real
    values); ``normalize`` picks the colour range: ``"per_layer"`` spans each layer's own min..max, ``"global"`` one
    min..max over all layers. ``highlight`` outlines the query patch (row-major index) on every frame.

    ▶ plays every layer from the first (the slider usually opens at the last); the bottom margin holds the slider
    and its labels.
    """
    p = _check_patch_size(patch_size)
    maps = _check_layer_maps(maps, labels=labels, active=active, normalize=normalize)
    n_layers = maps.shape[0]
    pixels = _check_image_array(pixels, patch_size=p, grid=maps.shape[1:])
    highlight = _check_index(highlight, maps.shape[1] * maps.shape[2], name="highlight")

    lo, hi = _range(maps)
    ranges = [_range(m) for m in maps] if normalize == "per_layer" else [(lo, hi)] * n_layers
    heat = _heat_trace(
        maps[active], patch_size=p, colorscale=colorscale, opacity=_check_opacity(opacity),
        zmin=ranges[active][0], zmax=ranges[active][1], colorbar=_colorbar(colorbar_title),
    )
    grid = maps.shape[1:]
    targets = _patch_targets(maps[active], grid=grid, patch_size=p)
    frames = _scrub_frames(maps, ranges, grid)
    layout = _image_axes(title)
    layout.update(_scrub_controls(labels, active))
    layout["margin"] = {**layout["margin"], "b": SCRUB_MARGIN}
    fig = go.Figure(data=[_image_trace(pixels), heat, targets], frames=frames, layout=layout)
    if highlight is not None:
        fig.add_shape(_outline(highlight, grid[1], p))  # a layout shape: the frames never replace it
    return fig


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


SCRUB_MARGIN = 100  # px under the picture: the slider's current value, its rail, its tick labels and a little air


def _scrub_controls(labels: list[str], active: int) -> dict:
    """A slider with one step per frame and play/pause buttons, all in the browser. ▶ plays the frames in order
    from the first: "from current" would do nothing where the slider opens, at the last frame."""
    still = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    steps = [dict(method="animate", label=str(label), args=[[str(k)], still]) for k, label in enumerate(labels)]
    play = dict(mode="immediate", fromcurrent=False, frame=dict(duration=400, redraw=True), transition=dict(duration=0))
    return dict(
        sliders=[dict(active=active, steps=steps, x=0.1, len=0.9, y=0, yanchor="top", pad=dict(t=8, b=10),
                      currentvalue=dict(prefix="", visible=True, xanchor="right"))],
        updatemenus=[dict(
            type="buttons", direction="left", x=0.0, y=0, xanchor="left", yanchor="top", pad=dict(t=8, r=8),
            showactive=False,
            buttons=[dict(label="▶", method="animate", args=[[str(k) for k in range(len(labels))], play]),
                     dict(label="❚❚", method="animate", args=[[None], still])],
        )],
    )
