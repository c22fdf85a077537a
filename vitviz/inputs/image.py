"""Image loading and fitting an image to a ViT's input.

``load_image`` turns whatever a user hands over (bytes, a path, an uploaded file, a PIL image) into an RGB PIL image
with EXIF orientation applied, or refuses it with an :class:`~vitviz.errors.ImageError` whose message says why:
empty, not an image, truncated or corrupt, too many bytes, pixels or bytes to decode. The pixel and memory limits
are checked from the header, before anything is decoded. ``fit_image`` reproduces timm's eval preprocessing (resize,
centre crop) exactly and also says which region of the original the model saw; ``to_tensor`` normalises it.

The preprocessing numbers (input size, crop_pct, interpolation, mean, std) come from the caller, who reads them from
``timm.data.resolve_model_data_config(model)``.
"""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageMode, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ParameterError, VitvizError
from .fit import FittedImage, fit_image, patch_box, to_tensor, whole_image_size

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "MAX_DECODE_BYTES",
    "SUPPORTED_FORMATS",
    "LoadedImage",
    "FittedImage",
    "load_image",
    "decode_bytes",
    "fit_image",
    "whole_image_size",
    "to_tensor",
    "patch_box",
]

MAX_UPLOAD_BYTES = 50 * 10**6  # Streamlit counts its upload limit in MB of 10^6 bytes
MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what uploads and folders offer
MAX_DECODE_BYTES = 512 * 10**6  # memory to decode, orient and convert one image: a 64-megapixel RGB photo fits
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG also opens MPO (phone multi-picture JPEG)

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO | Image.Image

_HIGH_DEPTH = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "floating-point"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_FORMATS_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"
_MODE_WORDS = {"1": "black-and-white", "L": "greyscale", "P": "palette", "RGB": "RGB", "RGBA": "RGBA",
               "LA": "greyscale with alpha", "PA": "palette with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr",
               **{m: f"{depth} greyscale" for m, depth in _HIGH_DEPTH.items()}}
_SCALE_BLOCK_BYTES = 4 * 2**20  # float64 working memory of the 16/32-bit scaling, one block of rows at a time


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a model: RGB, EXIF orientation applied, first frame only."""

    image: Image.Image  # RGB
    source_name: str  # sanitised, for display only
    original_size: tuple[int, int]  # (w, h) after EXIF rotation
    original_mode: str
    format: str | None
    n_frames: int
    notes: tuple[str, ...]  # what was changed on the way, for a person


# ---------------------------------------------------------------------------------------------------------------------
# names, bytes


def _display_name(name: str | None) -> str:
    """The last path component, without control/format characters, collapsed whitespace, at most 80 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = " ".join("".join(ch for ch in base if unicodedata.category(ch)[0] != "C").split())
    if base in ("", ".", ".."):
        return "image"
    return base if len(base) <= 80 else base[:77] + "..."


def _megabytes(n: int) -> str:
    """Decimal units, as Streamlit's uploader states its limit (50 MB = 50,000,000 bytes)."""
    return f"{n / 10**6:.1f} MB" if n >= 10**6 else f"{n / 10**3:.1f} kB" if n >= 10**3 else f"{n} bytes"


def _too_big(name: str, size: int | None, max_bytes: int) -> ImageError:
    have, limit = (_megabytes(size) if size is not None else None), _megabytes(max_bytes)
    if have == limit:  # rounded to the same text: show exact byte counts
        have, limit = f"{size:,} bytes", f"{max_bytes:,} bytes"
    have = f"is {have}" if size is not None else "is larger than that"
    return ImageError(f"'{name}' {have}; the limit is {limit}. Save it smaller (e.g. as JPEG) first.")


