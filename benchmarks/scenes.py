"""On-object test scenes made from real photos: a photo pasted on a flat background, so the object's box is known.

Real photos have no object masks, so "does the map stay on the object" is measured the way the tests measure it
on the default model: paste the photo (the object), scaled to ``scale`` of the canvas side, at a position drawn
from a seeded generator, onto a flat grey canvas; the on-object mass of a (gh, gw) map is its share inside the
pasted box. The scene depends only on the photo and the seed, so every method and setting sees the same input.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["pasted_scene", "mass_inside"]


def pasted_scene(photo: Image.Image, *, size: int = 224, scale: float = 0.5, seed: int = 0,
                 grey: int = 128) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """(canvas, (top, left, bottom, right)) in canvas pixels; the photo is resized to a square of scale·size px."""
    side = max(1, round(size * scale))
    obj = photo.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    canvas = Image.new("RGB", (size, size), (grey, grey, grey))
    canvas.paste(obj, (left, top))
    return canvas, (top, left, top + side, left + side)


def mass_inside(heat: np.ndarray, box: tuple[int, int, int, int], *, patch_size: int) -> float:
    """Share of a non-negative (gh, gw) map inside ``box`` (pixels), each patch weighted by its overlap with it."""
    gh, gw = heat.shape
    top, left, bottom, right = box
    edges_r = np.arange(gh + 1) * patch_size
    edges_c = np.arange(gw + 1) * patch_size
    over_r = np.clip(np.minimum(edges_r[1:], bottom) - np.maximum(edges_r[:-1], top), 0, None) / patch_size
    over_c = np.clip(np.minimum(edges_c[1:], right) - np.maximum(edges_c[:-1], left), 0, None) / patch_size
    h = np.clip(heat.astype(np.float64), 0, None)
    total = h.sum()
    return float((h * over_r[:, None] * over_c[None, :]).sum() / total) if total > 0 else 0.0
