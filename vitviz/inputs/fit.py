"""Fitting a loaded image to a model's input: timm's eval crop or the whole image on a grid of patches, the tensor
the model reads, and where a patch lies in the pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError, ParameterError

__all__ = ["Fit", "FittedImage", "fit_image", "whole_image_size", "aspect_kept", "to_tensor", "patch_box"]

Fit = Literal["crop", "whole"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_FULL_RESIZE_PIXELS = 16_000_000  # crop fit: above this, resample only the crop instead of timm's full resize


@dataclass(frozen=True)
class FittedImage:
    """What the model sees (before normalisation) and where that region lies in the original image."""

    pixels: np.ndarray  # (H, W, 3) uint8
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in original pixels (after EXIF rotation)
    input_size: tuple[int, int]  # (H, W)
    fit: str
    description: str


# ---------------------------------------------------------------------------------------------------------------------
# fitting to the model input


def _check_size(input_size) -> tuple[int, int]:
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(isinstance(s, int) and s >= 1 for s in input_size)):
        raise ParameterError(f"input_size must be (H, W) with two positive integers, got {input_size!r}")
    return int(input_size[0]), int(input_size[1])


def _crop_geometry(w: int, h: int, *, out_h: int, out_w: int, crop_pct: float) -> tuple[int, int, int, int]:
    """timm's eval resize (new_w, new_h) and centre-crop offset (left, top), computed exactly as timm/torchvision do."""
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if scale_h == scale_w:  # torchvision Resize(int): shorter side -> scale, longer side truncated
        short, long = min(w, h), max(w, h)
        new_short, new_long = scale_h, int(scale_h * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:  # timm ResizeKeepRatio(longest=0): the side closest to its target decides the scale
        ratio = min(h / scale_h, w / scale_w)
        new_h, new_w = round(h / ratio), round(w / ratio)
    top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))  # torchvision center_crop
    return new_w, new_h, left, top


def _resize_region(img: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                   resample: Image.Resampling) -> Image.Image:
    """Resample only ``box`` of ``img`` to ``size`` (w, h), never building the full resized image.

    One axis at a time, each a horizontal PIL pass (the vertical one on the transposed strip): PIL's own
    two-axis ``box=`` resize differs from resize-then-crop by up to ~25/255 on noise (Pillow 13), this by at most
    ~2/255 (PIL keeps the box in float32).
    """
    (x0, y0, x1, y1), (out_w, out_h) = box, size
    pad = math.ceil(2 * max((y1 - y0) / out_h, 1)) + 2  # rows the vertical filter can reach beyond the box
    top, bottom = max(0, math.floor(y0) - pad), min(img.height, math.ceil(y1) + pad)
    strip = img.crop((0, top, img.width, bottom))  # (w, rows)
    rows = strip.resize((out_w, strip.height), resample, box=(x0, 0, x1, strip.height))  # x pass
    t = Image.Transpose.TRANSPOSE
    return rows.transpose(t).resize((out_h, out_w), resample, box=(y0 - top, 0, y1 - top, out_w)).transpose(t)


def fit_image(
        img: Image.Image,
        *,
        input_size: tuple[int, int],
        fit: Fit = "crop",
        crop_pct: float = 0.875,
        interpolation: Interpolation = "bicubic",
) -> FittedImage:
    """Resize ``img`` to the model's ``input_size`` (H, W) as timm's eval transform does ("crop") or whole ("whole").

    "crop": shorter side to floor(size / crop_pct), centre crop (timm crop_mode "center"), the same pixels as
    timm's eval transform; for extreme aspect ratios (a full resize over 16 M pixels) only the crop is resampled.
    "whole": the whole image resized to exactly input_size (choose it with :func:`whole_image_size`).
    """
    out_h, out_w = _check_size(input_size)
    if fit not in ("crop", "whole"):
        raise ParameterError(f"fit must be 'crop' or 'whole', got {fit!r}")
    if interpolation not in _RESAMPLE:
        raise ParameterError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ParameterError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    resample = _RESAMPLE[interpolation]
    if fit == "whole":
        box = (0.0, 0.0, float(w), float(h))
        change = (out_w / out_h) / (w / h) - 1
        aspect = "aspect ratio kept" if abs(change) < 0.005 else f"aspect ratio changed by {change:+.1%}"
        description = f"whole image: resized {w}x{h} to {out_w}x{out_h} px, {aspect}"
        out = rgb.resize((out_w, out_h), resample)
    else:
        new_w, new_h, left, top = _crop_geometry(w, h, out_h=out_h, out_w=out_w, crop_pct=crop_pct)
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        description = (f"centre crop {crop_pct:.1%}: resized {w}x{h} to {new_w}x{new_h} px (shorter side "
                       f"{min(new_w, new_h)} px), cropped {out_w}x{out_h} from the middle")
        if new_w * new_h <= _FULL_RESIZE_PIXELS:  # exactly timm: resize the whole image, then crop
            out = rgb.resize((new_w, new_h), resample).crop((left, top, left + out_w, top + out_h))
        else:  # extreme aspect ratio: timm's full resize would be huge; resample only the crop (within ~2/255)
            out = _resize_region(rgb, box, (out_w, out_h), resample)
    pixels = np.array(out, dtype=np.uint8)  # (H, W, 3)
    return FittedImage(pixels=pixels, box=box, input_size=(out_h, out_w), fit=fit, description=description)


