"""Tests of vitviz.image: every file is built here in memory; references are hand-computed or timm's own transform."""

from __future__ import annotations

import io
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import vitviz.inputs.fit as vfit
from vitviz.errors import ImageError, ParameterError
from vitviz.inputs.image import fit_image, load_image, patch_box, to_tensor, whole_image_size

from .helpers import encode, png_header_only

# ---------------------------------------------------------------------------------------------------------------------
# helpers


def rgb(li) -> np.ndarray:
    return np.asarray(li.image).astype(int)


def asymmetric(w: int = 3, h: int = 2) -> np.ndarray:
    """(h, w, 3) uint8 with every pixel distinct, so any flip or rotation shows."""
    v = np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3) * 10
    return v


@pytest.fixture
def no_decode(monkeypatch):
    """Make any attempt to decode pixel data fail loudly (the refusal must come from the header)."""

    def boom(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


# ---------------------------------------------------------------------------------------------------------------------
# sources


def test_sources_bytes_path_filelike_pil_give_same_pixels(tmp_path):
    arr = asymmetric(5, 4)
    data = encode(Image.fromarray(arr), "PNG")
    path = tmp_path / "a b.png"
    path.write_bytes(data)
    fileobj = io.BytesIO(data)
    fileobj.read(7)  # a file-like whose position is not at the start is read from its start
    for source in (data, bytearray(data), str(path), path, fileobj, Image.fromarray(arr)):
        li = load_image(source)
        np.testing.assert_array_equal(np.asarray(li.image), arr)
        assert li.image.mode == "RGB" and li.original_size == (5, 4) and li.n_frames == 1
    assert load_image(path).source_name == "a b.png"
    assert load_image(data).format == "PNG"


def test_pil_source_is_not_mutated_or_returned():
    src = Image.fromarray(asymmetric())
    li = load_image(src)
    assert li.image is not src
    li.image.putpixel((0, 0), (1, 2, 3))
    assert src.getpixel((0, 0)) == (0, 10, 20)


@pytest.mark.parametrize("size", [(1, 1), (2, 2000), (2000, 2)])
def test_tiny_and_extreme_aspect_images_are_valid(size):
    li = load_image(encode(Image.new("RGB", size, (9, 8, 7)), "PNG"))
    assert li.original_size == size and rgb(li)[0, 0].tolist() == [9, 8, 7]


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}),
                                    ("BMP", {}), ("GIF", {}), ("TIFF", {})])
def test_formats(fmt, kw):
    im = Image.new("RGB", (16, 8), (200, 40, 40))
    li = load_image(encode(im, fmt, **kw))
    assert li.format == fmt and li.original_size == (16, 8)
    assert np.abs(rgb(li)[4, 8] - [200, 40, 40]).max() <= 6  # JPEG and GIF quantise a little


# ---------------------------------------------------------------------------------------------------------------------
# modes: the RGB value of a known pixel, computed by hand


def test_mode_L_and_1():
    li = load_image(encode(Image.fromarray(np.array([[0, 77]], np.uint8), mode="L"), "PNG"))
    assert li.original_mode == "L" and rgb(li)[0].tolist() == [[0, 0, 0], [77, 77, 77]]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    li = load_image(encode(one, "PNG"))
    assert li.original_mode == "1" and rgb(li)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_mode_LA_composited_on_white():
    la = Image.new("LA", (3, 1))
    for x, v in enumerate([(0, 0), (0, 255), (100, 128)]):
        la.putpixel((x, 0), v)
    li = load_image(encode(la, "PNG"))
    # out = L * a/255 + 255 * (1 - a/255): 0 -> white, opaque black stays black, 100*128/255 + 255*127/255 = 177.2
    assert rgb(li)[0, :, 0].tolist() == [255, 0, 177]
    assert li.original_mode == "LA" and "transparency composited on white" in li.notes


