"""Tests of vitviz.figures against hand-computed geometry and naive-loop references."""

import base64
import io
import json
import re

import numpy as np
import plotly.colors as pcolors
import pytest
from PIL import Image

from vitviz import ImageError, ParameterError
from vitviz import figures as F

GRID = (2, 3)  # non-square on purpose: gh != gw
P = 4
BW = [[0.0, "rgb(0, 0, 0)"], [1.0, "rgb(255, 255, 255)"]]  # black -> white, easy to compute by hand


@pytest.fixture
def pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(GRID[0] * P, GRID[1] * P, 3), dtype=np.uint8)


def _decode_uri(uri: str) -> np.ndarray:
    head, data = uri.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def _hover(template: str, customdata, z: float | None = None) -> str:
    """Render a plotly hovertemplate the way plotly.js would for the fields we use."""
    text = re.sub(r"%\{customdata\[(\d)\]\}", lambda m: str(int(customdata[int(m.group(1))])), template)
    text = re.sub(r"%\{customdata\[(\d)\]:\.(\d)[gf]\}",
                  lambda m: f"{float(customdata[int(m.group(1))]):.{m.group(2)}g}", text)
    text = re.sub(r"%\{z:\.(\d)[gf]\}", lambda m: f"{z:.{m.group(1)}g}", text)
    return text.replace("<extra></extra>", "")


def _trace(fig, kind: str):
    return next(t for t in fig.data if t.type == kind)


def _targets(fig):
    """The click-target trace: the one scatter of markers."""
    (t,) = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    return t


def _centres(grid: tuple[int, int], p: float) -> list[tuple[float, float]]:
    """Patch centres by a naive loop, row-major."""
    return [((c + 0.5) * p, (r + 0.5) * p) for r in range(grid[0]) for c in range(grid[1])]


# --------------------------------------------------------------------------------------------------- geometry


def test_heat_cells_sit_on_their_patches(pixels):
    heat = np.arange(6, dtype=np.float32).reshape(GRID)
    fig = F.overlay_figure(pixels, heat, patch_size=P)
    hm = _trace(fig, "heatmap")
    # cell (r, c) centre = (x0 + c*dx, y0 + r*dy) must be ((c + .5) P, (r + .5) P): x 2, 6, 10; y 2, 6 for P = 4
    assert [hm.x0 + c * hm.dx for c in range(3)] == [2, 6, 10]
    assert [hm.y0 + r * hm.dy for r in range(2)] == [2, 6]
    assert hm.dx == hm.dy == P
    np.testing.assert_array_equal(hm.z, heat)
    assert hm.x is None and hm.y is None  # grid placement, no upsampled coordinates


def test_image_trace_spans_the_image_exactly(pixels):
    fig = F.overlay_figure(pixels, np.zeros(GRID), patch_size=P)
    img = _trace(fig, "image")
    np.testing.assert_array_equal(_decode_uri(img.source), pixels)
    h, w = pixels.shape[:2]
    # image pixel j is centred at x0 + j*dx: left edge 0, right edge W
    assert (img.x0 - img.dx / 2, img.x0 + (w - 0.5) * img.dx) == (0, w)
    assert (img.y0 - img.dy / 2, img.y0 + (h - 0.5) * img.dy) == (0, h)
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1
    assert len([t for t in fig.data if t.type == "image"]) == 1


def test_pixels_must_match_grid(pixels):
    with pytest.raises(ParameterError, match="needs 8x12"):
        F.overlay_figure(pixels[:4], np.zeros(GRID), patch_size=P)
    with pytest.raises(ImageError):
        F.overlay_figure(pixels.astype(np.float32), np.zeros(GRID), patch_size=P)
    with pytest.raises(ParameterError, match="patch_size"):
        F.patch_grid_figure(pixels, patch_size=0, grid=GRID)


# ------------------------------------------------------------------------------------------------------ hover