def _read_bytes(source, *, name: str, max_bytes: int) -> bytes:
    """All bytes of ``source``, refusing more than ``max_bytes`` before reading them where the source tells its size."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise _too_big(name, len(data), max_bytes)
        return data
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.is_file():
                raise ImageError(f"'{name}' is not a file that can be read; check the path.")
            size = path.stat().st_size
            if size > max_bytes:
                raise _too_big(name, size, max_bytes)
            return path.read_bytes()
        except OSError as e:
            raise ImageError(f"'{name}' cannot be read: {e.strerror or e}") from e
    if not hasattr(source, "read"):
        raise TypeError(f"cannot read an image from a {type(source).__name__}; pass bytes, a path or a binary file")
    try:
        size = getattr(source, "size", None)  # Streamlit's UploadedFile knows its size
        if getattr(source, "seekable", lambda: False)():
            if not isinstance(size, int):
                size = source.seek(0, io.SEEK_END)
            source.seek(0)
        if isinstance(size, int) and size > max_bytes:
            raise _too_big(name, size, max_bytes)
        data = source.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(f"'{name}' cannot be read: {e}") from e
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("the file object must be opened in binary mode ('rb')")
    if len(data) > max_bytes:
        raise _too_big(name, None, max_bytes)
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------------------
# structure checks that do not depend on PIL's global LOAD_TRUNCATED_IMAGES


def _png_problem(data: bytes) -> str | None:
    """Walk the PNG chunks: a bad CRC or a chunk cut off by the end of the file is a problem; None if fine."""
    view, pos = memoryview(data), 8
    while pos < len(data):
        if pos + 12 > len(data):
            return "the file ends in the middle of a chunk (truncated)"
        length, cid = int.from_bytes(data[pos:pos + 4], "big"), bytes(data[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return f"the file ends inside its {cid.decode('latin-1')!r} chunk (truncated)"
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"the checksum of its {cid.decode('latin-1')!r} chunk is wrong (corrupt)"
        if cid == b"IEND":
            return None
        pos = end
    return None


def _jpeg_complete(data: bytes) -> bool:
    """True if the JPEG's marker stream reaches an end-of-image marker (segments skipped by their lengths)."""
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return False
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            return True
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffed 0xFF, TEM, RSTn: no length field
            pos += 2
        else:  # a segment with a length; after SOS the entropy-coded data is scanned by find()
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")


def _check_structure(data: bytes, name: str) -> None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and (problem := _png_problem(data)):
        raise ImageError(f"'{name}' is a damaged PNG: {problem}. Re-save or re-download it.")
    if data.startswith(b"\xff\xd8\xff") and not _jpeg_complete(data):
        raise ImageError(f"'{name}' is an incomplete JPEG: the file stops before the image ends (truncated upload "
                         "or download?). Re-save or re-download it.")


def _not_an_image(data: bytes, name: str) -> ImageError:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head or head.startswith(b"<?xml") and b"svg" in head:
        return ImageError(f"'{name}' is an SVG (vector) image; SVG is not supported. Convert it to PNG first.")
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:512]:
        return ImageError(f"'{name}' is an HTML page, not an image (a web page saved under an image name?). "
                          f"Save the picture itself as {_FORMATS_TEXT}.")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc"):
        return ImageError(f"'{name}' is a HEIC/AVIF image, which is not supported. Convert it to JPEG or PNG first.")
    return ImageError(f"'{name}' is not an image that can be read; use {_FORMATS_TEXT}.")


# ---------------------------------------------------------------------------------------------------------------------
# decoding and conversion


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"'{name}' has no pixels ({w}x{h}).")
    if w * h > max_pixels:
        raise ImageError(f"'{name}' is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels "
                         f"(e.g. {math.isqrt(max_pixels)}x{math.isqrt(max_pixels)}). Downscale it first.")


def _storage_bytes(mode: str) -> int:
    """Bytes PIL keeps per pixel: single-band modes their sample size, multi-band modes always 4 (RGB too)."""
    try:
        info = ImageMode.getmode(mode)
    except KeyError:
        return 4
    return 4 if len(info.bands) > 1 else np.dtype(info.typestr).itemsize


def _decode_cost(mode: str, transparency: bool) -> tuple[int, int]:
    """(bytes per pixel, fixed bytes) held at once while an image of ``mode`` is decoded and converted to RGB.

    Per pixel: the decoded image (B bytes, PIL's storage of the mode) and its oriented copy (B), plus what the
    conversion to RGB holds at once: 16/32-bit and float scaling 5 (the 8-bit result and the RGB image; fixed: a
    few blocks of rows); transparency 5 or 9 (an RGBA copy unless it is RGBA, its alpha, the RGB result); RGB
    nothing; anything else 4 (the RGB result).
    """
    b = _storage_bytes(mode)
    if mode in _HIGH_DEPTH:
        return 2 * b + 5, 3 * _SCALE_BLOCK_BYTES
    if mode in _ALPHA_MODES or transparency:
        return 2 * b + (5 if mode == "RGBA" else 9), 0
    return 2 * b + (0 if mode == "RGB" else 4), 0