def test_mode_RGBA_composited_on_white_and_opaque_without_note():
    li = load_image(encode(Image.new("RGBA", (1, 1), (255, 0, 0, 128)), "PNG"))
    assert rgb(li)[0, 0].tolist() == [255, 127, 127]  # G = 0*128/255 + 255*127/255 = 127
    assert "transparency composited on white" in li.notes
    li = load_image(encode(Image.new("RGBA", (1, 1), (1, 2, 3, 255)), "PNG"))
    assert rgb(li)[0, 0].tolist() == [1, 2, 3] and li.notes == ()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_and_without_transparency(fmt):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.putpixel((1, 0), 1)
    li = load_image(encode(p, fmt, transparency=0))  # index 0 (red) is transparent
    assert li.original_mode == "P" and rgb(li)[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    assert "transparency composited on white" in li.notes
    li = load_image(encode(p, fmt))
    assert rgb(li)[0].tolist() == [[255, 0, 0], [0, 0, 255]] and li.notes == ()


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk(fmt):
    c = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # full magenta + yellow = red
    c.paste((0, 0, 0, 255), (8, 0, 16, 8))  # full black
    li = load_image(encode(c, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert li.original_mode == "CMYK" and "CMYK converted to RGB" in li.notes
    assert np.abs(rgb(li)[4, 3] - [255, 0, 0]).max() <= 3
    assert np.abs(rgb(li)[4, 12] - [0, 0, 0]).max() <= 3


def test_16bit_png_scaled_by_range_not_clipped():
    a = np.array([[1000, 3000], [2000, 1000]], np.uint16)
    li = load_image(encode(Image.fromarray(a), "PNG"))
    # (v - 1000) / 2000 * 255: 0, 255, 127.5 -> 128; clipping to 255 would give all 255
    assert li.original_mode == "I;16"
    assert rgb(li)[..., 0].tolist() == [[0, 255], [128, 0]]
    assert any("16-bit" in n for n in li.notes)


def test_16bit_big_endian_int32_and_float():
    big = Image.fromarray(np.array([[1000, 3000], [2000, 1000]], ">u2"))
    assert big.mode == "I;16B"
    li = load_image(encode(big, "TIFF"))
    assert li.original_mode == "I;16B" and rgb(li)[..., 0].tolist() == [[0, 255], [128, 0]]
    i32 = Image.fromarray(np.array([[-70000, 0], [70000, 35000]], np.int32))
    li = load_image(encode(i32, "TIFF"))
    # (v + 70000) / 140000 * 255: 0, 127.5 -> 128, 255, 191.25 -> 191
    assert li.original_mode == "I" and rgb(li)[..., 0].tolist() == [[0, 128], [255, 191]]
    f = Image.fromarray(np.array([[-1.0, 0.5], [2.0, np.nan]], np.float32))
    li = load_image(encode(f, "TIFF"))
    # (v + 1) / 3 * 255: 0, 127.5 -> 128, 255; NaN -> 0
    assert li.original_mode == "F" and rgb(li)[..., 0].tolist() == [[0, 128], [255, 0]]


def test_constant_16bit_image_does_not_divide_by_zero():
    li = load_image(encode(Image.fromarray(np.full((2, 2), 700, np.uint16)), "PNG"))
    assert rgb(li).min() == rgb(li).max()


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation and frames

# EXIF orientation -> what a viewer does to the stored pixels, written independently with numpy
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror horizontal
    3: lambda a: a[::-1, ::-1],  # rotate 180
    4: lambda a: a[::-1, :],  # mirror vertical
    5: lambda a: a.transpose(1, 0, 2),  # mirror horizontal + rotate 270 CW = transpose
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 CW
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirror horizontal + rotate 90 CW = transverse
    8: lambda a: np.rot90(a, k=1),  # rotate 270 CW
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation):
    arr = asymmetric(3, 2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    li = load_image(encode(Image.fromarray(arr), "PNG", exif=exif))
    expected = _ORIENT[orientation](arr)
    np.testing.assert_array_equal(np.asarray(li.image), expected)
    assert li.original_size == (expected.shape[1], expected.shape[0])
    assert (f"EXIF orientation {orientation} applied" in li.notes) == (orientation != 1)


def test_exif_orientation_jpeg():
    im = Image.new("RGB", (32, 16), (255, 0, 0))
    im.paste((0, 0, 255), (16, 0, 32, 16))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW: left half goes to the top
    li = load_image(encode(im, "JPEG", exif=exif, quality=95))
    assert li.original_size == (16, 32)
    assert np.abs(rgb(li)[6, 8] - [255, 0, 0]).max() <= 8 and np.abs(rgb(li)[26, 8] - [0, 0, 255]).max() <= 8


def _frames(fmt: str, **kw) -> bytes:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)


@pytest.mark.parametrize("fmt,note,kw", [("GIF", "animated GIF: using frame 1 of 3", {}),
                                         ("TIFF", "multi-page TIFF: using page 1 of 3", {}),
                                         ("WEBP", "animated WEBP: using frame 1 of 3", {"lossless": True}),
                                         ("PNG", "animated APNG: using frame 1 of 3", {})])
def test_multi_frame_uses_first_frame(fmt, note, kw):
    li = load_image(_frames(fmt, **kw))
    assert li.n_frames == 3 and note in li.notes and rgb(li)[0, 0].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# refusals


def test_empty():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", name="photo.jpg")
    with pytest.raises(ImageError, match="empty"):
        load_image(io.BytesIO())


def test_html_renamed_jpg():
    with pytest.raises(ImageError, match="HTML") as e:
        load_image(b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>", name="cat.jpg")
    assert "cat.jpg" in str(e.value)


def test_svg():
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    with pytest.raises(ImageError, match="SVG is not supported.*PNG"):
        load_image(svg, name="logo.svg")
    with pytest.raises(ImageError, match="SVG"):
        load_image(b'<svg xmlns="http://www.w3.org/2000/svg"/>')


def test_random_text_and_unsupported_format():
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello, this is text\n" * 10, name="notes.png")
    with pytest.raises(ImageError, match="not an image"):  # a real image, but not a format we accept (ICO)
        load_image(encode(Image.new("RGB", (16, 16)), "ICO"))


def _photo_jpeg(**kw) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", **kw)


@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_jpeg_refused_whatever_the_global_flag(monkeypatch, load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    for kw in ({}, {"progressive": True}):
        data = _photo_jpeg(**kw)
        assert load_image(data).original_size == (64, 64)  # the whole file is fine
        with pytest.raises(ImageError, match="truncated"):
            load_image(data[: len(data) // 2], name="half.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated  # not changed


@pytest.mark.parametrize("load_truncated", [False, True])
def test_jpeg_end_marker_inside_exif_thumbnail_does_not_hide_truncation(monkeypatch, load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    thumb = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")  # a complete JPEG, end marker FFD9 included
    exif = Image.Exif()
    exif[0x0112] = 1
    data = _photo_jpeg(exif=exif.tobytes() + thumb)
    assert data.count(b"\xff\xd9") == 2
    trailer = b"\x00motion-photo\xff\xda\x00\x10"  # bytes after the end marker (phones append videos) are ignored
    assert load_image(data + trailer).original_size == (64, 64)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) - 300])


@pytest.mark.parametrize("load_truncated", [False, True])
def test_png_with_broken_crc_or_cut_short(monkeypatch, load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = bytearray(encode(Image.fromarray(asymmetric(8, 8)), "PNG"))
    idat = data.index(b"IDAT")
    bad = bytearray(data)
    bad[idat + 6] ^= 0xFF  # one byte of compressed pixel data: the IDAT CRC no longer matches
    with pytest.raises(ImageError, match="checksum"):
        load_image(bytes(bad))
    bad = bytearray(data)
    bad[-5] ^= 0xFF  # the CRC field of IEND itself
    with pytest.raises(ImageError, match="checksum"):
        load_image(bytes(bad))
    with pytest.raises(ImageError, match="truncated"):
        load_image(bytes(data[: idat + 10]))


def test_decompression_bomb_refused_from_header(no_decode):
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 100
    too_many = r"'bomb.png' has too many pixels.*\(900,000,000 pixels\); the limit is 64,000,000 pixels"
    with pytest.raises(ImageError, match=too_many):
        load_image(bomb, name="bomb.png")  # beyond PIL's own hard limit too
    with pytest.raises(ImageError, match=r"10000x10000 = 100,000,000 pixels.*64,000,000"):  # PIL only warns here
        load_image(png_header_only(10000, 10000))
    with pytest.raises(ImageError, match="9000x8000"):  # PIL is silent here; our limit is stricter
        load_image(png_header_only(9000, 8000))
    with pytest.raises(ImageError, match="101x100 = 10,100 pixels; the limit is 10,000"):
        load_image(png_header_only(101, 100), max_pixels=10_000)


def test_pil_warnings_as_errors_still_give_the_typed_message():
    bomb = png_header_only(10000, 10000)  # PIL warns for this one (over its 89 MP, under its 179 MP hard limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"too many pixels to decode safely \(100,000,000 pixels\)"):
            load_image(bomb)


def test_loading_in_threads_leaves_the_process_warning_state_alone():
    """catch_warnings in a decoder would swap warnings.filters/showwarning under other threads' feet."""
    filters, show = list(warnings.filters), warnings.showwarning
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(20):
                with pytest.raises(ImageError):
                    load_image(png_header_only(10000, 10000))
                load_image(encode(Image.new("RGB", (8 + i, 8)), "PNG"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with warnings.catch_warnings():  # this test's own changes, undone here (the pytest filters stay as they were)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        inside = list(warnings.filters), warnings.showwarning
    assert not errors, errors
    assert inside == (filters, show)


def test_size_limit_bytes_path_and_filelike(tmp_path):
    data = encode(Image.new("RGB", (64, 64)), "BMP")  # 12 kB, uncompressed
    assert len(data) == 12_342  # 54-byte header + 64 * 64 * 3
    with pytest.raises(ImageError, match=r"is 12\.3 kB; the limit is 1\.0 kB"):  # decimal, as Streamlit's MB
        load_image(data, max_bytes=1000)
    with pytest.raises(ImageError, match=r"is 12,342 bytes; the limit is 12,341 bytes"):  # both "12.3 kB"
        load_image(data, max_bytes=len(data) - 1)
    assert load_image(data, max_bytes=len(data)).original_size == (64, 64)  # exactly at the limit is fine
    path = tmp_path / "big.bmp"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="limit"):
        load_image(path, max_bytes=1000)

    class Upload(io.BytesIO):  # like Streamlit's UploadedFile: knows its size; must not be read when too big
        size = len(data)
        name = "big.bmp"

        def read(self, *a):
            raise AssertionError("read although the size was known to be too big")

    with pytest.raises(ImageError, match="'big.bmp'.*limit"):
        load_image(Upload(data), max_bytes=1000)

    class Stream(io.RawIOBase):  # not seekable, no size: read at most max_bytes + 1
        def __init__(self):
            self.asked = []

        def readable(self):
            return True

        def read(self, n=-1):
            self.asked.append(n)
            return data[:n]

    s = Stream()
    with pytest.raises(ImageError, match="limit"):
        load_image(s, max_bytes=1000)
    assert s.asked == [1001]


def test_image_without_pixels():
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 5)))


def test_parameter_errors():
    with pytest.raises(ParameterError):
        load_image(b"x", max_bytes=0)
    with pytest.raises(TypeError):
        load_image(12345)


# ---------------------------------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("name,shown", [
    ("my photo.png", "my photo.png"),
    ("фото café 猫.jpg", "фото café 猫.jpg"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\win.ini", "win.ini"),
    ("a\x00b\nc\x1b[31m.png", "abc[31m.png"),
    ("evil\u202egnp.exe", "evilgnp.exe"),  # right-to-left override removed
    ("..", "image"),
    ("", "image"),
    ("x" * 200 + ".png", "x" * 77 + "..."),
])
def test_names_are_sanitised(name, shown):
    assert load_image(encode(Image.new("RGB", (2, 2)), "PNG"), name=name).source_name == shown
    with pytest.raises(ImageError) as e:
        load_image(b"", name=name)
    assert f"'{shown}'" in str(e.value) and ("/" not in shown and "\\" not in shown)


def test_name_is_never_opened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.png").write_bytes(encode(Image.new("RGB", (2, 2), (1, 1, 1)), "PNG"))
    li = load_image(encode(Image.new("RGB", (3, 3), (5, 5, 5)), "PNG"), name="secret.png")
    assert li.original_size == (3, 3)


# ---------------------------------------------------------------------------------------------------------------------
# fitting: against timm's own eval transform


def _timm_pixels(im: Image.Image, size: tuple[int, int], **kw) -> np.ndarray:
    from timm.data import create_transform

    t = create_transform(input_size=(3, *size), mean=(0, 0, 0), std=(1, 1, 1), **kw)
    return t(im).permute(1, 2, 0).numpy() * 255


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (300, 300), (257, 511), (1000, 333), (224, 224), (1, 1),
                                 (37, 1001)])