@pytest.mark.parametrize(("grid", "cell", "index"), [((2, 3), (1, 0), 3), ((3, 5), (1, 4), 9), ((5, 2), (4, 1), 9)])
def test_hover_names_row_major_index(grid, cell, index):
    p = 2
    px = np.zeros((grid[0] * p, grid[1] * p, 3), np.uint8)
    heat = np.full(grid, 0.25, np.float32)
    r, c = cell
    for fig in (F.overlay_figure(px, heat, patch_size=p), F.patch_grid_figure(px, patch_size=p, grid=grid)):
        t = _targets(fig)
        assert (t.x[index], t.y[index]) == ((c + 0.5) * p, (r + 0.5) * p)  # the target of point `index` is that cell
        text = _hover(t.hovertemplate, t.customdata[index])
        assert text.startswith(f"patch {index} · row {r}, col {c}"), text


def test_overlay_hover_shows_value(pixels):
    heat = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.625]], np.float32)
    t = _targets(F.overlay_figure(pixels, heat, patch_size=P))
    assert _hover(t.hovertemplate, t.customdata[5]) == "patch 5 · row 1, col 2<br>value 0.625"


def _clickable_figures(pixels, grid, p):
    """Every builder a user clicks on, on a (gh, gw) grid, with heat values 10 * index + 0.5 (distinct per patch)."""
    gh, gw = grid
    heat = np.arange(gh * gw, dtype=np.float32).reshape(grid) * 10 + 0.5
    sim = np.tile(heat.reshape(1, -1), (gh * gw, 1))  # every row is `heat`
    return {
        "grid": (F.patch_grid_figure(pixels, patch_size=p, grid=grid), None),
        "overlay": (F.overlay_figure(pixels, heat, patch_size=p), heat),
        "scrub": (F.layer_scrub_figure(pixels, np.stack([heat * 0, heat]), patch_size=p, labels=["a", "b"],
                                       active=1), heat),
        "simmap": (F.similarity_map_figure(sim, grid=grid, index=1, pixels=pixels), heat),
        "simmap bare": (F.similarity_map_figure(sim, grid=grid, index=1, patch_size=p), heat),
    }


def test_click_targets_are_the_patch_centres_row_major(pixels):
    gh, gw = GRID
    for name, (fig, heat) in _clickable_figures(pixels, GRID, P).items():
        t = _targets(fig)
        assert list(zip(t.x, t.y, strict=True)) == _centres(GRID, P), name
        custom = np.asarray(t.customdata)
        want = [[r * gw + c, r, c] + ([] if heat is None else [heat[r, c]]) for r in range(gh) for c in range(gw)]
        np.testing.assert_array_equal(custom, np.asarray(want, dtype=np.float32), err_msg=name)
        assert t.marker.color == "rgba(0, 0, 0, 0)" and t.hovertemplate, name  # invisible, but it hovers
        assert all(h.hoverinfo == "skip" for h in fig.data if h.type in ("heatmap", "image")), name
        assert (fig.layout.hovermode, fig.layout.hoverdistance) == ("closest", -1), name
        assert [d.type for d in fig.data].count("scatter") <= 2  # targets (+ the grid lines): one trace, not n


