"""The app's decoded-image cache is bounded by bytes (VITVIZ_IMAGE_CACHE_MB), not by entries, and is thread-safe.

One 64-megapixel photo decodes to 256 MB (PIL keeps RGB in 4-byte pixels): four of them behind a four-entry bound
were a gigabyte. What is measured here is what stays alive: every decoded image still reachable after the calls.
"""

from __future__ import annotations

import gc
import io
import random
import threading

import pytest
import streamlit as st
from PIL import Image

from vitviz.app import cache
from vitviz.inputs.image import LoadedImage

MB = 2**20
SIDE = 1000  # a 1000 x 1000 RGB image: 4,000,000 bytes decoded


def png(colour: tuple[int, int, int], side: int = SIDE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")  # one colour: a few kB on disk
    return buf.getvalue()


def alive(prefix: str) -> list[LoadedImage]:
    """The decoded images of this test still reachable from anywhere."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is LoadedImage and o.source_name.startswith(prefix)]


def held_bytes(images: list[LoadedImage]) -> int:
    return sum(im.image.width * im.image.height * 4 for im in images)  # PIL's RGB storage: 4 bytes a pixel


@pytest.fixture
def fresh(monkeypatch):
    """An empty image cache and a count of decodes."""
    st.cache_resource.clear()
    cache.image.clear()
    decoded: list[str] = []
    real = cache.load_image

    def counting(data, *, name):
        decoded.append(name)
        return real(data, name=name)

    monkeypatch.setattr(cache, "load_image", counting)
    yield decoded
    cache.image.clear()


def test_decoded_images_are_bounded_by_bytes_and_the_latest_is_kept(fresh, monkeypatch):
    monkeypatch.setenv("VITVIZ_IMAGE_CACHE_MB", str(10_000_000 / MB))  # room for two of these images, not three
    files = [(f"bytes-{i}.png", png((40 * i, 255 - 40 * i, 7))) for i in range(6)]
    for name, data in files:
        cache.image(cache.digest(data), data, name)
        held = held_bytes(alive("bytes-"))
        assert held <= 10_000_000, f"{held:,} bytes of decoded images alive after {name}, over the budget"
    assert len(fresh) == 6
    name, data = files[-1]
    latest = cache.image(cache.digest(data), data, name)
    assert len(fresh) == 6, "the most recent image was decoded again: it was not kept"
    assert latest.source_name == name and len(alive("bytes-")) == 2
    name, data = files[0]
    cache.image(cache.digest(data), data, name)  # the oldest was evicted: decoded again
    assert len(fresh) == 7


def test_an_image_larger_than_the_budget_is_shown_but_not_kept(fresh, monkeypatch):
    monkeypatch.setenv("VITVIZ_IMAGE_CACHE_MB", "1")
    small = png((1, 2, 3), side=200)  # 160,000 bytes decoded
    big = png((4, 5, 6))  # 4,000,000 bytes decoded
    cache.image(cache.digest(small), small, "over-small.png")
    got = cache.image(cache.digest(big), big, "over-big.png")
    assert got.image.size == (SIDE, SIDE)
    del got
    assert held_bytes(alive("over-")) <= MB
    cache.image(cache.digest(small), small, "over-small.png")
    assert fresh == ["over-small.png", "over-big.png"], "the small one should have stayed"


def test_the_budget_is_read_from_the_environment_and_checked(fresh, monkeypatch):
    monkeypatch.setenv("VITVIZ_IMAGE_CACHE_MB", "lots")
    data = png((9, 9, 9), side=16)
    with pytest.raises(ValueError, match="VITVIZ_IMAGE_CACHE_MB"):
        cache.image(cache.digest(data), data, "env.png")
    monkeypatch.delenv("VITVIZ_IMAGE_CACHE_MB")
    assert cache.image_cache_bytes() == cache.DEFAULT_IMAGE_CACHE_MB * MB


def test_sessions_on_many_threads_share_one_decode_and_the_bound(fresh, monkeypatch):
    """8 threads (browser sessions) at once: one image asked for by all decodes once; then random images of random
    sizes, each thread checking what it got, never over the budget and never an exception."""
    monkeypatch.setenv("VITVIZ_IMAGE_CACHE_MB", "3")
    same = png((200, 100, 50), side=300)
    start, results, errors = threading.Barrier(8), [], []

    def together():
        start.wait()
        results.append(cache.image(cache.digest(same), same, "threads-same.png"))

    threads = [threading.Thread(target=together) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert fresh.count("threads-same.png") == 1 and len({id(r) for r in results}) == 1
    results.clear()
    files = [png((i, 2 * i, 3 * i), side=random.Random(i).choice([100, 400, 600])) for i in range(12)]

    def worker(seed: int):
        rng = random.Random(seed)
        try:
            for _ in range(25):
                i = rng.randrange(len(files))
                got = cache.image(cache.digest(files[i]), files[i], f"threads-{i}.png")
                assert got.source_name == f"threads-{i}.png" and got.image.getpixel((0, 0)) == (i, 2 * i, 3 * i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert held_bytes(alive("threads-")) <= 3 * MB
