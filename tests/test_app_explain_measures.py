"""The Explain view's two measures through AppTest: the score by token removal comes with the map; the score by
blurring (a measure no method is built on) comes after, from a second shared job, without holding the map back.

Offline, on a tiny random classifier (3 classes, depth 2, width 32) saved as the app's default model. The score by
blurring shown is checked against the library's own ``curves(..., perturbation="blur")`` on a map explained afresh
here, and the first point of its MoRF curve against timm's own forward of the unperturbed image.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import timm
import torch
from streamlit.testing.v1 import AppTest

import vitviz.metrics.faithfulness as faithfulness
from vitviz.errors import ResourceError

from .helpers import app_serves

APP = str(Path(__file__).resolve().parents[1] / "app.py")
ARCH = "vit_tiny_patch16_224"
KWARGS = dict(embed_dim=32, depth=2, num_heads=2)
BLUR = r"\*\*Faithfulness by blurring \(σ 10 px\)\*\*, read as the ([^,]+), 10 steps: \*\*([-+0-9.e]+)\*\*"
TOKENS = r"\*\*Faithfulness by token removal\*\*, read as the ([^,]+), 10 steps: \*\*([-+0-9.e]+)\*\*"
RANDOM = r"8 random maps score ([-+0-9.e]+) on average"


@pytest.fixture
def app_env(monkeypatch, tmp_path):
    """Fresh caches, a tiny random classifier as the app's default model, and jobs that are never abandoned while a
    test waits on them (nobody polls a job while the test joins its thread)."""
    from vitviz.app import jobs

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=3, img_size=64, **KWARGS)
    path = app_serves(monkeypatch, model, tmp_path / "tiny.safetensors", arch=ARCH, kwargs=KWARGS)
    monkeypatch.setattr(jobs, "ABANDON_S", 600.0)
    yield path
    st.cache_resource.clear()


class BlurSpy:
    """``faithfulness.curves`` as the jobs call it, recording each call by blurring (model, x, target) and, where
    told, holding it at a gate or failing it; token removal passes straight through."""

    def __init__(self, monkeypatch, *, fail: BaseException | None = None):
        self.real, self.fail = faithfulness.curves, fail
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple] = []
        monkeypatch.setattr(faithfulness, "curves", self)

    def __call__(self, model, x, maps, **kwargs):
        if kwargs.get("perturbation") == "blur":
            self.calls.append((model, x, kwargs.get("target")))
            assert self.gate.wait(30)
            if self.fail is not None:
                raise self.fail
        return self.real(model, x, maps, **kwargs)


def _measured() -> None:
    """Wait for the blur jobs started so far to finish."""
    for thread in threading.enumerate():
        if thread.name == "vitviz-measure":
            thread.join(60)
            assert not thread.is_alive()


def _explain(at: AppTest) -> AppTest:
    at.selectbox(key="example").set_value("cat.jpg").run()
    at.session_state["section"] = "Explain"
    return at.run()


def _text(at: AppTest) -> str:
    return re.sub(r"\\(.)", r"\1", "\n".join(m.value for m in at.main.markdown))


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _chart(at: AppTest, key: str) -> dict:
    return json.loads(next(el for el in at.get("plotly_chart") if el.key == key).proto.spec)


def _values(y) -> np.ndarray:
    """A trace's values: a list, or plotly's typed array ({"dtype", "bdata": base64})."""
    if isinstance(y, dict):
        return np.frombuffer(base64.b64decode(y["bdata"]), dtype=np.dtype(y["dtype"]))
    return np.asarray(y, dtype=np.float64)


def test_the_score_by_blurring_is_the_librarys_own_on_the_map_beside_the_score_by_token_removal(app_env, monkeypatch):
    from vitviz.explain import DEFAULT_METHOD, explain_all

    spy = BlurSpy(monkeypatch)
    at = _explain(AppTest.from_file(APP, default_timeout=60).run())
    _ok(at)
    assert at.selectbox(key="explain_target").value == "class"  # a classifier's first target: its top-1 class
    _measured()
    at.run()
    _ok(at)
    text = _text(at)
    tokens, blur = re.search(TOKENS, text), re.search(BLUR, text)
    assert tokens and blur, text
    assert tokens.group(1) == blur.group(1) == "probability of the class"  # the same read-out, named both times
    assert "Faithfulness" not in re.sub(r"\*\*Faithfulness by (token removal|blurring \(σ 10 px\))\*\*", "", text)
    # the library's own measure, on a map explained here afresh for the same target (the spy saw the app's input)
    model, x, target = spy.calls[-1]
    assert target.kind == "class"
    found, *draws = explain_all(model, x, methods=[DEFAULT_METHOD, *(f"random:seed={k}" for k in range(8))],
                                target="class")
    ref = faithfulness.curves.real(model, x, [found.map], perturbation="blur", target="class")[0]
    rand = faithfulness.curves.real(model, x, [d.map for d in draws], perturbation="blur", target="class")
    assert blur.group(2) == f"{ref.score:+.3g}", (blur.group(2), ref.score)
    assert re.findall(RANDOM, text)[1] == f"{np.mean([c.score for c in rand]):+.2g}"
    # the curves by blurring: MoRF starts at the unperturbed top-1 probability, by timm's own forward
    at.segmented_control(key="explain_curves_by").set_value("blur").run()
    _ok(at)
    curves = _chart(at, "fig_explain_curves")
    assert "by blurring (σ 10 px)" in curves["layout"]["title"]["text"]
    with torch.no_grad():
        p = model(x).softmax(-1)[0].max().item()
    morf = _values(curves["data"][0]["y"])
    assert curves["data"][0]["name"].startswith("MoRF") and morf[0] == pytest.approx(p, abs=1e-5)
    np.testing.assert_allclose(morf, ref.morf, atol=1e-6)


def test_the_map_and_its_score_by_token_removal_do_not_wait_for_the_blurring(app_env, monkeypatch):
    spy = BlurSpy(monkeypatch)
    spy.gate.clear()
    try:
        at = _explain(AppTest.from_file(APP, default_timeout=60).run())
        _ok(at)
        text = _text(at)
        assert re.search(TOKENS, text) and not re.search(BLUR, text), text
        assert "fig_explain" in {el.key for el in at.get("plotly_chart")}  # the map is on the page
        assert at.get("progress"), "the score by blurring shows its progress while it is measured"
        at.segmented_control(key="explain_curves_by").set_value("blur").run()
        assert "appear here once measured" in "\n".join(i.value for i in at.info)
        assert "fig_explain" in {el.key for el in at.get("plotly_chart")}
    finally:
        spy.gate.set()
    _measured()
    at.run()
    _ok(at)
    assert re.search(BLUR, _text(at)) and not at.get("progress")
    assert {"fig_explain", "fig_explain_curves"} <= {el.key for el in at.get("plotly_chart")}


@pytest.mark.parametrize("error", [RuntimeError("boom"), ResourceError("the server is busy")])
def test_a_failed_blurring_is_a_message_beside_the_map_and_is_not_kept(app_env, monkeypatch, error):
    spy = BlurSpy(monkeypatch, fail=error)
    spy.gate.clear()  # the job fails after the first run, not during it (which would show the failure at once)
    try:
        at = _explain(AppTest.from_file(APP, default_timeout=60).run())
    finally:
        spy.gate.set()
    _measured()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1
    shown = re.sub(r"\\(.)", r"\1", at.error[0].value)
    assert shown.startswith("No faithfulness by blurring (σ 10 px): ")
    assert ("an internal error, a bug in vitviz" in shown) == isinstance(error, RuntimeError)
    assert "the server is busy" in shown or isinstance(error, RuntimeError)
    assert "Traceback" not in shown and "boom" not in shown
    assert re.search(TOKENS, _text(at)) and "fig_explain" in {el.key for el in at.get("plotly_chart")}
    tried = len(spy.calls)
    at.run()  # asked again: measured afresh
    _measured()
    deadline = time.monotonic() + 30
    while len(spy.calls) == tried and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(spy.calls) > tried


def test_a_measure_its_page_moved_away_from_stops_and_frees_its_slot(app_env, monkeypatch):
    """The method changed while its map was measured by blurring: nobody else asked for that measure, so it stops at
    its next map (not ``ABANDON_S`` later, holding one of the shared slots) and the new method's measure is shown."""
    from vitviz.app import jobs

    spy = BlurSpy(monkeypatch)
    spy.gate.clear()
    try:
        at = _explain(AppTest.from_file(APP, default_timeout=60).run())
        first = at.session_state["_explain_measuring"]
        at.selectbox(key="explain_method").set_value("chefer").run()
        _ok(at)
        assert at.session_state["_explain_measuring"] is not first and first.cancelled
    finally:
        spy.gate.set()
    assert first.done.wait(30) and isinstance(first.error, jobs.Abandoned), first.error
    _measured()
    at.run()
    _ok(at)
    assert re.search(BLUR, _text(at)) and "Chefer" in _text(at)