def test_click_targets_sit_inside_their_cells_for_odd_patch_sizes():
    grid, p = (3, 2), 5  # centres at half pixels
    px = np.zeros((15, 10, 3), np.uint8)
    t = _targets(F.patch_grid_figure(px, patch_size=p, grid=grid))
    for k, (x, y) in enumerate(zip(t.x, t.y, strict=True)):
        assert int(y // p) * grid[1] + int(x // p) == k == t.customdata[k][0]
# ------------------------------------------------------------------------------------------------- patch grid


def test_patch_grid_lines_title_and_highlight(pixels):
    fig = F.patch_grid_figure(pixels, patch_size=P, grid=GRID, highlight=4)
    assert "N = H·W / P² = 8·12 / 4² = 6" in fig.layout.title.text
    lines = _trace(fig, "scatter")
    pts = list(zip(lines.x, lines.y, strict=True))
    for x in (0, 4, 8, 12):  # vertical lines, top to bottom
        assert (x, 0) in pts and (x, 8) in pts
    for y in (0, 4, 8):  # horizontal lines, left to right
        assert (0, y) in pts and (12, y) in pts
    (rect,) = fig.layout.shapes  # patch 4 = row 1, col 1
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (4, 8, 4, 8)
    assert F.patch_grid_figure(pixels, patch_size=P, grid=GRID, title="197 tokens").layout.title.text == "197 tokens"
    with pytest.raises(ParameterError, match=r"\[0, 5\]"):
        F.patch_grid_figure(pixels, patch_size=P, grid=GRID, highlight=6)


# ----------------------------------------------------------------------------------------------------- mosaic


def test_mosaic_tiles_match_naive_loop():
    gh, gw = GRID
    n = gh * gw
    sim = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    fig = F.similarity_mosaic_figure(sim, grid=GRID)
    hm = _trace(fig, "heatmap")
    z = np.asarray(hm.z)
    assert z.shape == (gh * (gh + 1) - 1, gw * (gw + 1) - 1) == (5, 11)
    for r in range(gh):
        for c in range(gw):
            for i in range(gh):
                for j in range(gw):
                    y, x = r * (gh + 1) + i, c * (gw + 1) + j
                    assert z[y, x] == sim[r * gw + c, i * gw + j]
    assert np.isnan(z[2]).all() and np.isnan(z[:, 3]).all() and np.isnan(z[:, 7]).all()  # 1-cell gaps
    assert np.isfinite(z).sum() == n * n
    assert hm.hoverinfo == "skip" and hm.customdata is None


def test_mosaic_click_targets_are_the_tile_centres():
    gh, gw = GRID  # 5 x 11 mosaic: tile columns X 0-2, 4-6, 8-10 (centres 1, 5, 9); tile rows Y 0-1, 3-4 (.5, 3.5)
    fig = F.similarity_mosaic_figure(np.zeros((6, 6)), grid=GRID)
    t = _targets(fig)
    assert list(zip(t.x, t.y, strict=True)) == [(x, y) for y in (0.5, 3.5) for x in (1, 5, 9)]
    np.testing.assert_array_equal(t.customdata, [[r * gw + c, r, c] for r in range(gh) for c in range(gw)])
    assert [F.mosaic_point_to_patch(x, y, grid=GRID) for x, y in zip(t.x, t.y, strict=True)] == list(range(6))
    assert _hover(t.hovertemplate, t.customdata[4]) == "query patch 4 · row 1, col 1"
    assert (fig.layout.hovermode, fig.layout.hoverdistance) == ("closest", -1)
    assert not fig.layout.shapes


def test_mosaic_highlight_outlines_the_tile():
    fig = F.similarity_mosaic_figure(np.zeros((6, 6)), grid=GRID, highlight=5)  # row 1, col 2: X 8-10, Y 3-4
    (rect,) = fig.layout.shapes
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (7.5, 10.5, 2.5, 4.5)
    with pytest.raises(ParameterError, match=r"\[0, 5\]"):
        F.similarity_mosaic_figure(np.zeros((6, 6)), grid=GRID, highlight=6)


def test_mosaic_rejects_wrong_shape_and_huge_grids():
    with pytest.raises(ParameterError, match=r"\(6, 6\)"):
        F.similarity_mosaic_figure(np.zeros((5, 5)), grid=GRID)
    with pytest.raises(ParameterError, match="similarity_map_figure"):
        F.similarity_mosaic_figure(np.zeros((625, 625)), grid=(25, 25))


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (0, 0, 0),
        (5, 0, 1),  # tile column 1 spans X 4..6
        (9.4, 3.6, 5),  # X 9 -> col 2, Y 4 -> row 1
        (10.49, 4.49, 5),  # last cell, near its far edge
        (2.49, 0, 0),
        (4, 3, 4),
        (3, 0, None),  # gap column
        (7, 4, None),  # gap column
        (2.5, 0, None),  # X rounds to 3: gap
        (0, 2, None),  # gap row
        (-0.6, 0, None),  # outside
        (10.5, 0, None),  # X 11: outside
        (0, 5, None),  # Y 5: outside
        (float("nan"), 0, None),
    ],
)
def test_mosaic_point_to_patch(x, y, expected):
    # 2 x 3 grid -> 5 x 11 mosaic: X 0-2 col 0, 3 gap, 4-6 col 1, 7 gap, 8-10 col 2; Y 0-1 row 0, 2 gap, 3-4 row 1
    assert F.mosaic_point_to_patch(x, y, grid=GRID) == expected