def decode_bytes(mode: str, size: tuple[int, int], *, transparency: bool = False) -> int:
    """Peak memory of decoding an image of ``mode`` and ``size`` (w, h) and converting it to RGB, as done here."""
    per_pixel, fixed = _decode_cost(mode, transparency)
    return size[0] * size[1] * per_pixel + fixed


def _check_memory(im: Image.Image, name: str, max_bytes: int) -> None:
    transparency = "transparency" in im.info
    need = decode_bytes(im.mode, im.size, transparency=transparency)
    if need > max_bytes:
        (w, h), (per_pixel, fixed) = im.size, _decode_cost(im.mode, transparency)
        side = math.isqrt(max(0, max_bytes - fixed) // per_pixel)
        raise ImageError(
            f"'{name}' would need about {_megabytes(need)} of memory to decode and convert ({w}x{h} pixels, "
            f"{_MODE_WORDS.get(im.mode, 'colour mode ' + im.mode)}: {per_pixel} bytes per pixel); the limit is "
            f"{_megabytes(max_bytes)}. Downscale it first (to about {side}x{side} pixels or fewer)."
        )


def _row_blocks(im: Image.Image):
    """(first row, (rows, w) array) blocks of a single-band image, each about _SCALE_BLOCK_BYTES in float64."""
    rows = max(1, _SCALE_BLOCK_BYTES // (8 * im.width))
    for r in range(0, im.height, rows):
        yield r, np.asarray(im.crop((0, r, im.width, min(im.height, r + rows))))


def _finite_range(im: Image.Image) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for _, block in _row_blocks(im):
        finite = np.isfinite(block)  # all true for integer modes
        values = block if finite.all() else block[finite]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)  # (0, 0): no finite value at all


def _scale_to_8bit(im: Image.Image) -> tuple[Image.Image, str]:
    """Map the finite range [lo, hi] of a 16/32-bit or float image linearly onto 0..255 (no clipping).

    v -> rint((v - lo) / (hi - lo) * 255) in float64, non-finite values -> 0; computed a block of rows at a time, in
    place, so the working memory stays about _SCALE_BLOCK_BYTES whatever the image size.
    """
    lo, hi = _finite_range(im)
    grey = np.zeros((im.height, im.width), dtype=np.uint8)  # (h, w)
    if hi > lo:
        for r, block in _row_blocks(im):
            x = block.astype(np.float64)
            finite = np.isfinite(x)
            x -= lo
            x /= hi - lo
            x *= 255
            np.rint(x, out=x)
            x[~finite] = 0
            grey[r:r + len(x)] = x
    note = f"{_HIGH_DEPTH[im.mode]} image scaled to 8-bit (values {lo:g}..{hi:g} mapped to 0..255)"
    return Image.fromarray(grey, mode="L").convert("RGB"), note


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    if im.mode in _HIGH_DEPTH:
        rgb, note = _scale_to_8bit(im)
        return rgb, [note]
    if im.mode == "CMYK":
        return im.convert("RGB"), ["CMYK converted to RGB"]
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # ``im`` is already vitviz's own copy
        alpha = rgba.getchannel("A")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=alpha)
        transparent = alpha.getextrema()[0] < 255
        return out, ["transparency composited on white"] if transparent else []
    if im.mode == "RGB":
        return im, []
    try:
        return im.convert("RGB"), []
    except ValueError as e:
        raise ImageError(f"colour mode {im.mode} cannot be converted to RGB; save the image as RGB first.") from e


def _frames_note(fmt: str | None, n_frames: int) -> list[str]:
    if n_frames <= 1:
        return []
    if fmt == "TIFF":
        return [f"multi-page TIFF: using page 1 of {n_frames}"]
    if fmt == "MPO":
        return [f"multi-picture JPEG (MPO): using image 1 of {n_frames}"]
    kind = "APNG" if fmt == "PNG" else fmt or "image"
    return [f"animated {kind}: using frame 1 of {n_frames}"]


