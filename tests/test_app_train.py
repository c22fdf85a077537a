"""The Train & probe page through AppTest: train a tiny ViT for a few steps, use it, and Explain then shows its
predictions with the checkpoint's class names; probe the current backbone on an uploaded zip; a backbone says how to
get classes."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.helpers import app_serves, require_extra

APP = str(Path(__file__).resolve().parents[1] / "app.py")
ARCH = "vit_tiny_patch16_224"


@pytest.fixture
def app_env(monkeypatch, tmp_path):
    """Fresh caches and a tiny random backbone (no head) as the app's default model."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=64, embed_dim=32, depth=2,
                              num_heads=2)
    return app_serves(monkeypatch, model, tmp_path / "tiny.safetensors", arch=ARCH,
                      kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})


def _page(at: AppTest) -> AppTest:
    at.session_state["section"] = "Experiments"
    at.session_state["tab_experiments"] = "Train & probe"
    return at.run()


def _text(at: AppTest) -> str:
    blocks = at.tabs or [at.main]
    return "\n".join(m.value for b in blocks for kind in ("markdown", "caption", "success") for m in b.get(kind))


def test_train_use_and_explain_shows_the_trained_classes(app_env):
    require_extra("sklearn", "train")
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.selectbox(key="example").set_value("cat.jpg").run()
    assert "Train & probe" in "\n".join(c.value for c in at.caption)  # the backbone says where to get classes
    at = _page(at)
    for key, value in dict(train_patch=4, train_img=16, train_dim=16, train_depth=1, train_heads=2,
                           train_epochs=1).items():
        at.session_state[key] = value
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    done = _text(at)
    assert re.search(r"validation accuracy \*\*0\.\d{3}\*\* after 1 epoch", done), done
    assert at.button(key="use_train") is not None
    at.button(key="use_train").click().run()
    assert at.selectbox(key="model").value == "trained"
    assert at.slider(key="img_size").value == 16  # analysed at the size it was trained at
    at.session_state["section"] = "Explain"
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    predictions = "\n".join(c.value for c in at.caption if c.value.startswith("Predictions"))
    # the names are the checkpoint's own: digits "0".."9", each a class's name beside its index
    found = re.findall(r"class (\d) '(\d)'", predictions)
    assert len(found) == 5 and all(i == n for i, n in found), predictions
    assert not any("No class predictions" in c.value for c in at.caption)


def _zip() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as z:
        for c, name in enumerate(("red", "blue")):
            for i in range(5):
                px = np.full((32, 32, 3), 40.0)
                px[..., 0 if c == 0 else 2] = 200
                im = Image.fromarray((px + rng.normal(0, 30, px.shape)).clip(0, 255).astype(np.uint8))
                b = io.BytesIO()
                im.save(b, format="PNG")
                z.writestr(f"colours/{name}/{i}.png", b.getvalue())
    return buf.getvalue()


def test_probe_the_current_backbone_on_an_uploaded_zip(app_env):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.selectbox(key="example").set_value("cat.jpg").run()
    at = _page(at)
    at.file_uploader(key="probe_zip").set_value(("colours.zip", _zip(), "application/zip")).run()
    at.button(key="probe_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert re.search(r"held-out accuracy \*\*\d\.\d{3}\*\* on 2 images", _text(at)), _text(at)
    assert "blue, red" in _text(at)


def test_without_the_digits_the_page_says_why_and_still_probes(app_env, monkeypatch):
    """No scikit-learn (the base install): the digits choice says how to get them, Train stays off, and the probe
    below still works (it needs no extra)."""
    from vitviz.app.views import train as view
    from vitviz.errors import ModelError

    def missing(*_a, **_k):
        raise ModelError("the digits data set comes with scikit-learn, which is not installed: pip install "
                         "vitviz[train]")

    monkeypatch.setattr(view, "training_data", missing)
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.selectbox(key="example").set_value("cat.jpg").run()
    at = _page(at)
    assert not at.exception and not at.error  # the base install: a note, not an error
    assert any("vitviz\\[train\\]" in i.value or "vitviz[train]" in i.value for i in at.info)
    assert at.button(key="train_start").disabled
    at.file_uploader(key="probe_zip").set_value(("colours.zip", _zip(), "application/zip")).run()
    at.button(key="probe_start").click().run()
    assert re.search(r"held-out accuracy \*\*\d\.\d{3}\*\*", _text(at)), _text(at)