# ------------------------------------------------------------------------------------------- similarity map


def test_similarity_map_row_and_outline(pixels):
    n = 6
    sim = np.random.default_rng(2).random((n, n)).astype(np.float32)
    fig = F.similarity_map_figure(sim, grid=GRID, index=5, pixels=pixels)
    hm = _trace(fig, "heatmap")
    np.testing.assert_array_equal(hm.z, sim[5].reshape(GRID))
    assert hm.dx == P  # patch size inferred from the image
    t = _targets(fig)
    assert _hover(t.hovertemplate, t.customdata[4]) == f"patch 4 · row 1, col 1<br>similarity {sim[5, 4]:.4g}"
    (rect,) = fig.layout.shapes  # patch 5 = row 1, col 2
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (8, 12, 4, 8)
    bare = F.similarity_map_figure(sim, grid=GRID, index=1)
    assert [t.type for t in bare.data] == ["heatmap", "scatter"] and bare.layout.shapes[0].x0 == 1
    with pytest.raises(ParameterError):
        F.similarity_map_figure(sim, grid=GRID, index=6)


# ----------------------------------------------------------------------------------------------- layer scrub


@pytest.mark.parametrize("normalize", ["per_layer", "global"])
def test_layer_scrub_frames(pixels, normalize):
    maps = (np.random.default_rng(3).random((4, *GRID)) * np.array([1, 2, 5, 10])[:, None, None]).astype(np.float32)
    labels = [f"block {k}" for k in range(4)]
    fig = F.layer_scrub_figure(pixels, maps, patch_size=P, labels=labels, active=2, normalize=normalize)
    assert len(fig.frames) == 4
    gw = GRID[1]
    for k, frame in enumerate(fig.frames):
        # the heat map and the targets' hover values; the image (trace 0) and the target positions are never resent
        assert list(frame.traces) == [1, 2] and [t.type for t in frame.data] == ["heatmap", "scatter"]
        hm, targets = frame.data
        np.testing.assert_array_equal(hm.z, maps[k])
        assert targets.x is None and targets.y is None
        for idx, row in enumerate(targets.customdata):  # [index, row, col, value of layer k]
            assert list(row) == [idx, idx // gw, idx % gw, maps[k].flat[idx]]
        ref = maps[k] if normalize == "per_layer" else maps
        assert (hm.zmin, hm.zmax) == pytest.approx((ref.min(), ref.max()))
    base = fig.data[1]
    np.testing.assert_array_equal(base.z, maps[2])
    np.testing.assert_array_equal(fig.data[2].customdata, fig.frames[2].data[1].customdata)  # opens on layer 2
    assert list(zip(fig.data[2].x, fig.data[2].y, strict=True)) == _centres(GRID, P)
    assert (base.zmin, base.zmax) == (fig.frames[2].data[0].zmin, fig.frames[2].data[0].zmax)
    (slider,) = fig.layout.sliders
    assert slider.active == 2 and [s.label for s in slider.steps] == labels
    assert [list(s.args[0]) for s in slider.steps] == [[f.name] for f in fig.frames]
    assert {b.method for b in fig.layout.updatemenus[0].buttons} == {"animate"}


def test_layer_scrub_checks_inputs(pixels):
    maps = np.zeros((3, *GRID))
    with pytest.raises(ParameterError, match="3 layers"):
        F.layer_scrub_figure(pixels, maps, patch_size=P, labels=["a"])
    with pytest.raises(ParameterError, match=r"\[0, 2\]"):
        F.layer_scrub_figure(pixels, maps, patch_size=P, labels=list("abc"), active=3)
    with pytest.raises(ParameterError, match="normalize"):
        F.layer_scrub_figure(pixels, maps, patch_size=P, labels=list("abc"), normalize="per_head")


# --------------------------------------------------------------------------------------------- heads, distance


@pytest.mark.parametrize("shared", [False, True])
def test_head_grid(pixels, shared):
    maps = np.random.default_rng(4).random((5, *GRID)).astype(np.float32)
    fig = F.head_grid_figure(maps, patch_size=P, pixels=pixels, cols=2, shared_scale=shared)
    assert len(fig.data) == 5 and all(t.type == "heatmap" for t in fig.data)
    axes = [(t.xaxis, t.yaxis) for t in fig.data]
    assert len(set(axes)) == 5
    for k, t in enumerate(fig.data):
        np.testing.assert_array_equal(t.z, maps[k])
        assert (t.x0, t.dx, t.y0, t.dy) == (2, 4, 2, 4)
        yaxis = fig.layout["yaxis" + t.yaxis[1:]]
        assert yaxis.autorange == "reversed" and yaxis.scaleanchor == t.xaxis
    assert [(im.xref, im.yref) for im in fig.layout.images] == axes  # the image once per subplot, under its map
    assert all((im.sizex, im.sizey, im.x, im.y) == (12, 8, 0, 0) for im in fig.layout.images)
    assert [a.text.split(" · ")[0] for a in fig.layout.annotations] == [f"head {k}" for k in range(5)]
    if shared:
        assert {t.coloraxis for t in fig.data} == {"coloraxis"}
        assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == pytest.approx((maps.min(), maps.max()))


def test_attention_distance():
    dist = np.arange(12, dtype=float).reshape(4, 3) * 10  # 4 layers, 3 heads
    fig = F.attention_distance_figure(dist)
    assert len(fig.data) == 3
    for k, t in enumerate(fig.data):
        assert list(t.x) == [0, 1, 2, 3] and list(t.y) == list(dist[:, k])  # layers from 0, as the app's sliders
        assert f"head {k}" in t.hovertemplate and "layer %{x}" in t.hovertemplate
    assert len({t.marker.color for t in fig.data}) == 3
    assert tuple(fig.layout.xaxis.range) == (-0.5, 3.5)


# ------------------------------------------------------------------------------------------- rasters, export


@pytest.mark.parametrize("scale", ["Inferno", "Viridis", "Inferno_r"])
def test_heat_to_rgba_endpoints(scale):
    rgba = F.heat_to_rgba(np.array([[0.0, 0.5, 1.0, np.nan]]), colorscale=scale)
    stops = pcolors.get_colorscale(scale)
    first, last = (tuple(int(v) for v in pcolors.hex_to_rgb(stops[i][1])) for i in (0, -1))
    assert rgba.shape == (1, 4, 4) and rgba.dtype == np.uint8
    assert tuple(rgba[0, 0, :3]) == first and tuple(rgba[0, 2, :3]) == last
    assert list(rgba[0, :, 3]) == [255, 255, 255, 0]


def test_heat_to_rgba_linear_scale_and_limits():
    heat = np.linspace(0.0, 1.0, 11).reshape(1, 11)
    grey = F.heat_to_rgba(heat, colorscale=BW)[0, :, 0].astype(int)
    assert np.abs(grey - heat[0] * 255).max() <= 1  # black -> white ramp, by hand
    clipped = F.heat_to_rgba(np.array([[-5.0, 0.0, 10.0, 20.0]]), colorscale=BW, vmin=0, vmax=10)
    assert list(clipped[0, :, 0]) == [0, 0, 255, 255]
    with pytest.raises(ParameterError, match="colorscale"):
        F.heat_to_rgba(heat, colorscale="NoSuchScale")


def test_overlay_png_size_and_zero_opacity(pixels):
    heat = np.random.default_rng(5).random(GRID)
    for smooth in (True, False):
        png = F.overlay_png(pixels, heat, patch_size=P, opacity=0.0, smooth=smooth)
        out = np.asarray(Image.open(io.BytesIO(png)))
        assert out.shape == pixels.shape
        np.testing.assert_array_equal(out, pixels)


def test_overlay_png_blocks_by_hand(pixels):
    heat = np.array([[0.0, 1.0, 0.0], [1.0, np.nan, 1.0]])
    out = np.asarray(Image.open(io.BytesIO(F.overlay_png(pixels, heat, patch_size=P, opacity=1.0, colorscale=BW,
                                                         smooth=False))))
    for r in range(2):
        for c in range(3):
            block = out[r * P:(r + 1) * P, c * P:(c + 1) * P]
            if np.isnan(heat[r, c]):  # no value: the image shows through untouched
                np.testing.assert_array_equal(block, pixels[r * P:(r + 1) * P, c * P:(c + 1) * P])
            else:
                assert (block == 255 * heat[r, c]).all()
    heat = np.ones(GRID)
    heat[0, 0] = 0.0
    half = np.asarray(Image.open(io.BytesIO(F.overlay_png(pixels, heat, patch_size=P, opacity=0.5, colorscale=BW,
                                                          smooth=False)))).astype(int)
    expected = pixels * 0.5 + 255 * 0.5 * np.kron(heat, np.ones((P, P)))[..., None]  # white at 1, black at 0
    assert np.abs(half - expected).max() <= 0.5


def test_overlay_png_smooth_orientation_and_nan(pixels):
    ramp = np.array([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])  # dark left, bright right, same on both rows
    out = np.asarray(Image.open(io.BytesIO(F.overlay_png(pixels, ramp, patch_size=P, opacity=1.0, colorscale=BW))))
    grey = out[..., 0].astype(int)
    assert (np.diff(grey, axis=1) >= 0).all() and (grey == grey[:1]).all()
    assert grey[0, 0] == 0 and grey[0, -1] == 255
    # next to a NaN cell the overlay fades out but keeps its colour. On a black image, top row, pixel x = 7 (centre
    # 7.5 px = 1.875 cells): bilinear weights .625 on cell (0, 1) = 1 and .375 on cell (0, 2) = NaN, so the colour is
    # white and the coverage .625: 255 * .625 = 159 (a NaN read as 0 would give white * .625 * .625 = 100).
    heat = np.array([[1.0, 1.0, np.nan], [0.0, 1.0, 1.0]])
    black = np.zeros_like(pixels)
    out = np.asarray(Image.open(io.BytesIO(F.overlay_png(black, heat, patch_size=P, opacity=1.0, colorscale=BW))))
    assert tuple(out[0, 2 * P - 1]) == (159, 159, 159)
    assert (out[: P // 2, 3 * P - P // 2 :] == 0).all()  # the NaN cell's outer corner: no overlay at all


def test_figure_html_is_self_contained(pixels):
    html = F.figure_html(F.overlay_figure(pixels, np.zeros(GRID), patch_size=P))
    assert html.lstrip().lower().startswith(("<!doctype html>", "<html")) and html.rstrip().endswith("</html>")
    assert "plotly.js v" in html  # the library itself is inlined
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", html, flags=re.IGNORECASE)


def test_overlay_original_png_is_the_seen_region_at_full_resolution_in_blocks():
    """A 2x3 map over the box (10, 20)-(70, 60) of a 100 x 80 image: a 60 x 40 PNG, each cell a 20 x 20 block."""
    rng = np.random.default_rng(3)
    original = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    heat = np.array([[0.0, 1.0, 0.0], [1.0, np.nan, 1.0]])
    png = F.overlay_original_png(Image.fromarray(original), (10, 20, 70, 60), heat, opacity=1.0, colorscale=BW)
    out = np.asarray(Image.open(io.BytesIO(png)))
    assert out.shape == (40, 60, 3)
    region = original[20:60, 10:70]
    for r in range(2):
        for c in range(3):
            block = out[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20]
            if np.isnan(heat[r, c]):
                np.testing.assert_array_equal(block, region[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20])
            else:
                assert (block == 255 * heat[r, c]).all(), (r, c)
    with pytest.raises(ParameterError, match="positive width"):
        F.overlay_original_png(Image.fromarray(original), (10, 20, 10, 60), heat)


@pytest.mark.parametrize("name", ["Inferno", "Magma", "Viridis", "Plasma", "Turbo", "Jet", "Greys"])
def test_figures_send_colours_as_rgb_stops_equal_to_plotlys_scale(pixels, name):
    """Streamlit's front end swaps literal hex placeholders such as #000004 (Inferno's first colour) for theme
    colours: figures carry rgb() stops, colour for colour plotly's own scale."""
    want = [(pos, "rgb({}, {}, {})".format(*pcolors.hex_to_rgb(c)) if c.startswith("#") else c)
            for pos, c in pcolors.get_colorscale(name)]
    fig = F.overlay_figure(pixels, np.random.default_rng(0).random(GRID), patch_size=P, colorscale=name)
    assert [tuple(s) for s in fig.data[1].colorscale] == [(float(p), c) for p, c in want]
    heads = F.head_grid_figure(np.random.default_rng(1).random((2, *GRID)), patch_size=P, colorscale=name,
                               shared_scale=True)
    assert not re.search(r"#[0-9a-fA-F]{6}", json.dumps(heads.layout.coloraxis.to_plotly_json()))
    assert "#000004" not in json.dumps(fig.to_plotly_json()["data"], default=str)


def test_outlined_patches_and_rgb_blocks_by_hand(pixels):
    heat = np.arange(6, dtype=float).reshape(GRID)
    fig = F.overlay_figure(pixels, heat, patch_size=P, outlined=[0, 5], highlight=1, colorbar_title="norm")
    rects = [(s.x0, s.y0, s.x1, s.y1, s.line.dash) for s in fig.layout.shapes]
    assert (0, 0, P, P, "dot") in rects and (2 * P, P, 3 * P, 2 * P, "dot") in rects  # patches 0 and 5 marked
    assert (P, 0, 2 * P, P, None) in rects and fig.data[1].colorbar.title.text == "norm"
    rgb = np.zeros((*GRID, 3))
    rgb[0, 1] = (1.0, 0.5, 0.0)
    img = F.rgb_patch_figure(rgb, patch_size=P, highlight=4)
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(img.data[0].source.split(",", 1)[1]))))
    assert picture.shape == (GRID[0] * P, GRID[1] * P, 3)
    assert (picture[:P, P:2 * P] == (255, 128, 0)).all() and (picture[:P, :P] == 0).all()
    with pytest.raises(ParameterError, match="rows, columns, 3"):
        F.rgb_patch_figure(np.zeros(GRID), patch_size=P)


