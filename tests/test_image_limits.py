"""The memory of decoding an image is bounded by bytes, before decoding: pixels times the bytes per pixel of the file's
colour mode and of each conversion on the way to RGB. A small file that decodes to a huge image (a flat 16-bit PNG)
is refused from its header with the numbers in plain words; images within the budget cost what the estimate says."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import vitviz.inputs.image as vi
from vitviz.errors import ImageError
from vitviz.inputs.image import MAX_DECODE_BYTES, decode_bytes, load_image

from .helpers import encode, peak_rss_growth, png_chunk

MB = 10**6  # decimal, as the messages state sizes




def flat_16bit_png(w: int, h: int, value: int = 1234) -> bytes:
    """A w x h 16-bit greyscale PNG of one value, written chunk by chunk (rows after the first filtered "Up": zeros),
    so neither the test nor the file holds the pixels: 141 kB for 8000 x 8000."""
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    z = zlib.compressobj(9)
    first = b"\x00" + value.to_bytes(2, "big") * w
    rest = b"\x02" + bytes(2 * w)
    idat = z.compress(first) + b"".join(z.compress(rest) for _ in range(h - 1)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def no_decode(monkeypatch):
    def boom(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


def test_the_flat_16bit_8000px_png_is_refused_from_its_header_in_plain_words():
    data = flat_16bit_png(8000, 8000)
    assert len(data) < 200_000  # a 141 kB upload
    with Image.open(io.BytesIO(data)) as im:
        assert (im.mode, im.size) == ("I;16", (8000, 8000))  # PIL reads it as 16-bit greyscale, 2 bytes a pixel
    grown, err = peak_rss_growth(lambda: load_image(data, name="uploads/flat.png"))
    assert isinstance(err, ImageError), err
    assert str(err) == ("'flat.png' would need about 588.6 MB of memory to decode and convert (8000x8000 pixels, "
                        "16-bit greyscale: 9 bytes per pixel); the limit is 512.0 MB. Downscale it first (to about "
                        "7449x7449 pixels or fewer).")
    assert grown < 16 * MB, f"peak RSS grew by {grown / MB:.0f} MB before the refusal"


def test_refusal_comes_from_the_header_for_files_and_callers_images(no_decode, tmp_path):
    data = flat_16bit_png(3000, 2000)
    with pytest.raises(ImageError, match=r"3000x2000 pixels, 16-bit greyscale: 9 bytes per pixel"):
        load_image(data, max_decode_bytes=50 * MB)
    path = tmp_path / "flat.png"
    path.write_bytes(data)
    with Image.open(path) as lazy, pytest.raises(ImageError, match=r"the limit is 50\.0 MB"):
        load_image(lazy, max_decode_bytes=50 * MB)  # a caller's unloaded PIL image: not decoded either


def pattern(mode: str, w: int, h: int):
    """An image of ``mode`` with smooth content (quick to encode and decode), its format and save options."""
    y, x = np.indices((h, w))
    if mode == "I;16":
        return Image.fromarray((x * 13 + y * 7).astype(np.uint16)), "PNG", {}
    if mode == "F":
        return Image.fromarray(np.sin(x / 50.0).astype(np.float32) * y), "TIFF", {}
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK"), "JPEG", {}
    if mode == "P":
        return Image.fromarray(rgb).convert("P"), "PNG", {"transparency": 3}
    return Image.fromarray(rgb).convert(mode), "PNG", {}


MODES = ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "F"]
_PEAKS = """
import json, sys
sys.path.insert(0, {root!r})
from tests.helpers import peak_rss_growth
from vitviz.inputs.image import load_image
out = {{}}
for mode, path, need in json.load(open({jobs!r})):
    data = open(path, "rb").read()
    grown, res = peak_rss_growth(lambda: load_image(data, max_decode_bytes=need))  # exactly at the limit: loads
    out[mode] = [grown, res.image.mode, list(res.image.size)] if hasattr(res, "image") else [grown, repr(res), None]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    """mode -> (peak RSS growth while loading, the estimate, the result's mode and size), measured in a fresh
    interpreter that loads only these images: in the suite's own process the allocator's history (hundreds of tests
    before) moved the peak by 16 MB from one run to the next."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path_factory.mktemp("modes")
    jobs, needs = [], {}
    for mode in MODES:
        im, fmt, extra = pattern(mode, 2400, 1600)
        data = encode(im, fmt, **extra)
        with Image.open(io.BytesIO(data)) as probe:
            assert probe.mode == mode
            needs[mode] = decode_bytes(probe.mode, probe.size, transparency="transparency" in probe.info)
        (folder / mode.replace(";", "_")).write_bytes(data)
        jobs.append([mode, str(folder / mode.replace(";", "_")), needs[mode]])
    (folder / "jobs.json").write_text(json.dumps(jobs))
    root = str(Path(__file__).resolve().parents[1])
    code = _PEAKS.format(root=root, jobs=str(folder / "jobs.json"))
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=root).stdout.splitlines()[-1])
    return {mode: (got[mode][0], needs[mode], got[mode][1], tuple(got[mode][2] or ())) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_the_estimate_bounds_the_real_peak_for_every_conversion(mode, peaks):
    """Peak RSS while loading (decode, orient, convert) is at most the estimate and not far below it."""
    grown, need, out_mode, size = peaks[mode]
    assert out_mode == "RGB" and size == (2400, 1600), (out_mode, size)
    assert grown <= 1.05 * need + 4 * MB, f"{mode}: peak {grown / MB:.1f} MB, estimate {need / MB:.1f} MB"
    assert grown >= 0.6 * need, f"{mode}: peak {grown / MB:.1f} MB, estimate {need / MB:.1f} MB"
    im, fmt, extra = pattern(mode, 2400, 1600)
    with pytest.raises(ImageError, match=r"would need about .* the limit is"):
        load_image(encode(im, fmt, **extra), max_decode_bytes=need - 1)


def test_the_default_budget_admits_a_64_megapixel_rgb_photo():
    """The largest image the pixel limit allows, as an RGB photo (8 bytes per pixel on the way), fits the budget."""
    assert decode_bytes("RGB", (8000, 8000)) <= MAX_DECODE_BYTES < decode_bytes("RGBA", (8000, 8000))


@pytest.mark.parametrize("mode,values", [
    ("I;16", np.array([[0, 65535, 300], [7, 7, 40000]] * 40, dtype=np.uint16)),
    ("I", np.array([[-(2**31), 2**31 - 1, 5], [0, 1, -7]] * 40, dtype=np.int32)),
    ("F", np.array([[np.nan, -np.inf, 0.25], [np.inf, -3.5, 1e30]] * 40, dtype=np.float32)),
])
def test_blockwise_scaling_equals_the_whole_image_formula(monkeypatch, mode, values):
    """The block-by-block in-place scaling gives exactly rint((v - lo) / (hi - lo) * 255) over the finite range,
    non-finite values 0, computed here on the whole array at once (blocks of one row forced)."""
    values = np.ascontiguousarray(np.tile(values, (1, 7)))  # (80, 21)
    monkeypatch.setattr(vi, "_SCALE_BLOCK_BYTES", 1)
    im = Image.fromarray(values)
    assert im.mode == mode
    rgb, note = vi._scale_to_8bit(im)
    x = values.astype(np.float64)
    finite = np.isfinite(x)
    lo, hi = x[finite].min(), x[finite].max()
    want = np.rint(np.where(finite, (x - lo) / (hi - lo) * 255, 0)).astype(np.uint8)
    got = np.asarray(rgb)
    assert got.shape == (*values.shape, 3) and (got == want[..., None]).all()
    assert f"values {lo:g}..{hi:g} mapped to 0..255" in note
