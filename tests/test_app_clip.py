"""The app's Explain view with a CLIP model: a text box for the prompt, the zero-shot class list, the prompt as the
target (AppTest, offline: a tiny random open_clip config registered with open_clip, the app's model by name)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import streamlit as st
import torch
import torch.nn.functional as F
from streamlit.testing.v1 import AppTest

from .helpers import require_extra

open_clip = require_extra("open_clip", "clip")

APP = str(Path(__file__).resolve().parents[1] / "app.py")
NAME = "vitviz-app-tiny-clip"
CFG = dict(embed_dim=16, quick_gelu=True,
           vision_cfg=dict(image_size=64, patch_size=16, width=32, layers=2, head_width=8, mlp_ratio=2.0),
           text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2))


@pytest.fixture
def clip_app(monkeypatch, tmp_path):
    """The tiny open_clip config as the app's model (``clip:NAME``: no pretrained tags, random weights, no
    download), fresh caches."""
    path = tmp_path / f"{NAME}.json"
    path.write_text(json.dumps(CFG))
    open_clip.add_model_config(path)
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("VITVIZ_APP_MODEL", f"clip:{NAME}")
    monkeypatch.delenv("VITVIZ_APP_ARCH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("VITVIZ_CHECKPOINT_DIR", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.selectbox(key="example").set_value("cat.jpg").run()
    at.segmented_control(key="section").set_value("Explain").run()
    return at


def _text(at) -> str:
    return re.sub(r"\\(.)", r"\1", "\n".join(m.value for m in at.main.markdown))


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_a_clip_model_is_explained_for_the_typed_prompt_with_zero_shot_predictions(clip_app):
    at = clip_app
    _ok(at)
    target = at.selectbox(key="explain_target")
    assert target.options[0] == "the text prompt (typed below)"  # no classes: the head is CLIP's projection
    assert "explains **the prompt 'a photo of a cat' (cos = " in _text(at)
    assert not any("class" in o for o in target.options)
    at.text_input(key="explain_prompt").input("a dog").run()
    at.text_input(key="explain_classes").input("cat, dog, car").run()
    _ok(at)
    text = _text(at)
    assert "explains **the prompt 'a dog' (cos = " in text
    caption = next(c.value for c in at.main.caption if c.value.startswith("Zero-shot predictions"))
    assert all(f"'{n}'" in caption for n in ("cat", "dog", "car")) and "class " not in caption

    # the view's target carries open_clip's own text embedding of the typed prompt, at the cosine stated
    from vitviz.app.views.explain import _prompt_target
    from vitviz.models.clip import load_clip

    clip = load_clip(f"clip:{NAME}")
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a dog"])
    with torch.no_grad():
        t = F.normalize(clip.text.model.encode_text(tokens), dim=-1)[0]
    got = _prompt_target(f"clip:{NAME}", "a dog")
    assert torch.allclose(torch.tensor(got.text_embedding), t, atol=1e-6)
    assert abs(float(re.search(r"cos = ([-0-9.e]+)\)", text).group(1))) <= 1
    at.text_input(key="explain_prompt").input("  ").run()
    assert any("Type a prompt" in i.value for i in at.info)