def test_histogram_and_curves_figures_carry_the_values():
    values = np.array([1.0, 10.0, 100.0, 1000.0])
    fig = F.histogram_figure(values, marked=np.array([False, False, False, True]), extra={"CLS": 50.0})
    np.testing.assert_allclose(np.concatenate([fig.data[0].x, fig.data[1].x]), [0, 1, 2, 3])
    assert fig.data[1].name == "outliers" and len(fig.layout.shapes) == 1
    curves = F.curves_figure(np.array([0, 0.5]), {"LeGrad MoRF": np.array([1, 0.2]), "random MoRF": np.array([1, .6])})
    assert [tr.name for tr in curves.data] == ["LeGrad MoRF", "random MoRF"] and curves.data[1].line.dash == "dot"
    with pytest.raises(ParameterError, match="values for"):
        F.curves_figure(np.array([0, 0.5]), {"x": np.array([1.0])})


# ------------------------------------------------------------------------------- what a new user hit (issue 19)


def test_histogram_ticks_and_titles_sit_outside_the_bars():
    """Issue 19, 4: the margins were 0, so the tick numbers were cut off, "log10 token norm" sat on the bars and the
    CLS line's name crossed the y title. Now the margins grow to hold ticks and titles, the x axis is ticked in the
    values' own unit (at their log10 positions) and each line's name sits above the plot area."""
    values = np.array([28.0, 31.0, 35.0, 40.0, 44.0, 52.0])
    fig = F.histogram_figure(values, x_title="token norm", extra={"CLS": 25.7, "register 0": np.array([80.0])})
    xa, ya = fig.layout.xaxis, fig.layout.yaxis
    assert xa.automargin and ya.automargin and xa.showticklabels is not False and ya.showticklabels is not False
    assert "log10" not in xa.title.text and "token norm" in xa.title.text
    ticks = dict(zip(xa.ticktext, xa.tickvals, strict=True))
    assert len(ticks) >= 3 and all(text for text in ticks)
    for text, pos in ticks.items():  # each label names the value at its position
        assert 10 ** pos == pytest.approx(float(text.replace(",", "")))
        assert np.log10(25.7) <= pos <= np.log10(80.0)
    notes = {a.text: a for a in fig.layout.annotations}
    assert set(notes) == {"CLS", "register 0"}
    for name, want in (("CLS", 25.7), ("register 0", 80.0)):
        a = notes[name]
        assert a.yref == "y domain" and a.y >= 1 and a.yanchor == "bottom"  # above the data area
        assert a.x == pytest.approx(np.log10(want))
    assert notes["register 0"].yshift != notes["CLS"].yshift  # one row each: names never overlap
    assert fig.layout.margin.t >= 2 * 16  # the top margin holds both rows


