"""Hostile and odd image files, end to end: refused with a typed, named message, or taken all the way through
load_image -> analyze -> the CLI. Every file is built here, in memory or under tmp_path.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitviz.analysis.maps import rollout_map
from vitviz.analysis.onepass import analyze, input_size_for
from vitviz.errors import ImageError
from vitviz.inputs.image import MAX_UPLOAD_BYTES, load_image
from vitviz.settings import Settings

from .helpers import bad_crc_png, encode, noise, png_header_only, run_cli, tiny_vit, truncated_jpeg

ARCH = "vit_tiny_patch16_224"
KW = dict(embed_dim=32, depth=3, num_heads=4)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- 1. files that are refused

REFUSED = {
    "empty": (b"", r"is empty \(0 bytes\)"),
    "text": (b"just some notes\nsecond line\n", r"is not an image that can be read; use JPEG, PNG"),
    "html": (b"<!DOCTYPE html>\n<html><body><img src='cat.jpg'></body></html>", r"is an HTML page, not an image"),
    "truncated-jpeg": (truncated_jpeg(), r"incomplete JPEG: the file stops before the image ends"),
    "jpeg-no-eoi": (encode(noise(16, 16), "JPEG")[:-2], r"incomplete JPEG"),
    "png-bad-crc": (bad_crc_png(), r"damaged PNG: the checksum of its .* chunk is wrong"),
    "png-cut": (encode(noise(20, 20), "PNG")[:-30], r"damaged PNG: the file ends"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>',
            r"is an SVG \(vector\) image; SVG is not supported\. Convert it to PNG"),
    "svg-xml": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', r"SVG is not supported"),
    "heic": (b"\0\0\0\x18ftypheic" + bytes(64), r"HEIC/AVIF image, which is not supported"),
    "bomb": (png_header_only(30000, 30000), r"too many pixels to decode safely.*limit is 64,000,000 pixels"),
    "over-pixel-limit": (png_header_only(9000, 9000), r"9000x9000 = 81,000,000 pixels; the limit is 64,000,000"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_files_are_refused_with_a_typed_message(tmp_path, ckpt, capsys, case):
    data, message = REFUSED[case]
    with pytest.raises(ImageError, match=message) as err:
        load_image(data, name=f"holiday/{case}.jpg")
    assert f"'{case}.jpg'" in str(err.value) and "holiday" not in str(err.value)  # named, directory dropped
    path = tmp_path / f"{case}.jpg"  # every case under an image suffix, as a renamed upload would be
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message):
        load_image(path)
    with pytest.raises(ImageError, match=message):
        load_image(io.BytesIO(data), name=path.name)
    # the CLI reports it in one line, writes nothing for it, and still does the good image beside it
    good = tmp_path / "good.png"
    good.write_bytes(encode(noise(40, 30), "PNG"))
    assert run_cli([path, good], tmp_path / "out", ckpt) == 1
    err_text = capsys.readouterr().err
    lines = [line for line in err_text.splitlines() if f"{case}.jpg" in line]
    assert len(lines) == 1 and "Traceback" not in err_text
    assert re.search(message, lines[0]) and "Error" not in lines[0]  # the message itself, no exception class name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.npz", "good.png", "summary.csv"]


BOMB_PROBE = """
import resource, sys, time, tracemalloc
from vitviz.inputs.image import load_image
from vitviz.errors import ImageError
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t0 = time.perf_counter()
try:
    load_image(data, name="bomb.png")
    kind = "loaded"
except ImageError:
    kind = "ImageError"