def _from_pil(im: Image.Image, *, name: str, max_pixels: int, max_decode_bytes: int) -> LoadedImage:
    """Decode (first frame), check, orient and convert an opened PIL image; PIL exceptions pass through."""
    _check_pixels(im.size, name, max_pixels)  # from the header: nothing is decoded yet
    _check_memory(im, name, max_decode_bytes)
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1:
        im.seek(0)
    im.load()
    _check_memory(im, name, max_decode_bytes)  # a few formats only know their mode once decoded (GIF, APNG frames)
    mode, fmt = im.mode, im.format
    notes = _frames_note(fmt, n_frames)
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        oriented = ImageOps.exif_transpose(im)  # always a new image, never the caller's
    except Exception:  # broken EXIF block: the pixels are fine, the orientation is unknown
        orientation, oriented = 1, im.copy()
        notes.append("EXIF data unreadable: orientation ignored")
    if orientation in range(2, 9):
        notes.append(f"EXIF orientation {orientation} applied")
    rgb, conversion = _to_rgb(oriented)
    return LoadedImage(image=rgb, source_name=name, original_size=rgb.size, original_mode=mode, format=fmt,
                       n_frames=n_frames, notes=tuple(notes + conversion))


def _decode(data: bytes | None, pil: Image.Image | None, *, name: str, max_pixels: int,
            max_decode_bytes: int) -> LoadedImage:
    """Decode, turning every failure into ImageError.

    PIL's warnings are left alone: ``warnings.catch_warnings`` swaps process-wide state, which is not safe in a
    server decoding in several threads. Where warnings are errors (``-W error``), PIL's decompression-bomb warning
    gets the same message as its error.
    """
    try:
        if pil is not None:
            return _from_pil(pil, name=name, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as im:
            return _from_pil(im, name=name, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
    except VitvizError:
        raise
    except UnidentifiedImageError as e:
        raise _not_an_image(data or b"", name) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own limit, from the header
        found = re.search(r"\((\d+) pixels\)", str(e))
        have = f" ({int(found[1]):,} pixels)" if found else ""
        raise ImageError(f"'{name}' has too many pixels to decode safely{have}; the limit is {max_pixels:,} "
                         "pixels. Downscale it first.") from e
    except MemoryError as e:
        raise ImageError(f"'{name}' needs more memory to decode than is available; downscale it first.") from e
    except ValueError as e:
        if "MAX_TEXT" not in str(e) and "decompressed data too large" not in str(e).lower():  # PNG text-chunk limits
            raise ImageError(f"'{name}' could not be decoded ({type(e).__name__}: {e}); the file is probably "
                             "truncated or corrupt. Re-save or re-download it.") from e
        raise ImageError(f"'{name}' carries more compressed text (PNG metadata) than is safe to unpack, which is "
                         "how a tiny file can ask for a lot of memory. Re-save the picture without its metadata "
                         "(any image editor's 'export as PNG' does).") from e
    except Exception as e:  # any decoder failure on untrusted input is the file's fault
        raise ImageError(f"'{name}' could not be decoded ({type(e).__name__}: {e}); the file is probably "
                         "truncated or corrupt. Re-save or re-download it.") from e


def load_image(
        source: ImageSource,
        *,
        name: str | None = None,
        max_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int = MAX_PIXELS,
        max_decode_bytes: int = MAX_DECODE_BYTES,
) -> LoadedImage:
    """Load an image as RGB (EXIF orientation applied, first frame), or raise ImageError saying why not.

    Args:
        source: bytes, a path, a binary file-like object (read from its start, e.g. Streamlit's UploadedFile),
            or a PIL image.
        name: file name for messages only (never opened); defaults to the source's own name. Shown sanitised.
        max_bytes: refuse larger files, checked before reading where the source tells its size.
        max_pixels: refuse images with more pixels, checked from the header before decoding.
        max_decode_bytes: refuse images whose decoding and conversion to RGB would hold more memory at once
            (:func:`decode_bytes`: pixels times bytes per pixel of the file's colour mode and of each conversion),
            checked from the header before decoding.
    """
    for arg, value in (("max_bytes", max_bytes), ("max_pixels", max_pixels), ("max_decode_bytes", max_decode_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ParameterError(f"{arg} must be a positive integer, got {value!r}")
    if name is None:
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
        elif isinstance(source, Image.Image):
            name = getattr(source, "filename", None) or None
        elif not isinstance(source, (bytes, bytearray, memoryview)):
            name = getattr(source, "name", None)
        name = name if isinstance(name, str) else None
    shown = _display_name(name)
    if isinstance(source, Image.Image):
        return _decode(None, source, name=shown, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
    data = _read_bytes(source, name=shown, max_bytes=max_bytes)
    if not data:
        raise ImageError(f"'{shown}' is empty (0 bytes); upload the file again.")
    _check_structure(data, shown)
    return _decode(data, None, name=shown, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