@pytest.mark.parametrize("size", [(224, 224), (384, 384), (224, 320), (256, 192)])
def test_crop_matches_timm_eval_transform(w, h, size):
    im = Image.fromarray(_RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noise: any offset error shows
    for crop_pct, interp in [(0.875, "bicubic"), (1.0, "bilinear"), (0.9, "nearest"), (0.95, "bicubic")]:
        ref = _timm_pixels(im, size, crop_pct=crop_pct, interpolation=interp)
        fitted = fit_image(im, input_size=size, crop_pct=crop_pct, interpolation=interp)
        assert fitted.pixels.shape == (*size, 3) and fitted.pixels.dtype == np.uint8
        assert np.abs(fitted.pixels - ref).max() <= 1.0, (crop_pct, interp)


@pytest.mark.parametrize("w,h", [(2, 2000), (2000, 3)])
def test_crop_extreme_aspect_close_to_timm_without_full_resize(w, h):
    im = Image.fromarray(_RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for interp in ("bicubic", "bilinear"):  # timm builds a 256 x 256000 image here; we resample only the crop
        ref = _timm_pixels(im, (224, 224), crop_pct=0.875, interpolation=interp)
        fitted = fit_image(im, input_size=(224, 224), interpolation=interp)
        assert np.abs(fitted.pixels - ref).max() <= 3.0


def test_region_path_equals_full_path_on_normal_image(monkeypatch):
    im = Image.fromarray(_RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    full = fit_image(im, input_size=(224, 224)).pixels.astype(int)
    monkeypatch.setattr(vfit, "_FULL_RESIZE_PIXELS", 0)
    region = fit_image(im, input_size=(224, 224)).pixels.astype(int)
    assert np.abs(full - region).max() <= 3


def test_crop_of_a_huge_thin_image_stays_small():
    im = Image.new("RGB", (1, 200_000), (10, 20, 30))  # timm would resize to 256 x 51,200,000
    fitted = fit_image(im, input_size=(224, 224))
    assert fitted.pixels.shape == (224, 224, 3) and (fitted.pixels == [10, 20, 30]).all()


def test_crop_box_by_hand():
    fitted = fit_image(Image.new("RGB", (640, 480)), input_size=(224, 224), crop_pct=0.875)
    # scale size floor(224 / 0.875) = 256: 480 -> 256, 640 -> int(256 * 640 / 480) = 341
    # crop offsets: left = round((341 - 224) / 2) = round(58.5) = 58 (Python rounds half to even), top = 16
    assert fitted.box == pytest.approx((58 * 640 / 341, 16 * 480 / 256, 282 * 640 / 341, 240 * 480 / 256))
    assert fitted.box[1] == 30 and fitted.box[3] == 450
    assert fitted.input_size == (224, 224) and fitted.fit == "crop"
    assert "341x256" in fitted.description and "224x224" in fitted.description
    whole = fit_image(Image.new("RGB", (640, 480)), input_size=(192, 256), fit="whole")
    assert whole.box == (0, 0, 640, 480) and "aspect ratio kept" in whole.description


def test_crop_box_locates_the_pixels_the_model_saw():
    # a horizontal ramp value = x / 4: interpolation reproduces a linear function, so each output column tells
    # which original x it came from; it must be the box's left + (i + 0.5) * box_width / W - 0.5
    w, h = 1000, 750
    ramp = np.broadcast_to((np.arange(w) / 4.0)[None, :, None], (h, w, 3))
    im = Image.fromarray(np.rint(ramp).astype(np.uint8))
    fitted = fit_image(im, input_size=(224, 224), crop_pct=0.9, interpolation="bilinear")
    left, _, right, _ = fitted.box
    i = np.arange(10, 214)
    src_x = left + (i + 0.5) * (right - left) / 224 - 0.5
    assert np.abs(fitted.pixels[112, i, 0] - src_x / 4).max() <= 1.0


def test_whole_matches_timm_squash_resize():
    im = Image.fromarray(_RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ref = _timm_pixels(im, (192, 256), crop_pct=1.0, crop_mode="squash", interpolation="bicubic")
    fitted = fit_image(im, input_size=(192, 256), fit="whole")
    assert np.abs(fitted.pixels - ref).max() <= 1.0 and fitted.box == (0, 0, 400, 300)


def test_fit_parameter_errors():
    im = Image.new("RGB", (8, 8))
    for kw in ({"input_size": (0, 224)}, {"input_size": (224,)}, {"input_size": (224, 224), "crop_pct": 1.5},
               {"input_size": (224, 224), "crop_pct": 0}, {"input_size": (224, 224), "fit": "stretch"},
               {"input_size": (224, 224), "interpolation": "lanczos"}):
        with pytest.raises(ParameterError):
            fit_image(im, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# whole-image input size, tensor, patch boxes


def test_whole_image_size_4_3():
    # budget: (224 / 16)^2 = 14 * 14 = 196 patches. 4:3 -> gh = 12, gw = 16: 192 patches <= 196, 16 / 12 = 4 / 3 exactly
    # (neighbours: 11x15 = 165 patches, 15/11 = 1.36; 13x15 = 195 patches but 15/13 = 1.15)
    assert whole_image_size((640, 480), target=224, patch_size=16) == (12 * 16, 16 * 16)
    assert whole_image_size((480, 640), target=224, patch_size=16) == (16 * 16, 12 * 16)
    assert whole_image_size((500, 500), target=224, patch_size=16) == (224, 224)


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (2, 2000), (2000, 2), (1, 1), (333, 1000), (1000, 7)])
@pytest.mark.parametrize("target,patch", [(224, 16), (224, 14), (384, 16), (518, 14)])
def test_whole_image_size_properties(size, target, patch):
    hh, ww = whole_image_size(size, target=target, patch_size=patch)
    assert hh % patch == 0 and ww % patch == 0 and hh >= patch and ww >= patch
    assert hh * ww <= target**2
    # brute force over every grid: the aspect kept within one patch on a side, and no such grid has more tokens
    aspect, budget = size[0] / size[1], target**2 // patch**2
    gh, gw = hh // patch, ww // patch

    def kept(r, c):
        return abs(c - r * aspect) <= 1 or abs(r - c / aspect) <= 1

    best = max(r * c for r in range(1, budget + 1) for c in range(1, budget // r + 1) if kept(r, c))
    assert kept(gh, gw) and gh * gw == best


def test_whole_image_size_keeps_a_wide_panorama_within_one_patch():
    """1732 x 300 at 518 px with 14 px patches (max side 1036): the old rule squeezed it to 1036 x 252 (-28.8%)."""
    hh, ww = whole_image_size((1732, 300), target=518, patch_size=14, max_side=1036)
    assert ww == 1036 and abs(ww / hh - 1732 / 300) <= 14 / hh * (1732 / 300)  # height within one patch of true
    assert abs(math.log(ww / hh / (1732 / 300))) < 0.02


def test_whole_image_size_extreme_and_max_side():
    # 2 x 2000 (w x h): one patch column; as many rows as the budget allows (196)
    assert whole_image_size((2, 2000), target=224, patch_size=16) == (196 * 16, 16)
    assert whole_image_size((2, 2000), target=224, patch_size=16, max_side=1024) == (1024, 16)
    assert whole_image_size((2000, 2), target=224, patch_size=16) == (16, 196 * 16)
    with pytest.raises(ParameterError):
        whole_image_size((10, 10), target=8, patch_size=16)
    with pytest.raises(ParameterError):
        whole_image_size((10, 10), target=224, patch_size=16, max_side=8)


def test_to_tensor_by_hand():
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[1, 2] = (255, 128, 0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_tensor(pixels, mean=mean, std=std)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]  # 2.2489, 0.2052, -1.8044
    assert x[0, :, 1, 2].tolist() == pytest.approx(expected, abs=1e-6)
    assert x[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)
    with pytest.raises(ParameterError):
        to_tensor(pixels.astype(np.float32), mean=mean, std=std)
    with pytest.raises(ParameterError):
        to_tensor(pixels, mean=mean, std=(1, 0, 1))


def test_to_tensor_matches_timm_normalize():
    from timm.data import create_transform

    im = Image.fromarray(_RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = create_transform(input_size=(3, 224, 224), crop_pct=1.0, mean=mean, std=std)(im)
    x = to_tensor(fit_image(im, input_size=(224, 224), crop_pct=1.0).pixels, mean=mean, std=std)
    torch.testing.assert_close(x[0], ref, atol=1e-5, rtol=0)


def test_patch_box_row_major():
    # grid 3 rows x 4 cols, P = 16: index 0 top-left, 3 top-right, 4 starts row 1, 11 bottom-right
    assert patch_box(0, grid=(3, 4), patch_size=16) == (0, 0, 16, 16)
    assert patch_box(3, grid=(3, 4), patch_size=16) == (48, 0, 64, 16)
    assert patch_box(4, grid=(3, 4), patch_size=16) == (0, 16, 16, 32)
    assert patch_box(11, grid=(3, 4), patch_size=16) == (48, 32, 64, 48)
    for bad in (-1, 12):
        with pytest.raises(ParameterError, match=r"\[0, 11\]"):
            patch_box(bad, grid=(3, 4), patch_size=16)


def test_patch_box_matches_timm_patch_flattening():
    # timm's PatchEmbed: conv stride P then flatten(2): token k is the patch at (k // gw, k % gw)
    from timm.layers import PatchEmbed

    pe = PatchEmbed(img_size=(48, 64), patch_size=16, in_chans=1, embed_dim=1, bias=False)
    with torch.no_grad():
        pe.proj.weight.fill_(1.0)
    img = torch.zeros(1, 1, 48, 64)
    for k in range(12):
        left, top, right, bottom = patch_box(k, grid=(3, 4), patch_size=16)
        img.zero_()
        img[0, 0, top:bottom, left:right] = 1.0
        tokens = pe(img)[0, :, 0]  # (N,)
        assert tokens.argmax().item() == k and tokens.max().item() == 256