seconds = time.perf_counter() - t0
traced = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(kind, seconds, (after - before) * 1024, traced)
"""


@pytest.mark.parametrize("w,h", [(30000, 30000), (9000, 9000), (100_000, 1)])
def test_decompression_bomb_fails_fast_in_bounded_memory(tmp_path, w, h):
    """A fresh process, so its peak RSS (ru_maxrss) is this load's own: decoding 30000x30000 RGB would take 2.7 GB.

    No time limit is asserted (timings belong in the benchmark): the memory bounds prove the pixels are never
    decoded, and the subprocess timeout catches a hang. The probe's seconds are in the failure message.
    """
    expect = "loaded" if w * h <= 64_000_000 else "ImageError"  # 100000x1 is under the pixel limit: it loads
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(w, h) if expect == "ImageError" else encode(noise(w, h), "PNG"))
    proc = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    kind, seconds, rss_growth, traced = proc.stdout.split()
    assert kind == expect, f"{kind} after {float(seconds):.2f} s"
    assert int(rss_growth) < 32 * 2**20, f"peak RSS grew by {int(rss_growth) / 2**20:.0f} MB in {float(seconds):.2f} s"
    assert int(traced) < 16 * 2**20


def test_upload_size_limit_is_checked_before_reading(tmp_path, ckpt, capsys):
    data = encode(noise(30, 30), "PNG")
    with pytest.raises(ImageError, match=rf"'a\.png' is {len(data):,} bytes; the limit is {len(data) - 1:,} bytes"):
        load_image(data, name="a.png", max_bytes=len(data) - 1)
    assert load_image(data, max_bytes=len(data)).image.size == (30, 30)  # exactly at the limit is fine
    # the default limit, from a sparse file (nothing is written to disk, nothing is read)
    big = tmp_path / "huge.jpg"
    with big.open("wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)
    over = rf"'huge\.jpg' is {MAX_UPLOAD_BYTES + 1:,} bytes; the limit is {MAX_UPLOAD_BYTES:,} bytes\. Save it smaller"
    with pytest.raises(ImageError, match=over):
        load_image(big)

    class Upload(io.BytesIO):  # Streamlit's UploadedFile tells its size
        size = MAX_UPLOAD_BYTES + 1
        name = "huge.jpg"

        def read(self, *a):
            raise AssertionError("read although the size was over the limit")

    with pytest.raises(ImageError, match=over):
        load_image(Upload(b"x"))
    assert run_cli([big], tmp_path / "out", ckpt) == 1
    assert re.search(over, capsys.readouterr().err)


# -------------------------------------------------------------------------------- 2. odd images that must just work


def analyze_whole(loaded, *, img_size=32, patch=8):
    """The CLI's whole-image path by hand: the input size for this aspect ratio, a tiny model at that size."""
    h, w = input_size_for(loaded.image, img_size=img_size, patch_size=patch, fit="whole")
    model = tiny_vit(ARCH, img_size=(h, w), patch_size=patch)
    return analyze(model, loaded, fit="whole"), (h // patch, w // patch)


@pytest.mark.parametrize("w,h", [(1, 1), (2, 2000), (2000, 2), (5, 5), (1, 50_000)])
def test_tiny_and_extreme_images_work_end_to_end(tmp_path, ckpt, w, h):
    data = encode(noise(w, h), "PNG")
    loaded = load_image(data, name="odd.png")
    assert loaded.image.size == (w, h) and loaded.image.mode == "RGB"
    crop = analyze(tiny_vit(ARCH, img_size=32, patch_size=8), loaded, fit="crop")
    assert crop.grid == (4, 4) and crop.pixels.shape == (32, 32, 3) and crop.attention.shape == (3, 4, 17, 17)
    assert np.isfinite(crop.attention).all()
    np.testing.assert_allclose(crop.attention.sum(-1), 1.0, atol=1e-5)
    left, top, right, bottom = crop.box  # the crop lies inside the image and keeps the model's square aspect
    assert 0 <= left < right <= w + 1e-6 and 0 <= top < bottom <= h + 1e-6
    assert right - left == pytest.approx(bottom - top, rel=0.05, abs=0.05)
    whole, grid = analyze_whole(loaded)
    # hand-computed: 16-token budget; a thin image gets a 16x1 (or 1x16) grid, a square one 4x4
    want = {(1, 1): (4, 4), (5, 5): (4, 4), (2, 2000): (16, 1), (2000, 2): (1, 16), (1, 50_000): (16, 1)}[(w, h)]
    assert grid == want and whole.grid == want and whole.box == (0.0, 0.0, float(w), float(h))
    heat = rollout_map(whole.attention, info=whole.info, settings=Settings(start_layer=0))
    assert heat.shape == want and np.isfinite(heat).all()
    path = tmp_path / "odd.png"
    path.write_bytes(data)
    for fit, g in (("crop", (4, 4)), ("whole", want)):
        assert run_cli([path], tmp_path / fit, ckpt, "--fit", fit) == 0
        assert tuple(np.load(tmp_path / fit / "odd.npz")["grid"]) == g


def multi_frame(fmt: str) -> bytes:
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"duration": 100} if fmt != "TIFF"
                                                                              else {}))


