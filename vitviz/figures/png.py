"""Colour look-up tables and PNG rasters of heat maps: numpy and PIL only, never plotly.

``vitviz analyze`` writes its overlays through this module, and importing plotly costs about a second, so nothing
here imports it at module level. The colour scales the app offers are sampled from a table of plotly's own colour
lists (tests/test_figures_png.py checks the table against ``plotly.colors``, so it cannot drift); any other plotly
scale name, or a list of stops this module cannot read, goes to ``plotly.colors`` on first use.
"""

import base64
import hashlib
import io
import re
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import ParameterError
from ._checks import _check_image_array, _check_map, _check_opacity, _check_patch_size, _range

__all__ = ["heat_to_rgba", "overlay_png", "overlay_original_png"]

# plotly's colour lists (``plotly.colors`` named colour scales, lower case) of the scales vitviz.app offers; plotly
# spaces a named list's colours evenly over [0, 1] and reverses the list for a "_r" name
_SCALES: dict[str, tuple[str, ...]] = {
    "inferno": ("#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d",
                "#fcffa4"),
    "viridis": ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
                "#fde725"),
    "magma": ("#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d",
              "#fcfdbf"),
    "plasma": ("#0d0887", "#46039f", "#7201a8", "#9c179e", "#bd3786", "#d8576b", "#ed7953", "#fb9f3a", "#fdca26",
               "#f0f921"),
    "greys": ("rgb(255,255,255)", "rgb(240,240,240)", "rgb(217,217,217)", "rgb(189,189,189)", "rgb(150,150,150)",
              "rgb(115,115,115)", "rgb(82,82,82)", "rgb(37,37,37)", "rgb(0,0,0)"),
}

_BAD_SCALE = ("unknown colorscale {!r}: use a plotly name such as 'Inferno' or 'Viridis' (add '_r' to reverse), or a "
              "list of [position, 'rgb(...)' or '#hex'] pairs.")
_HEX = re.compile(r"#([0-9a-fA-F]{6})")
_RGB = re.compile(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)")

# ---------------------------------------------------------------------------------------------------- colour tables


def _colour(text) -> tuple[float, float, float] | None:
    """``(r, g, b)`` in 0..255 of ``'#rrggbb'`` or ``'rgb(r, g, b)'`` (alpha ignored, as plotly does); None for any
    other form, which is then plotly's to read or refuse."""
    if not isinstance(text, str):
        return None
    if m := _HEX.fullmatch(text.strip()):
        return tuple(float(int(m[1][i:i + 2], 16)) for i in (0, 2, 4))
    try:
        rgb = tuple(float(v) for v in _RGB.fullmatch(text.strip()).groups())
    except (AttributeError, ValueError):  # no match, or a number like "1.2.3"
        return None
    return rgb if max(rgb) <= 255.0 else None


def _named_stops(name: str) -> list | None:
    """``[(position, colour), ...]`` of a scale in the table, as ``plotly.colors.get_colorscale`` spaces them."""
    name = name.lower()
    reverse = name.endswith("_r")
    colours = _SCALES.get(name[:-2] if reverse else name)
    if colours is None:
        return None
    colours = colours[::-1] if reverse else colours
    step = 1.0 / (len(colours) - 1)
    return [(i * step, c) for i, c in enumerate(colours)]


def _table_stops(colorscale: str | tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions ``(n,)`` and colours ``(n, 3)`` in [0, 1] of a table name or a list of stops this module reads;
    None otherwise (an unknown name, a CSS colour name, positions plotly would refuse: plotly decides)."""
    pairs = _named_stops(colorscale) if isinstance(colorscale, str) else colorscale
    if pairs is None or len(pairs) < 2 or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in pairs):
        return None
    if not all(isinstance(pos, (int, float, np.number)) and not isinstance(pos, bool) for pos, _ in pairs):
        return None
    pos = np.array([float(p) for p, _ in pairs])
    rgb = [_colour(c) for _, c in pairs]
    if any(c is None for c in rgb) or pos[0] != 0.0 or pos[-1] != 1.0 or not (np.diff(pos) > 0).all():
        return None
    return pos, np.array(rgb) / 255.0


def _sample(pos: np.ndarray, rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(len(points), 3) colours in [0, 1], with the arithmetic of ``plotly.colors.sample_colorscale`` step by step
    (bisect_left, then low + t * (high - low)) so the table's colours are plotly's to the last bit."""
    high = np.searchsorted(pos, points, side="left")
    low = high - 1  # at 0 plotly's bisect gives low = -1, the last stop, with t = 1: the first colour, as here
    t = (points - pos[low]) / (pos[high] - pos[low])
    return rgb[low] + t[:, None] * (rgb[high] - rgb[low])


def _plotly_colours(colorscale: str | tuple, points: np.ndarray) -> np.ndarray:
    """Colours of any scale plotly knows; imported here only, for names and stops outside the table."""
    import plotly.colors as pcolors

    scale = colorscale if isinstance(colorscale, str) else [list(pair) for pair in colorscale]
    try:
        colours = pcolors.sample_colorscale(scale, points.tolist(), colortype="tuple")
    except Exception as err:  # plotly raises PlotlyError, TypeError, ... on a bad scale
        raise ParameterError(_BAD_SCALE.format(colorscale)) from err
    return np.asarray(colours, dtype=np.float64)


@lru_cache(maxsize=32)
def _lut(colorscale: str | tuple) -> np.ndarray:
    """(256, 3) uint8 colours sampled evenly from a plotly colorscale (a name or ((pos, colour), ...))."""
    points = np.linspace(0.0, 1.0, 256)
    stops = _table_stops(colorscale)
    colours = _plotly_colours(colorscale, points) if stops is None else _sample(*stops, points)
    lut = np.rint(colours * 255.0).clip(0, 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _scale_key(colorscale: str | list) -> str | tuple:
    """A hashable form of ``colorscale`` for the LUT cache; a stop that is no pair is refused here, not by plotly."""
    if isinstance(colorscale, str):
        return colorscale
    try:
        return tuple(tuple(pair) for pair in colorscale)
    except TypeError:
        raise ParameterError(_BAD_SCALE.format(colorscale)) from None


def _normalise(heat: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    """``heat`` mapped to [0, 1] over ``vmin..vmax`` (default: its own finite range); NaN stays NaN."""
    lo, hi = _range(heat, vmin, vmax)
    return np.clip((heat - lo) / (hi - lo), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------- rasters

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