def test_mosaic_title_and_axis_titles_keep_clear_of_each_other():
    """Issue 19, 5: the title overlapped the top axis's title and the row title ran into the row numbers. The
    title is placed above the plot area with its own automargin (plotly then keeps it off the tick labels and axis
    titles); the axis titles stand off from their numbers."""
    fig = F.similarity_mosaic_figure(np.eye(16 * 16), grid=(16, 16))
    title = fig.layout.title
    assert title.automargin and title.yref == "paper" and title.y >= 1 and title.yanchor == "bottom"
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        assert axis.automargin and axis.title.standoff >= 8 and axis.title.text


def test_layer_scrub_slider_fits_and_play_starts_at_the_first_frame(pixels):
    """Issue 19, 6: the slider's labels were cut off (no bottom margin), and ▶ did nothing where the slider opens,
    on the last frame ("from current"). Now the bottom margin holds the slider, ▶ plays every frame from frame 0,
    and (7) the query patch is outlined on every frame."""
    maps = np.random.default_rng(5).random((4, *GRID)).astype(np.float32)
    fig = F.layer_scrub_figure(pixels, maps, patch_size=P, labels=list("abcd"), active=3, highlight=4)
    assert fig.layout.margin.b >= 80
    (slider,) = fig.layout.sliders
    assert slider.y <= 0 and slider.yanchor == "top"  # under the picture, in the bottom margin
    play = next(b for b in fig.layout.updatemenus[0].buttons if b.label == "▶")
    frames, options = play.args
    assert list(frames) == [f.name for f in fig.frames] and frames[0] == fig.frames[0].name
    assert options.get("fromcurrent") is not True
    (rect,) = fig.layout.shapes  # patch 4 = row 1, col 1
    assert (rect.x0, rect.y0, rect.x1, rect.y1) == (P, P, 2 * P, 2 * P)
    assert not F.layer_scrub_figure(pixels, maps, patch_size=P, labels=list("abcd")).layout.shapes