@pytest.mark.parametrize("fmt,note", [("GIF", "animated GIF: using frame 1 of 3"),
                                      ("TIFF", "multi-page TIFF: using page 1 of 3"),
                                      ("PNG", "animated APNG: using frame 1 of 3")])
def test_multi_frame_images_use_the_first_frame_and_say_so(tmp_path, ckpt, fmt, note):
    data = multi_frame(fmt)
    loaded = load_image(data, name=f"anim.{fmt.lower()}")
    assert loaded.n_frames == 3 and note in loaded.notes
    px = np.asarray(loaded.image)
    assert (px == (255, 0, 0)).all()  # frame 1 is pure red
    res = analyze(tiny_vit(ARCH, img_size=32, patch_size=8), loaded)
    assert note in res.notes
    path = tmp_path / f"anim.{fmt.lower()}"
    path.write_bytes(data)
    assert run_cli([path], tmp_path / "out", ckpt) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert note in rows[0]["notes"]


def blocks(colours, size=16) -> np.ndarray:
    """Vertical bands of flat colour, each ``size`` px wide and high (JPEG-friendly: 8x8 blocks stay flat)."""
    return np.concatenate([np.full((size, size, len(c)), c, np.uint8) for c in colours], axis=1)


def test_colour_modes_are_converted_by_hand_computed_values(ckpt, tmp_path):
    # CMYK JPEG with K = 0: RGB = 255 - (C, M, Y)
    cmyk = [(0, 255, 255, 0), (255, 0, 0, 0), (0, 0, 0, 0), (128, 64, 0, 0)]
    loaded = load_image(encode(Image.fromarray(blocks(cmyk), "CMYK"), "JPEG", quality=95), name="print.jpg")
    assert loaded.original_mode == "CMYK" and "CMYK converted to RGB" in loaded.notes
    got = np.asarray(loaded.image)[8, 8::16].astype(int)  # centre of each band
    want = [[255 - c, 255 - m, 255 - y] for c, m, y, _ in cmyk]
    np.testing.assert_allclose(got, want, atol=6)
    # 16-bit grey PNG: linear map of [min, max] onto 0..255, by a per-pixel loop
    values = np.array([[0, 1000, 65535], [30000, 500, 12345]], np.uint16)
    loaded = load_image(encode(Image.fromarray(values), "PNG"), name="depth.png")
    assert loaded.original_mode.startswith("I") and any("16-bit" in n for n in loaded.notes)
    out = np.asarray(loaded.image)
    for (r, c), v in np.ndenumerate(values):
        assert tuple(out[r, c]) == (round(v / 65535 * 255),) * 3
    flat = load_image(encode(Image.fromarray(np.full((4, 4), 7, np.uint16)), "PNG"))  # max == min: no 0/0
    assert (np.asarray(flat.image) == 0).all()
    # palette PNG, index 0 transparent: composited on white; index 1 opaque blue
    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((2, 1), 1)
    loaded = load_image(encode(pal, "PNG", transparency=0), name="pal.png")
    out = np.asarray(loaded.image)
    assert tuple(out[1, 2]) == (0, 0, 255) and tuple(out[0, 0]) == (255, 255, 255)
    assert "transparency composited on white" in loaded.notes
    # RGBA with partial alpha: a * colour + (1 - a) * 255, within rounding
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, [[0, 64, 128], [192, 255, 255]]
    out = np.asarray(load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")).image).astype(int)
    a = rgba[..., 3] / 255
    np.testing.assert_allclose(out[..., 0], a * 200 + (1 - a) * 255, atol=1)
    np.testing.assert_allclose(out[..., 1], (1 - a) * 255, atol=1)
    # and all of them go through the CLI
    for name, im in (("cmyk.jpg", Image.fromarray(blocks(cmyk), "CMYK")), ("depth.png", Image.fromarray(values)),
                     ("pal.png", pal)):
        im.save(tmp_path / name, **({"transparency": 0} if name == "pal.png" else {}))
    assert run_cli(sorted(tmp_path.glob("*.*")), tmp_path / "out", ckpt) == 0


def exif_reference(a: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for EXIF orientation 1..8 (TIFF 6.0 / EXIF 2.3 table), written with numpy."""
    return {
        1: lambda x: x,
        2: lambda x: x[:, ::-1],  # mirror left-right
        3: lambda x: x[::-1, ::-1],  # rotate 180
        4: lambda x: x[::-1],  # mirror top-bottom
        5: lambda x: x.transpose(1, 0, 2),  # transpose (mirror about the main diagonal)
        6: lambda x: np.rot90(x, k=-1),  # rotate 90 clockwise
        7: lambda x: np.rot90(x, k=2).transpose(1, 0, 2),  # transverse
        8: lambda x: np.rot90(x, k=1),  # rotate 90 counter-clockwise
    }[orientation](a)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_the_spec(tmp_path, ckpt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    a = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # 7 wide, 5 high
    loaded = load_image(encode(Image.fromarray(a), "PNG", exif=exif), name="phone.png")  # lossless: exact pixels
    np.testing.assert_array_equal(np.asarray(loaded.image), exif_reference(a, orientation))
    assert (f"EXIF orientation {orientation} applied" in loaded.notes) == (orientation != 1)
    # a JPEG of flat 16 px bands: the band order follows the same table
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    band = blocks(colours)  # 48 wide, 16 high
    jpeg = encode(Image.fromarray(band), "JPEG", quality=95, exif=exif)
    got = np.asarray(load_image(jpeg).image).astype(int)
    want = exif_reference(band, orientation).astype(int)
    assert got.shape == want.shape
    np.testing.assert_allclose(got[4::8, 4::8], want[4::8, 4::8], atol=12)  # centres of the 8x8 blocks
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg)
    assert run_cli([path], tmp_path / "out", ckpt, "--fit", "whole") == 0
    row = next(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert (int(row["width"]), int(row["height"])) == (want.shape[1], want.shape[0])


# ------------------------------------------------------------------------------------------------------ file names

NAMES = {  # file name -> the output stem, by the CLI's documented rule (letters, digits, - _ . kept; else _)
    "my holiday photo.png": "my_holiday_photo",
    "café ☕ 東京.png": "café___東京",
    "new\nline.png": "new_line",
    "semi;colon$(rm -rf).png": "semi_colon__rm_-rf_",
    "..png": ".",
}


def test_file_names_with_spaces_unicode_and_dotdot_stay_inside_out(tmp_path, ckpt):
    src = tmp_path / "in" / "sub"
    src.mkdir(parents=True)
    for name in NAMES:
        (src / name).write_bytes(encode(noise(20, 20), "PNG"))
    sneaky = tmp_path / "in" / "sub" / ".." / "sub" / ".." / "up.png"  # '../' in the path given
    sneaky.write_bytes(encode(noise(20, 20), "PNG"))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    assert run_cli([*(src / n for n in NAMES), sneaky], out, ckpt) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out for p in created), sorted(map(str, created))
    stems = {row["stem"] for row in csv.DictReader((out / "summary.csv").open())}
    assert stems == {*NAMES.values(), "up"}
    assert {p.name for p in out.iterdir()} == {f"{s}{ext}" for s in stems for ext in (".png", ".npz")} | {"summary.csv"}
    # the library shows only a cleaned last path component in messages
    for name, shown in (("../../etc/pass wd.png", "pass wd.png"), ("a\x1b[31mb\u202e.png", "a[31mb.png"),
                        ("..", "image"), ("x" * 200 + ".png", "x" * 77 + "...")):
        with pytest.raises(ImageError) as err:
            load_image(b"", name=name)
        assert f"'{shown}'" in str(err.value)




def test_a_png_text_chunk_bomb_is_refused_in_a_users_words(tmp_path):
    """A tiny PNG whose compressed text chunk unpacks past Pillow's limit: refused, with no Pillow internals."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "A" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    path = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(path, "PNG", pnginfo=info)
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageError) as err:
        load_image(path)
    text = str(err.value)
    assert "bomb.png" in text and "metadata" in text
    assert "MAX_TEXT_CHUNK" not in text and "truncated" not in text and "Decompressed" not in text
