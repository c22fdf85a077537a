"""Argument checks and the colour range shared by every builder: numpy only, so the PNG path stays free of plotly."""

import numpy as np

from ..errors import ImageError, ParameterError


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