def test_colour_bars_never_write_si_suffixes(pixels):
    """Issue 19, 8: Chefer's relevance showed "0.2M … 1M" and a tiny map "μ". Every colour bar writes its numbers
    with significant digits and no SI suffix (d3's "s" type is what writes them)."""
    heat = np.linspace(2e5, 1e6, GRID[0] * GRID[1]).reshape(GRID)
    maps = np.stack([heat, heat])
    bars = [F.overlay_figure(pixels, heat, patch_size=P).data[1].colorbar,
            F.layer_scrub_figure(pixels, maps, patch_size=P, labels=["a", "b"]).data[1].colorbar,
            F.similarity_map_figure(np.eye(6), grid=GRID, index=0).data[0].colorbar,
            F.similarity_mosaic_figure(np.eye(6), grid=GRID).data[0].colorbar,
            F.head_grid_figure(maps, patch_size=P, shared_scale=True).layout.coloraxis.colorbar]
    for bar in bars:
        fmt = bar.tickformat
        assert fmt and re.fullmatch(r"[.,]?\d*~?[eg]", fmt.lstrip(",")), fmt  # significant digits, never "s"
        assert int(re.search(r"\d+", fmt).group()) >= 2


def test_each_head_on_its_own_range_states_the_range():
    """Issue 19, 9: with each head on its own range there is no colour bar; each subplot's title states its range."""
    maps = np.stack([np.full(GRID, 0.5), np.linspace(0.01, 0.42, 6).reshape(GRID)]).astype(np.float32)
    own = F.head_grid_figure(maps, patch_size=P, shared_scale=False)
    assert [a.text for a in own.layout.annotations] == ["head 0 · 0.5–0.5", "head 1 · 0.01–0.42"]
    shared = F.head_grid_figure(maps, patch_size=P, shared_scale=True)
    assert [a.text for a in shared.layout.annotations] == ["head 0", "head 1"]  # one colour bar says it