def whole_image_size(
        original_size: tuple[int, int],
        *,
        target: int,
        patch_size: int,
        max_side: int | None = None,
) -> tuple[int, int]:
    """(H, W) for a "whole" fit: multiples of patch_size, about the token budget of a target x target square.

    The aspect ratio is kept within one patch: the grid (gh, gw) has gw within one patch of gh·aspect, or gh within one
    patch of gw / aspect. Among such grids with gh·gw <= (target // patch_size)² tokens and sides <= max_side px, the
    one with the most tokens wins (ties: the smaller aspect error). An image more extreme than max_side allows (one
    patch by max_side) gets that strip, the only case where the aspect is not kept.
    """
    w, h = original_size
    if not (isinstance(w, int) and isinstance(h, int) and w >= 1 and h >= 1):
        raise ParameterError(f"original_size must be (w, h) with positive integers, got {original_size!r}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ParameterError(f"patch_size must be a positive integer, got {patch_size!r}")
    if not isinstance(target, int) or target < patch_size:
        raise ParameterError(f"target must be an integer >= patch_size ({patch_size}), got {target!r}")
    if max_side is not None and (not isinstance(max_side, int) or max_side < patch_size):
        raise ParameterError(f"max_side must be None or an integer >= patch_size ({patch_size}), got {max_side!r}")
    budget = target**2 // patch_size**2
    cap = budget if max_side is None else min(budget, max_side // patch_size)
    gh, gw = _whole_grid(w / h, budget=budget, cap=cap)
    return gh * patch_size, gw * patch_size


def aspect_kept(gh: int, gw: int, aspect: float) -> bool:
    """Whether a (gh, gw) grid keeps ``aspect`` (w / h) within one patch on one of its sides."""
    return abs(gw - gh * aspect) <= 1 or abs(gh - gw / aspect) <= 1


def _whole_grid(aspect: float, *, budget: int, cap: int) -> tuple[int, int]:
    def near(x: float) -> range:  # the whole numbers within one of x, at least 1
        return range(max(1, math.ceil(x - 1)), math.floor(x + 1) + 1)

    cands = set()
    for g in range(1, cap + 1):  # for each height the widths that keep the aspect, and for each width the heights
        cands |= {(g, c) for c in near(g * aspect)} | {(r, g) for r in near(g / aspect)}
    ok = [(gh * gw, -abs(math.log(gw / gh / aspect)), gh, gw) for gh, gw in cands
          if gh <= cap and gw <= cap and gh * gw <= budget and aspect_kept(gh, gw, aspect)]
    if ok:
        return max(ok)[2:]
    return (1, cap) if aspect > 1 else (cap, 1)  # more extreme than a one-patch strip of max_side


def to_tensor(pixels: np.ndarray, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32, (x / 255 - mean) / std as timm's ToTensor + Normalize."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ParameterError("pixels must be an (H, W, 3) uint8 array")
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if mean_t.shape != (3,) or std_t.shape != (3,) or not bool((std_t > 0).all()):
        raise ParameterError(f"mean and std must have 3 values each and std must be > 0, got {mean!r}, {std!r}")
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1).div(255)  # (3, H, W)
    return ((x - mean_t[:, None, None]) / std_t[:, None, None]).unsqueeze(0).contiguous()


def patch_box(index: int, *, grid: tuple[int, int], patch_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in model-input pixels of patch ``index`` (row-major, as timm flattens patches)."""
    gh, gw = grid
    if not 0 <= index < gh * gw:
        raise ParameterError(f"patch index must be in [0, {gh * gw - 1}] for a {gh}x{gw} grid, got {index}")
    row, col = divmod(index, gw)
    return col * patch_size, row * patch_size, (col + 1) * patch_size, (row + 1) * patch_size
