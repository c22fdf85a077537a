"""vitviz.figures.png: PNG overlays without plotly, and its colour table equal to plotly's own colour scales."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import plotly.colors as pcolors
import pytest

from vitviz import ParameterError
from vitviz.figures import png

ROOT = Path(__file__).resolve().parents[1]


def _offered_scales() -> tuple[str, ...]:
    """The app's COLORSCALES, read from its source (importing vitviz.app.state would import streamlit)."""
    tree = ast.parse((ROOT / "vitviz" / "app" / "state.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COLORSCALES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("vitviz/app/state.py defines no COLORSCALES")


def _reversed(name: str) -> str:
    return name.removesuffix("_r") if name.endswith("_r") else f"{name}_r"


OFFERED = _offered_scales()
NAMES = [*OFFERED, *(_reversed(n) for n in OFFERED)]


def _plotly_lut(scale) -> np.ndarray:
    """The LUT as vitviz built it before the table: plotly's sample_colorscale at 256 even points, rounded."""
    colours = pcolors.sample_colorscale(scale, np.linspace(0.0, 1.0, 256).tolist(), colortype="tuple")
    return np.rint(np.asarray(colours, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8)


def test_png_overlays_import_no_plotly():
    """A fresh interpreter writes overlays in every offered scale through vitviz.figures, and plotly stays out; the
    same script then builds a plotly figure, which must bring plotly in (so the check can see it)."""
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from PIL import Image
        import vitviz.figures as f
        pixels = np.zeros((8, 12, 3), np.uint8)
        heat = np.arange(6, dtype=float).reshape(2, 3)
        for name in {NAMES!r}:
            f.overlay_png(pixels, heat, patch_size=4, colorscale=name)
            f.heat_to_rgba(heat, colorscale=name)
        f.overlay_png(pixels, heat, patch_size=4, colorscale=[[0.0, "#000000"], [1.0, "rgb(255, 255, 255)"]])
        f.overlay_original_png(Image.fromarray(pixels), (0, 0, 12, 8), heat)
        assert "plotly" not in sys.modules, sorted(m for m in sys.modules if m.startswith("plotly"))
        f.overlay_figure(pixels, heat, patch_size=4)
        assert "plotly" in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_colour_table_equals_plotlys_scale(name):
    """Every offered scale (and its reverse) comes from the table, stop for stop and colour for colour plotly's."""
    stops = png._named_stops(name)
    assert stops is not None, f"{name} is offered by the app but missing from vitviz.figures.png._SCALES"
    want = pcolors.get_colorscale(name)
    assert [p for p, _ in stops] == [p for p, _ in want]
    assert [png._colour(c) for _, c in stops] == [png._colour(c) for _, c in want]
    pos, rgb = png._table_stops(name)
    table = np.rint(png._sample(pos, rgb, np.linspace(0.0, 1.0, 256)) * 255.0).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(table, _plotly_lut(name))
    np.testing.assert_array_equal(png._lut(name), table)


@pytest.mark.parametrize("stops", [
    [[0.0, "rgb(0, 0, 0)"], [1.0, "rgb(255, 255, 255)"]],
    [[0.0, "#102030"], [0.3, "rgba(200, 10, 0, 0.5)"], [0.31, "#ffeedd"], [1.0, "rgb(0.5, 128.25, 7)"]],
])
def test_explicit_stops_equal_plotlys_sampling(stops):
    assert png._table_stops(png._scale_key(stops)) is not None  # read here, without plotly
    np.testing.assert_array_equal(png._lut(png._scale_key(stops)), _plotly_lut(stops))


def test_other_scales_go_to_plotly_and_bad_ones_are_refused():
    assert png._table_stops("Cividis") is None
    np.testing.assert_array_equal(png._lut("Cividis"), _plotly_lut("Cividis"))
    bad_scales = ("NoSuchScale", [[0.2, "#000000"], [1.0, "#ffffff"]], [[0.0, "#000"], [0.0, "#fff"], [1.0, "#fff"]],
                  [[0.0, "rgb(300, 0, 0)"], [1.0, "#ffffff"]], [0.0, 1.0])
    for bad in bad_scales:
        with pytest.raises(ParameterError, match="colorscale"):
            png.heat_to_rgba(np.zeros((1, 2)), colorscale=bad)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Relative luminance (WCAG, sRGB) of (..., 3) colours in 0..255."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return c @ np.array([0.2126, 0.7152, 0.0722])


@pytest.mark.parametrize("name", OFFERED)
def test_every_offered_scale_grows_brighter_with_the_value(name):
    """Every caption says "brighter = more": each offered scale is darkest at the lowest value and brightest at the
    highest, and never darker at a higher value, both in the PNGs (the LUT) and on screen (the stops the figures
    send, sampled as plotly.js does). Plotly's own Greys runs white -> black and failed this."""
    from vitviz.figures._common import screen_colorscale

    t = np.linspace(0.0, 1.0, 256)
    png_lum = _luminance(png.heat_to_rgba(t[None, :], colorscale=name)[0, :, :3])
    screen = pcolors.sample_colorscale([list(s) for s in screen_colorscale(name)], t.tolist(), colortype="tuple")
    screen_lum = _luminance(np.asarray(screen) * 255.0)
    for lum in (png_lum, screen_lum):
        assert lum[-1] > lum[0] + 0.5, f"{name}: value 1 at luminance {lum[-1]:.3f}, value 0 at {lum[0]:.3f}"
        assert (np.diff(lum) >= -1e-3).all(), f"{name} gets darker at a higher value"
