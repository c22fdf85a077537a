"""Plotly pieces shared by the figure builders: click targets, heat and image traces, colour scales, axes.

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

from functools import lru_cache

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go

from ..errors import ParameterError
from .png import _BAD_SCALE, _png_data_uri

_CELL_HOVER = "patch %{customdata[0]} · row %{customdata[1]}, col %{customdata[2]}"
_CLEAR = "rgba(0, 0, 0, 0)"
_HOVER_LABEL = dict(bgcolor="rgba(20, 20, 20, 0.85)", bordercolor="rgba(255, 255, 255, 0.6)", font=dict(color="white"))
_CLICK_LAYOUT = dict(hovermode="closest", hoverdistance=-1)  # the nearest click target is hovered (and clicked)
_OUTLINE = dict(color="#00e5ff", width=2)
_MARK = dict(color="rgb(255, 255, 255)", width=1.5, dash="dot")  # patches marked as outliers
_GRID_LINE = dict(color="rgba(255, 255, 255, 0.55)", width=1)
_PALETTE = pcolors.qualitative.Dark24  # one colour per head / curve / marked value, cycled


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
        raise ParameterError(_BAD_SCALE.format(colorscale)) from err


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


# colour-bar numbers with three significant digits and never an SI suffix: plotly's default wrote a relevance of
# 200000 as "0.2M" and 2e-6 as "2μ"; this writes "2e+5", "0.012", "45", "2e-6"
COLORBAR_TICKS = ".3~g"


def _colorbar(title: str | None = None) -> dict:
    return dict(thickness=12, len=0.9, tickformat=COLORBAR_TICKS,
                title=dict(text=title, side="right") if title else None)
