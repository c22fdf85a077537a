"""The Streamlit app through streamlit.testing.v1.AppTest: offline, on a small random ViT saved by the fixture.

Plotly charts are UnknownElements in AppTest; their JSON spec (``proto.spec``) is read back to check that a control
reached the figure. The figures themselves are tested in test_figures.py.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import streamlit as st
import timm
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import vitviz.analysis.onepass

APP = str(Path(__file__).resolve().parents[1] / "app.py")
ARCH = "vit_tiny_patch16_224"  # 12 layers x 3 heads, P = 16: fast at the app's image sizes
DEPTH, HEADS, P = 12, 3, 16
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random vit_tiny state dict as a plain-tensor .pth (architecture passed beside it, as a user would)."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def calls(monkeypatch, tiny_checkpoint) -> list[int]:
    """Fresh caches, the tiny model as the app's default, and a count of forward passes (analysis.analyze_batch)."""
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("VITVIZ_APP_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("VITVIZ_APP_ARCH", ARCH)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it where it is used
    monkeypatch.delenv("VITVIZ_CHECKPOINT_DIR", raising=False)
    seen: list[int] = []
    real = vitviz.analysis.onepass.analyze_batch

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vitviz.analysis.onepass, "analyze_batch", counting)
    return seen


def started(example: str | None = "cat.jpg") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if example:
        at.selectbox(key="example").set_value(example).run()
    return at


SECTIONS = {"Input": ["Patch grid", "Position embeddings"],
            "Attention": ["Attention rollout", "Heads", "Query patch", "Attention distance"],
            "Explain": ["Explain"],
            "Tokens & features": ["Token norms", "Attention sinks", "Patch features", "Feature similarity"],
            "Experiments": ["Remove positions", "Head ablation", "Train & probe"]}
TAB_KEYS = {"Input": "tab_input", "Attention": "tab_attention", "Tokens & features": "tab_tokens_features",
            "Experiments": "tab_experiments"}
TABS = [view for views in SECTIONS.values() for view in views]
SECTION_OF = {view: section for section, views in SECTIONS.items() for view in views}
ATTENTION_KEYS = {"view", "layers", "raw_layer", "head", "head_fusion", "discard_ratio", "drop_artefacts"}
LAYER_KEYS = {"layers", "raw_layer", "tokens_layer", "heads_layer", "query_layer", "pca_layer", "sim_layer"}


def show(at: AppTest, view: str) -> AppTest:
    """Open a view, as a click on its section and one on its tab do: the app builds only the open tab's figures."""
    section = SECTION_OF[view]
    if any(w.key == "section" for w in at.segmented_control):
        at.segmented_control(key="section").set_value(section)
    else:  # not drawn yet (no image): the section the page will open at
        at.session_state["section"] = section
    if section in TAB_KEYS:
        at.session_state[TAB_KEYS[section]] = view
    return at.run()


def view_text(at: AppTest) -> str:
    """The Markdown of the open view (the open tab's; a section of one view has no tabs: the main column's)."""
    return "\n".join(m.value for block in (at.tabs or [at.main]) for m in block.markdown)


def captions(at: AppTest) -> str:
    return "\n".join(c.value for block in (at.tabs or [at.main]) for c in block.caption)


def widget_keys(block) -> set[str]:
    """The keys of the input widgets drawn in ``block`` (an AppTest, its main column or its sidebar)."""
    kinds = ("slider", "selectbox", "radio", "checkbox", "number_input", "segmented_control", "text_input")
    return {w.key for kind in kinds for w in block.get(kind) if w.key}


def read(markdown: str) -> str:
    """Escaped Markdown as the user reads it: without the backslashes and the invisible word joiners (U+2060)."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")


def err(at: AppTest, i: int = 0) -> str:
    """An error message as the user reads it (the app escapes Markdown in messages: file names show as typed)."""
    return read(at.error[i].value)


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def status(at: AppTest) -> str:
    """The status line as the user reads it (names in it are Markdown-escaped)."""
    return read(next(c.value for c in at.caption if "forward pass" in c.value))


def spec(at: AppTest, key: str) -> dict:
    return json.loads(next(el for el in at.get("plotly_chart") if el.key == key).proto.spec)


def click(at: AppTest, key: str, x: float, y: float) -> AppTest:
    """A click on chart ``key`` at plot point (x, y), as the browser reports it (AppTest has no public way to do it:
    this sends the chart's widget state, a JSON string, through AppTest's internal run)."""
    chart = next(el for el in at.get("plotly_chart") if el.key == key)
    states = at._tree.get_widget_states()
    state = states.widgets.add()
    state.id = chart.proto.id
    state.string_value = json.dumps({"selection": {"points": [{"x": x, "y": y, "curve_number": 1}],
                                                   "point_indices": [0], "box": [], "lasso": []}})
    return at._run(widget_state=states)


def jpeg_bytes(size=(90, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------- pages


def test_no_image_shows_info(calls):
    at = started(example=None)
    ok(at)
    assert "Upload an image" in at.info[0].value
    assert not at.tabs and not calls


def test_each_section_renders_its_views_from_one_pass(calls):
    """Five sections, each its views as tabs (Explain alone, no tabs); every view renders, only the open one is
    built, moving between sections never runs the model again, and a section reopens at the tab it was left on."""
    at = started()
    ok(at)
    assert at.segmented_control(key="section").options == list(SECTIONS)
    assert at.segmented_control(key="section").value == "Input" and [t.label for t in at.tabs] == SECTIONS["Input"]
    assert {el.key for el in at.get("plotly_chart")} == {"fig_grid"}  # only the open tab is built
    keys = set()
    for section, views in SECTIONS.items():
        at.segmented_control(key="section").set_value(section).run()
        ok(at)
        assert [t.label for t in at.tabs] == (views if len(views) > 1 else [])
        for view in views:
            show(at, view)
            ok(at)
            keys |= {el.key for el in at.get("plotly_chart")}
    assert keys == {"fig_grid", "fig_mosaic", "fig_simmap", "fig_rollout", "fig_heads", "fig_query",
                    "fig_query_heads", "fig_distance", "fig_norms", "fig_norm_hist", "fig_sinks", "fig_pca_0",
                    "fig_similarity", "fig_explain", "fig_explain_curves", "fig_posx_intact", "fig_posx_no_position",
                    "fig_posx_shuffled", "fig_posx_shuffled_no_position", "fig_posx_mosaic"}
    at.segmented_control(key="section").set_value("Attention").run()  # back where it was left
    assert {el.key for el in at.get("plotly_chart")} == {"fig_distance"}
    show(at, "Patch grid")
    n = (224 // P) ** 2  # N = HW / P^2 at the default 224 px centre crop
    status_line = status(at)
    assert f"grid {224 // P}x{224 // P}" in status_line
    assert f"{n + 1} tokens = {n} patches + 1 CLS token" in status_line
    assert "centre crop" in status_line and "tiny.pth" in status_line
    assert f"**{n} patches**" in view_text(at)
    assert {b.key for b in at.get("download_button")} >= {"dl_png", "dl_npz", "dl_fig_grid"}
    # the rollout slider opens at the end layer: DEFAULTS give layers 1..last, so position last - 1
    assert spec(show(at, "Attention rollout"), "fig_rollout")["layout"]["sliders"][0]["active"] == DEPTH - 1 - 1
    assert "dl_fig_rollout" in {b.key for b in at.get("download_button")}
    assert len(spec(show(at, "Heads"), "fig_heads")["data"]) == HEADS
    assert len(spec(show(at, "Attention distance"), "fig_distance")["data"]) == HEADS
    assert len(calls) == 1


def test_attention_controls_live_in_the_attention_section_and_each_section_has_one_layer_control(calls):
    """The attention knobs are on the page only while the Attention section is open (in its main column, never in
    the sidebar); Attention and Tokens & features each have one layer control that all their views share."""
    at = started()
    layers = {"Input": set(), "Attention": {"layers"}, "Explain": set(), "Tokens & features": {"tokens_layer"},
              "Experiments": set()}
    for view in TABS:
        section = SECTION_OF[view]
        ok(show(at, view))
        keys = widget_keys(at)
        assert keys & LAYER_KEYS == layers[section], view
        assert not widget_keys(at.sidebar) & (ATTENTION_KEYS | LAYER_KEYS), view
        if section == "Attention":
            assert ATTENTION_KEYS - {"raw_layer"} <= widget_keys(at.main), view
        else:
            assert not keys & ATTENTION_KEYS, view
    show(at, "Attention rollout")
    at.slider(key="layers").set_value((2, 5)).run()
    at.slider(key="discard_ratio").set_value(0.5).run()
    show(at, "Token norms")  # the Attention section's choices hold while it is closed
    show(at, "Heads")
    assert at.slider(key="layers").value == (2, 5) and at.slider(key="discard_ratio").value == 0.5
    assert "Layer 5 (the end layer above)" in view_text(at)
    at.radio(key="view").set_value("raw").run()  # the raw view: still one layer control, the one layer
    assert widget_keys(at) & LAYER_KEYS == {"raw_layer"} and at.slider(key="raw_layer").value == 5
    at.slider(key="raw_layer").set_value(3).run()
    assert "Layer 3 (the end layer above)" in view_text(at)
    show(at, "Query patch")
    assert "Layer 3 (the end layer above)" in view_text(at)
    assert spec(at, "fig_query")["layout"]["sliders"][0]["active"] == 3
    show(at, "Patch features")
    at.selectbox(key="tokens_layer").set_value(4).run()
    assert "Layer 4:" in view_text(at)
    show(at, "Feature similarity")
    assert "Layer 4:" in view_text(at)
    assert len(calls) == 1


@pytest.mark.parametrize("kind", [RuntimeError, ValueError])
def test_a_bug_in_a_view_is_logged_and_said_to_be_one(calls, monkeypatch, caplog, kind):
    """Anything but a VitvizError is a bug (a plain ValueError too): logged with its traceback, the user told it is
    one, never its text worded as if the input were bad; the other views still work."""
    from vitviz.app.views import heads

    error = kind("index 99 is out of bounds for axis 0 with size 12")  # made here: its traceback dies with the test

    def broken(ctx):
        raise error

    monkeypatch.setattr(heads, "render", broken)
    at = started()
    with caplog.at_level(logging.ERROR, logger="vitviz.app"):
        show(at, "Heads")
    assert not at.exception and len(at.error) == 1
    shown = err(at)
    assert "Internal error in the Heads view" in shown and "bug" in shown and "logged" in shown, shown
    assert str(error) not in shown
    logged = [r for r in caplog.records if r.name == "vitviz.app"]
    assert len(logged) == 1 and logged[0].exc_info[1] is error and "Heads" in logged[0].getMessage()
    ok(show(at, "Attention rollout"))
    ok(show(at, "Patch grid"))
    assert len(calls) == 1


def test_a_user_error_in_a_view_is_its_message_and_not_logged(calls, monkeypatch, caplog):
    from vitviz.app.views import heads
    from vitviz.errors import ParameterError

    def refused(ctx):
        raise ParameterError("layer 99 is out of range: choose 0 to 11")

    monkeypatch.setattr(heads, "render", refused)
    at = started()
    with caplog.at_level(logging.ERROR, logger="vitviz.app"):
        show(at, "Heads")
    assert not at.exception and len(at.error) == 1
    assert err(at) == "layer 99 is out of range: choose 0 to 11"
    assert not [r for r in caplog.records if r.name == "vitviz.app"]


@pytest.fixture
def downloads(monkeypatch) -> dict[str, tuple[str, Callable[[], bytes]]]:
    """Every download button's (file name, data function) by its key, as the app registers them with Streamlit
    (AppTest shows a deferred download's file id, not its name)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    seen: dict[str, tuple[str, Callable[[], bytes]]] = {}
    real = MediaFileManager.add_deferred

    def spy(self, data_callable, mimetype, coordinates, file_name=None, *, element_id=""):
        seen[element_id.rsplit("-", 1)[-1]] = (file_name, data_callable)
        return real(self, data_callable, mimetype, coordinates, file_name, element_id=element_id)

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    return seen


def test_downloads_are_named_after_the_image_and_hold_the_attention_sections_map(calls, downloads):
    at = started()
    assert downloads["dl_png"][0] == "cat-overlay.png" and downloads["dl_npz"][0] == "cat.npz"
    assert downloads["dl_fig_grid"][0] == "cat-grid.html"
    show(at, "Heads")
    assert downloads["dl_fig_heads"][0] == "cat-heads.html"
    at.radio(key="view").set_value("raw").run()
    at.slider(key="raw_layer").set_value(4).run()
    show(at, "Token norms")  # another section open: the downloads still hold the Attention section's map
    assert any("raw CLS attention" in c.value for c in at.sidebar.caption)
    arrays = np.load(io.BytesIO(downloads["dl_npz"][1]()))
    assert str(arrays["attention_map_kind"]) == "raw" and arrays["attention_map"].shape == (224 // P, 224 // P)
    assert int(arrays["end_layer"]) == 4 and json.loads(str(arrays["settings"]))["view"] == "raw"
    png = Image.open(io.BytesIO(downloads["dl_png"][1]()))
    assert png.format == "PNG" and 250 <= png.height <= 300  # the crop the model saw, at the original's resolution
    at.file_uploader(key="upload").set_value(("../my photo.final.JPG", jpeg_bytes(), "image/jpeg")).run()
    ok(at)
    assert downloads["dl_png"][0] == "my_photo.final-overlay.png" and downloads["dl_npz"][0] == "my_photo.final.npz"
    assert downloads["dl_fig_norms"][0] == "my_photo.final-norms.html"


def test_model_geometry_controls(calls):
    at = started()
    at.slider(key="patch_size").set_value(32).run()
    ok(at)
    assert "grid 7x7" in status(at) and "50 tokens = 49 patches" in status(at)  # 224 / 32 = 7
    at.slider(key="img_size").set_value(128).run()
    ok(at)
    assert "grid 4x4" in status(at)  # 128 / 32 = 4
    at.slider(key="patch_size").set_value(16).run()  # one control per run, as in a browser
    at.slider(key="img_size").set_value(112).run()
    assert "grid 7x7" in status(at)  # 112 / 16
    at.radio(key="fit").set_value("whole").run()
    ok(at)
    gh, gw = (int(v) for v in status(at).split("grid ")[1].split(" ")[0].split("x"))
    assert gh * gw <= 49 and math.isclose(gw / gh, 451 / 300, rel_tol=0.2)  # the cat photo is 451 x 300
    assert "whole image" in status(at)
    # a CPU-only machine has no device or precision to choose: no controls that change nothing, only a caption
    assert not [w for w in at.selectbox if w.key in ("device", "precision")]
    assert any("Running on **cpu**" in c.value for c in at.sidebar.caption)
    assert len(calls) == 6  # every geometry change above (5 runs after the first) is a new forward pass


def test_attention_controls_reach_the_views_without_a_forward_pass(calls):
    at = show(started(), "Attention rollout")
    assert len(calls) == 1
    at.slider(key="layers").set_value((3, 7)).run()
    ok(at)
    rollout = spec(at, "fig_rollout")
    assert rollout["layout"]["sliders"][0]["active"] == 7 - 3
    assert [s["label"] for s in rollout["layout"]["sliders"][0]["steps"]] == [f"layers 3-{b}" for b in range(3, DEPTH)]
    at.radio(key="view").set_value("raw").run()
    raw = spec(at, "fig_rollout")
    assert raw["layout"]["sliders"][0]["active"] == 7 and len(raw["frames"]) == DEPTH
    at.selectbox(key="head").set_value(2).run()
    assert "head 2" in view_text(at)
    assert at.selectbox(key="head_fusion").disabled  # fusion means nothing for one head
    at.selectbox(key="head").set_value("all heads (fused)").run()
    at.selectbox(key="head_fusion").set_value("max").run()
    assert "(max)" in view_text(at)
    at.radio(key="view").set_value("rollout").run()  # discard applies to rollout only (disabled for raw)
    at.slider(key="discard_ratio").set_value(0.5).run()
    assert "discard 0.50" in view_text(at)
    at.selectbox(key="colorscale").set_value("Viridis")
    at.slider(key="opacity").set_value(0.3).run()
    heat = spec(at, "fig_rollout")["data"][1]
    assert heat["colorscale"][0][1] == "rgb(68, 1, 84)" and heat["opacity"] == pytest.approx(0.3)  # Viridis: #440154
    at.number_input(key="query_patch").set_value(5).run()
    assert at.session_state["query_patch"] == 5
    assert "Patch 5 (row 0, col 5)" in view_text(show(at, "Query patch"))
    show(at, "Heads")
    at.radio(key="heads_source").set_value("query patch")
    at.slider(key="layers").set_value((3, 4)).run()  # the section's one layer control: its end layer
    assert "Layer 4 (the end layer above): where patch 5 attends" in view_text(at)
    ok(at)
    assert len(calls) == 1  # nothing above re-ran the model


def test_clicks_pick_the_query_patch(calls):
    at = started()
    gw = 224 // P  # 14 x 14 patches
    at = click(at, "fig_grid", 3.5 * P, 2.5 * P)  # centre of row 2, col 3
    ok(at)
    assert at.session_state["query_patch"] == 2 * gw + 3
    assert "Patch 31 (row 2, col 3)" in view_text(show(at, "Query patch"))
    at = click(show(at, "Attention rollout"), "fig_rollout", 13 * P + 1, 0.2 * P)  # top-right patch, off centre
    assert at.session_state["query_patch"] == gw - 1
    # mosaic: tile (r, c) spans cells [r (gh+1), r (gh+1) + gh) x [c (gw+1), ...]; a tile cell of row 5, col 1
    at = click(show(at, "Position embeddings"), "fig_mosaic", 1 * (gw + 1) + 4, 5 * (gw + 1) + 2)
    assert at.session_state["query_patch"] == 5 * gw + 1
    at = click(at, "fig_mosaic", 1 * (gw + 1) - 1, 0)  # the blank column between tiles: no change
    ok(at)
    assert at.session_state["query_patch"] == 5 * gw + 1
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------- errors


def test_invalid_upload_then_valid_inputs_work(calls):
    at = started(example=None)
    at.file_uploader(key="upload").set_value(("photo.jpg", b"<!DOCTYPE html><html><body>hi</body></html>",
                                               "image/jpeg")).run()
    assert not at.exception
    assert len(at.error) == 1 and "HTML page, not an image" in err(at) and "photo.jpg" in err(at)
    at.file_uploader(key="upload").set_value(("red.jpg", jpeg_bytes(), "image/jpeg")).run()
    ok(at)
    assert "resized 90x60" in status(at)
    at.file_uploader(key="upload").set_value(None)
    at.selectbox(key="example").set_value("coffee.jpg").run()
    ok(at)
    assert "resized 600x400" in status(at)


def test_offline_hub_model_shows_error_and_app_recovers(calls):
    at = started(example=None)
    at.file_uploader(key="upload").set_value(("red.jpg", jpeg_bytes(), "image/jpeg")).run()
    show(at, "Attention rollout")
    at.slider(key="layers").set_value((3, 7)).run()
    at.selectbox(key="model").set_value("deit_small_patch16_224").run()
    assert not at.exception
    assert len(at.error) == 1 and "Hugging Face Hub" in err(at)
    at.selectbox(key="model").set_value("default").run()
    ok(at)
    # back where the user was: same image, same layer range, no new forward pass
    assert "tiny.pth" in status(at) and "resized 90x60" in status(at)
    assert at.slider(key="layers").value == (3, 7)
    assert len(calls) == 1


def test_uploaded_checkpoint_with_architecture(calls, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a temp folder of our own: others' runs share /tmp
    at = started()
    at.selectbox(key="model").set_value("upload").run()
    ok(at)
    assert "Upload a checkpoint" in at.info[0].value
    at.text_input(key="arch").set_value("vit_tinny_patch16_224").run()
    assert "not a timm architecture" in err(at) and ARCH in err(at)  # suggests the real name
    at.text_input(key="arch").set_value(ARCH)
    at.file_uploader(key="ckpt_upload").set_value(("../../evil name.pth", tiny_checkpoint.read_bytes(),
                                                   "application/octet-stream")).run()
    ok(at)
    text = status(at)
    assert "../../evil name.pth" in text and ARCH in text  # the user's name, shown as typed (escaped)
    assert not list(tmp_path.iterdir()), "the uploaded file must not stay on disk"
    at.text_input(key="arch").set_value("vit_small_patch16_224").run()  # a real name, but not these weights
    assert "do not fit architecture 'vit_small_patch16_224'" in err(at)
    at.selectbox(key="model").set_value("default").run()
    ok(at)
    at.selectbox(key="model").set_value("upload").run()
    assert at.text_input(key="arch").value == "vit_small_patch16_224"  # kept while the box was hidden


def test_checkpoint_directory_is_listed(calls, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("VITVIZ_CHECKPOINT_DIR", str(tiny_checkpoint.parent))
    at = started()
    assert "Checkpoint: tiny.pth" in at.selectbox(key="model").options  # options as labelled
    at.selectbox(key="model").set_value("dir:tiny.pth").run()
    ok(at)
    assert "tiny.pth" in status(at) and "grid 14x14" in status(at)


@pytest.mark.slow
def test_embedded_default_model(monkeypatch):
    """The real DINOv2 ViT-S/14 (converted once, then cached): 16 x 16 patches of 14 px at 224, one CLS token."""
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.delenv("VITVIZ_APP_MODEL", raising=False)
    monkeypatch.delenv("VITVIZ_APP_ARCH", raising=False)
    at = started()
    ok(at)
    assert "vit_small_patch14_dinov2" in status(at) and "257 tokens = 256 patches + 1 CLS token" in status(at)


def test_gpu_out_of_memory_falls_back_to_the_cpu_with_a_notice(calls, monkeypatch):
    """The first pass runs out of accelerator memory (simulated): the app says so and shows the CPU result."""
    from vitviz.errors import OutOfMemoryError

    counting = vitviz.analysis.onepass.analyze_batch

    def oom_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise OutOfMemoryError("the CUDA ran out of memory for 1 image(s) at 14x14 patches (1 MB of attention)")
        return counting(*args, **kwargs)

    monkeypatch.setattr(vitviz.analysis.onepass, "analyze_batch", oom_once)
    at = started()
    assert not at.exception and not at.error
    assert len(at.warning) == 1 and "ran out of memory" in at.warning[0].value and "CPU instead" in at.warning[0].value
    assert "forward pass" in status(at) and "cpu" in status(at)
    assert len(calls) == 2  # the failed try and the CPU pass
    at.slider(key="opacity").set_value(0.3).run()
    show(at, "Heads")
    at.slider(key="layers").set_value((0, 1)).run()
    assert not at.exception and len(at.warning) == 1  # the notice stays: this result came from the CPU
    assert len(calls) == 2  # control changes use the cached CPU result: no new pass, no new GPU try


def test_one_layer_model_renders(calls, monkeypatch, tmp_path):
    """A slider needs two ends: a one-layer model gets no layer slider, and every view still renders."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=64, depth=1)
    path = tmp_path / "one.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path), metadata={"arch": ARCH, "kwargs": '{"depth": 1, "img_size": 64}'})
    monkeypatch.setenv("VITVIZ_APP_MODEL", str(path))
    at = started()
    ok(at)
    for tab in TABS:
        ok(show(at, tab))
        assert ("a single layer" in " ".join(c.value for c in at.main.caption)) == (SECTION_OF[tab] == "Attention")


def test_any_pretrained_timm_vit_from_the_registry(calls):
    """'Another timm ViT': a searchable list from timm's registry (no free text); offline it fails with a message."""
    at = started()
    at.selectbox(key="model").set_value("hub:other").run()
    ok(at)
    assert "Choose a timm model" in at.info[0].value
    options = at.selectbox(key="hub_name").options
    assert len(options) > 100 and any("deit_small_patch16_224.fb_in1k" in o for o in options)
    at.selectbox(key="hub_name").set_value("deit_tiny_patch16_224.fb_in1k").run()
    assert not at.exception and len(at.error) == 1 and "Hugging Face Hub" in err(at)
    at.selectbox(key="model").set_value("default").run()
    ok(at)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ what a new user hit


def chart_proto(at: AppTest, key: str):
    return next(el for el in at.get("plotly_chart") if el.key == key).proto


def test_figures_keep_their_true_colours_and_say_what_they_show(calls):
    """No Streamlit theme on the figures (it turned Inferno's first colour pink), colour bars with units, words."""
    at = show(started(), "Attention rollout")
    proto = chart_proto(at, "fig_rollout")
    assert proto.theme == "", "theme=None: the figure's own colours reach the screen"
    heat = json.loads(proto.spec)["data"][1]
    assert heat["colorscale"][0][1] == "rgb(0, 0, 4)" and heat["colorbar"]["title"]["text"] == "share of CLS attention"
    text = view_text(at)
    assert "Brighter patches get more" in text and "downloads" in text and "in your browser only" in text
    at.radio(key="view").set_value("raw").run()
    text = view_text(at)
    assert "raw attention of layer 11" in text and "CLS attention, raw CLS" not in text
    show(at, "Attention distance")
    assert "attends to nearby patches" in view_text(at)


def test_raw_view_has_one_layer_control(calls):
    at = show(started(), "Attention distance")
    at.slider(key="layers").set_value((3, 7)).run()
    at.radio(key="view").set_value("raw").run()
    keys = [s.key for s in at.main.slider]
    assert "raw_layer" in keys and "layers" not in keys, "a raw map has no start layer to choose"
    assert at.slider(key="raw_layer").value == 7
    at.slider(key="raw_layer").set_value(4).run()
    ok(show(at, "Attention rollout"))
    assert "raw attention of layer 4" in view_text(at)
    assert json.loads(chart_proto(at, "fig_rollout").spec)["layout"]["sliders"][0]["active"] == 4


def test_heads_share_one_colour_range_by_default(calls):
    at = show(started(), "Heads")
    shared = json.loads(chart_proto(at, "fig_heads").spec)
    assert "coloraxis" in shared["layout"] and shared["layout"]["coloraxis"]["colorbar"]["title"]["text"]
    assert "one colour range for all heads" in view_text(at)
    at.radio(key="heads_scale").set_value("per head").run()
    own = json.loads(chart_proto(at, "fig_heads").spec)
    assert "coloraxis" not in own["layout"] and "each head its own range" in view_text(at)
    assert chart_proto(at, "fig_heads").spec and len(calls) == 1


def test_the_query_patch_keeps_its_place_when_the_grid_changes(calls):
    """Row 3, col 12 of the 14 x 14 grid (P = 16) is row 1, col 6 of the 7 x 7 grid at P = 32: the same place."""
    at = started()
    at.number_input(key="query_patch").set_value(3 * 14 + 12).run()
    at.slider(key="patch_size").set_value(32).run()
    ok(at)
    assert at.session_state["query_patch"] == 1 * 7 + 6
    at.slider(key="patch_size").set_value(16).run()
    assert at.session_state["query_patch"] == 3 * 14 + 13  # back at the same place, to within one patch


def test_image_sizes_offered_fit_the_memory_budget(calls, monkeypatch):
    """Only sizes whose whole analysis fits the server's budget are offered, and the largest works."""
    from vitviz.analysis.onepass import analysis_bytes, max_square_size

    budget = 64 * 2**20
    monkeypatch.setattr(vitviz.analysis.onepass, "MAX_ANALYSIS_BYTES", budget)
    at = started()
    at.slider(key="patch_size").set_value(8).run()
    top = int(at.slider(key="img_size").max)
    kw = dict(depth=DEPTH, heads=HEADS, embed_dim=192)  # vit_tiny; the app keeps the tokens too
    assert top == max_square_size(**kw, patch_size=8, num_prefix_tokens=1, budget=budget) < 512
    assert analysis_bytes(**kw, tokens=(top // 8) ** 2 + 1) <= budget
    assert analysis_bytes(**kw, tokens=(top // 8 + 1) ** 2 + 1) > budget
    at.slider(key="img_size").set_value(top).run()
    ok(at)
    assert f"grid {top // 8}x{top // 8}" in status(at)
    assert "more memory than this server allows" in at.slider(key="img_size").help


def test_token_views_from_the_same_pass_with_a_second_image(calls):
    """Token norms, sinks, PCA and similarity read the one pass; a second image costs one pass of its own."""
    at = started()
    ok(show(at, "Token norms"))
    assert "length (L2 norm)" in view_text(at) and "Prefix tokens" in captions(at)
    ok(show(at, "Attention sinks"))
    assert "Top receivers" in captions(at)
    for tab in ("Patch features", "Feature similarity"):
        ok(show(at, tab))
    assert len(calls) == 1
    at.file_uploader(key="upload2").set_value(("second.jpg", jpeg_bytes((120, 80)), "image/jpeg")).run()
    ok(show(at, "Patch features"))
    assert "one basis fitted to both images" in view_text(at)
    ok(show(at, "Feature similarity"))
    assert "Best match in the second image" in captions(at)
    assert len(calls) == 2  # the second image's own pass, once
    ok(show(at, "Attention rollout"))
    at.checkbox(key="drop_artefacts").check().run()
    assert "artefact tokens left out" in view_text(at) and len(calls) == 2


def test_explain_view_states_its_target_and_faithfulness_and_never_a_missing_class(calls):
    """The tiny checkpoint has no head: the targets are label-free (embedding, query patch), no predictions shown."""
    at = show(started(), "Explain")
    ok(at)
    assert at.selectbox(key="explain_target").options[0] == "the image's own embedding (label-free)"
    assert not any("class" in o for o in at.selectbox(key="explain_target").options)
    text = view_text(at)
    assert "explains **the image's own CLS embedding**" in text and "8 random maps score" in text
    assert "Faithfulness by token removal" in text  # the measure is named beside the score
    assert "AttnLRP (Achtibat et al. 2024), CP-LRP in attention: relevance per patch (gamma_from=-4) — default" in text
    assert "1 forward + 1 backward (relevance rules)" in text and "still to go" not in text
    assert "Predictions" not in captions(at)
    curves = json.loads(chart_proto(at, "fig_explain_curves").spec)
    assert [tr["name"] for tr in curves["data"]][2:] == ["random MoRF (mean of 8)", "random LeRF (mean of 8)"]
    at.selectbox(key="explain_method").set_value("chefer").run()
    ok(at)
    assert "Chefer" in view_text(at) and len(calls) == 1  # the explanation pass is its own
    assert "ranked best among the methods that cost at most three passes" in view_text(at)
    at.selectbox(key="explain_method").set_value("rollout:start=1,discard=0.9").run()
    assert "attention rollout of the CLS token (without one, of the head's readout) (start=1,discard=0.9)" in (
        view_text(at)) and "1 forward (attention only)" in view_text(at)
    at.selectbox(key="explain_method").set_value("legrad").run()
    assert "LeGrad (Bousselham et al. 2024)" in view_text(at)
    at.selectbox(key="explain_method").set_value("deletion").run()  # greedy deletion: on demand
    assert "greedy token deletion (most faithful by token removal)" in view_text(at)
    assert "still to go when it was removed" in view_text(at)
    assert "steps, each a forward and a forward + backward pass on the patches left" in view_text(at)
    # ready: no bar left (but the score by blurring's, measured after the map: tests/test_app_explain_measures.py)
    assert not [bar for bar in at.get("progress") if "blurring" not in bar.proto.text]


def _explain_inputs():
    """(key, analysis, weights) of one image through the tiny default model, as the app's caches hold them."""
    from vitviz.analysis.onepass import input_size_for
    from vitviz.app import cache
    from vitviz.app.state import app_model
    from vitviz.models import ModelKey

    name, arch = app_model()  # the tiny checkpoint, as the app loads it
    weights = cache.model_source(name, arch)
    data = jpeg_bytes((96, 80))
    image = cache.image(cache.digest(data), data, "x.jpg")
    size = input_size_for(image.image, img_size=64, patch_size=P, fit="crop")
    key = cache.AnalysisKey(ModelKey(name, arch, P, size, "cpu", "fp32"), cache.digest(data), "crop")
    res, _notice = cache.analysis(key, image, weights)
    return key, res, weights


class GatedExplain:
    """vitviz.explain.explain_all held at a gate, then each progress step kept on show for ``pace`` seconds;
    records the methods it ran and how many ran at once."""

    def __init__(self, monkeypatch, *, pace: float = 0.3):
        import threading

        import vitviz.explain

        self.gate, self.real, self.pace = threading.Event(), vitviz.explain.explain_all, pace
        self.runs: list[str] = []
        self.inside, self.most = 0, 0
        self.lock = threading.Lock()
        monkeypatch.setattr(vitviz.explain, "explain_all", self)

    def __call__(self, *args, progress=None, **kwargs):
        import time

        with self.lock:
            self.runs.append(kwargs["methods"][0])
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            assert self.gate.wait(10)

            def paced(i, n):  # each step stays on show longer than the asker's poll interval
                progress(i, n)
                time.sleep(self.pace)

            return self.real(*args, progress=paced, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1


def test_explanations_are_one_shared_job_with_progress_and_failures_are_not_kept(calls, monkeypatch):
    """The cached resource is the job: two askers share one computation; progress reaches the asker's thread while
    it runs; a failure is raised to each asker and not cached (asking again retries)."""
    import threading

    from vitviz.app import jobs

    key, res, weights = _explain_inputs()
    gated = GatedExplain(monkeypatch)
    seen: list[tuple[float, str]] = []
    threading.Timer(0.5, gated.gate.set).start()
    first = jobs.explanation(key, "deletion:steps=4", "embedding", res, weights,
                             progress=lambda f, t: seen.append((f, t)))
    again = jobs.explanation(key, "deletion:steps=4", "embedding", res, weights)
    assert first is again and gated.runs == ["deletion:steps=4"]
    assert any(t.startswith("Greedy deletion: step") for _f, t in seen) and seen[-1][0] >= seen[0][0]
    assert first.explanation.method.label == "deletion:steps=4"
    for _ in range(2):
        with pytest.raises(ValueError, match="no classifier head"):
            jobs.explanation(key, "chefer", "class", res, weights)
    assert gated.runs.count("chefer") == 2


def test_explanation_jobs_are_bounded_and_stop_when_nobody_waits(calls, monkeypatch):
    """At most MAX_RUNNING jobs compute at once; a job nobody polls stops at its next step and is started afresh by
    the next asker."""
    import time

    from vitviz.app import jobs

    key, res, weights = _explain_inputs()
    monkeypatch.setattr(jobs, "ABANDON_S", 0.6)
    gated = GatedExplain(monkeypatch, pace=0.4)
    started = [jobs._job(key, f"deletion:steps={s}", "embedding", res, jobs.cache.model(key.model, weights))
               for s in (2, 3, 4)]  # nobody polls them
    deadline = time.monotonic() + 20  # a loaded machine may take a while to start the threads
    while len(gated.runs) < jobs.MAX_RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert gated.most == jobs.MAX_RUNNING and len(gated.runs) == jobs.MAX_RUNNING  # the third waits for a slot
    gated.gate.set()
    for job in started:
        assert job.done.wait(10) and isinstance(job.error, jobs.Abandoned), job.error
    done = jobs.explanation(key, "deletion:steps=3", "embedding", res, weights)  # asked again: computed afresh
    assert done.explanation.method.label == "deletion:steps=3" and gated.runs.count("deletion:steps=3") == 2
    assert gated.most <= jobs.MAX_RUNNING


def test_analyses_of_a_session_do_not_outlive_the_caches(calls):
    """Issue 14: each upload's analysis was kept alive by a widget callback holding the script's globals (43 alive
    after 44 uploads). Now only the caches hold them: after many distinct uploads, at most the cache's size live."""
    import gc

    from vitviz.analysis.onepass import Analysis

    at = show(started(example=None), "Attention rollout")
    for i in range(12):
        at.file_uploader(key="upload").set_value((f"u{i}.jpg", jpeg_bytes((90 + i, 60)), "image/jpeg")).run()
        ok(at)
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, Analysis)]
    assert len(calls) == 12 and len(alive) <= 4 + 1, f"{len(alive)} analyses alive after 12 uploads (cache: 4)"


def test_a_checkpoint_whose_metadata_names_a_file_never_makes_the_server_read_it(calls, tmp_path, monkeypatch):
    """Issue 14's attack through the app: an uploaded .safetensors whose 'kwargs' metadata is {"checkpoint_path":
    <a planted file>}. The user gets one message; the planted file is never opened by torch, safetensors or timm."""
    from safetensors.torch import save, save_file

    planted = tmp_path / "planted.safetensors"
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=64)
    save_file(model.state_dict(), str(planted))
    opened: list[str] = []
    real_open = open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    import safetensors

    real_load, real_safe_open = torch.load, safetensors.safe_open
    monkeypatch.setattr("builtins.open", spy_open)
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (opened.append(str(f)), real_load(f, *a, **k))[1])
    monkeypatch.setattr(safetensors, "safe_open",
                        lambda f, *a, **k: (opened.append(str(f)), real_safe_open(f, *a, **k))[1])
    meta = {"arch": ARCH, "kwargs": json.dumps({"img_size": 64, "checkpoint_path": str(planted)})}
    data = save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=meta)
    at = started()
    at.selectbox(key="model").set_value("upload").run()
    at.file_uploader(key="ckpt_upload").set_value(("evil.safetensors", data, "application/octet-stream")).run()
    assert not at.exception and len(at.error) == 1
    assert "'checkpoint_path' is never passed on" in err(at)
    assert str(planted) not in opened and not any(str(planted) in s for s in opened)


# --------------------------------------------------------------------------------------------- user names shown


UNESCAPED = re.compile(r"(?<!\\)[:\[\]*_`$<>#|~&/]")  # what Markdown or Streamlit would interpret, not escaped
# what Streamlit 1.67's Markdown replaces in the parsed text (backslashes no longer count there): its logo, arrows
STREAMLIT_TEXT = re.compile(r":streamlit:|(^|\s)(<->|->|<-|--|>=|<=|~=)(\s|$)")


@pytest.mark.parametrize("name", [":red[red].png", ":smile: :material/home: **b** $x$.pth", "a&amp;b <i>x</i>.png",
                                  "[l](http://x) ![i](y) `c` ~~s~~ _u_ |t|.png", "1. list.png", "# h.png",
                                  "x\n===\n- y.png", "a -> b <-> c -- d >= e.png", ":streamlit: \\:q\\:.png"])
def test_md_escape_leaves_nothing_for_markdown_to_interpret(name):
    """The escaped name reads as the name (line breaks as spaces), and nothing in it is left for Markdown or
    Streamlit's own rules to turn into formatting, a directive, an emoji, an icon, a list, a heading or an arrow.
    (Checked once in chromium on Streamlit 1.67: each of these renders as typed in st.markdown, st.error and
    st.caption.)"""
    from vitviz.app.widgets import md_escape

    shown = md_escape(name)
    assert read(shown) == " ".join(re.split(r"\n+", name))
    assert not UNESCAPED.search(shown) and "\n" not in shown, shown
    assert not STREAMLIT_TEXT.search(re.sub(r"\\(.)", r"\1", shown)), shown
    assert not re.match(r"\s*\d+[.)]", shown), shown  # an ordered list


@pytest.mark.parametrize("name", ["my-weights.pth", "../../evil name.pth", "..\\..\\win.PTH", "a\x00b\nc\x7f.bin",
                                  "x" * 300 + ".pth", "名前" * 100 + ".safetensors", "/", "../.pth", " .. .pt"])
def test_an_upload_is_stored_under_the_users_file_name_and_nothing_else(name, tmp_path):
    """The temp file is named as the user's file (so messages name it), but is one plain file name in its folder."""
    from vitviz.app.cache import upload_file_name

    suffix = Path(name).suffix.lower()
    stored = upload_file_name(name, suffix)
    assert stored.lower().endswith(suffix) and stored not in ("", ".", "..") and len(stored.encode()) <= 255
    assert not any(ch in stored for ch in "/\\\x00\n\x7f"), stored
    assert (tmp_path / stored).parent == tmp_path
    (tmp_path / stored).write_bytes(b"x")  # a name this file system takes
    if name in ("my-weights.pth", "../../evil name.pth", "..\\..\\win.PTH"):
        assert stored == re.split(r"[\\/]", name)[-1]  # the user's own name


@pytest.mark.parametrize("kind", ["text.pth", "cut zip.pth", "text.safetensors"])
def test_a_refused_checkpoint_is_named_by_the_users_file_name(calls, tiny_checkpoint, kind, tmp_path, monkeypatch):
    """The server reads an upload from a temp file; its messages name the user's file, never that temp file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a temp folder of our own: others' runs share /tmp
    suffix = Path(kind).suffix
    data = {"text.pth": b"these are not tensors\n" * 20, "text.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}x",
            "cut zip.pth": tiny_checkpoint.read_bytes()[:20_000]}[kind]
    at = started()
    at.selectbox(key="model").set_value("upload").run()
    at.text_input(key="arch").set_value(ARCH)
    at.file_uploader(key="ckpt_upload").set_value((f"my-weights{suffix}", data, "application/octet-stream")).run()
    assert not at.exception and len(at.error) == 1
    shown = err(at)
    assert f"'my-weights{suffix}'" in shown, shown
    assert "vitviz-upload" not in shown and str(tmp_path) not in shown, shown
    assert not list(tmp_path.iterdir()), "the uploaded file must not stay on disk"


def test_markdown_in_names_is_shown_as_typed(calls, tiny_checkpoint):
    """Streamlit renders ``:red[red]`` red, ``:smile:`` as an emoji, ``:material/home:`` as an icon, ``**b**`` bold:
    an image, checkpoint or architecture name the user gave is shown literally, its Markdown escaped."""
    at = started(example=None)
    at.file_uploader(key="upload").set_value((":red[red].png", b"", "image/png")).run()  # empty: refused by name
    assert len(at.error) == 1
    body = at.error[0].value  # the Markdown source Streamlit renders
    assert r"\:red\[red\]" in body and not UNESCAPED.search(body), body
    assert "':red[red].png' is empty" in err(at)

    at.file_uploader(key="upload").set_value(("red.jpg", jpeg_bytes(), "image/jpeg")).run()
    ok(at)
    at.selectbox(key="model").set_value("upload").run()
    at.text_input(key="arch").set_value(":red[x]").run()  # a typed architecture: refused, by what was typed
    body = at.error[0].value
    assert r"\:red\[x\]" in body and not UNESCAPED.search(body), body
    at.text_input(key="arch").set_value(ARCH)
    name = ":smile: :material/home: **b** $x$.pth"
    at.file_uploader(key="ckpt_upload").set_value((name, tiny_checkpoint.read_bytes(), "application/octet-stream"))
    at.run()
    ok(at)
    shown = status(at)
    assert name in shown  # as the user reads it
    raw = next(c.value for c in at.caption if "forward pass" in c.value)
    assert r"\:smile\: \:material\/home\: \*\*b\*\* \$x\$.pth" in raw, raw


def test_an_abandoned_job_stops_inside_its_pass_and_a_long_one_is_bounded(calls, monkeypatch):
    """A one-pass method has no steps: the job must still stop between blocks once nobody waits (before, it ran to
    its end); and a job past the operator's time limit stops with a sentence."""
    import time

    from vitviz.app import jobs

    key, res, weights = _explain_inputs()
    monkeypatch.setattr(jobs, "ABANDON_S", 0.3)
    gated = GatedExplain(monkeypatch)
    job = jobs._job(key, "chefer", "embedding", res, jobs.cache.model(key.model, weights))  # nobody polls it
    time.sleep(0.5)  # abandoned while held at the gate, before its walk starts
    gated.gate.set()
    assert job.done.wait(10) and isinstance(job.error, jobs.Abandoned), job.error
    monkeypatch.setattr(jobs, "ABANDON_S", 60.0)
    monkeypatch.setenv("VITVIZ_MAX_JOB_SECONDS", "0.000001")
    with pytest.raises(ValueError, match="stopped after"):
        jobs.explanation(key, "legrad", "embedding", res, weights)


def test_a_stride_zero_checkpoint_upload_is_refused_before_any_model_is_built(calls, tmp_path, monkeypatch):
    """Issue 23's attack through the app: a tiny .pt whose tensors are stride-0 views, naming a 1.8-billion-parameter
    architecture. Refused by name, no model built, and the uploader says the server's model-size cap."""
    import timm
    import torch

    with torch.device("meta"):
        giant = timm.create_model("vit_gigantic_patch14_224", num_classes=0)
    shapes = {k: v.shape for k, v in giant.state_dict().items()}
    path = tmp_path / "evil.pt"
    torch.save({k: torch.full((1,), 1e-3).expand(*s) for k, s in shapes.items()}, path)
    built = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    at = started()
    at.selectbox(key="model").set_value("upload").run()
    assert any("million parameters" in c.value for c in at.sidebar.caption), "the uploader states the cap"
    at.text_input(key="arch").set_value("vit_gigantic_patch14_224")
    at.file_uploader(key="ckpt_upload").set_value(("evil.pt", path.read_bytes(), "application/octet-stream")).run()
    assert not at.exception and len(at.error) == 1
    assert "'evil.pt'" in err(at) and "not stored whole" in err(at), err(at)
    assert not [b for b in built if "gigantic" in str(b)], f"the attacker's model was built: {built}"


def test_the_apps_jobs_never_ask_for_more_threads_than_cores(monkeypatch):
    """The jobs that may compute at once and the page's own work share the cores; VITVIZ_THREADS overrides."""
    import torch

    from vitviz.app import jobs
    from vitviz.device import cpu_threads

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    for env, want in (("", cpu_threads(jobs.MAX_RUNNING + 1)), ("3", 3), ("x", cpu_threads(jobs.MAX_RUNNING + 1))):
        jobs.share_cores.cache_clear()
        monkeypatch.setenv("VITVIZ_THREADS", env)
        assert jobs.share_cores() == want and seen[-1] == want
    assert cpu_threads(jobs.MAX_RUNNING + 1, cores=2) == 1 and cpu_threads(jobs.MAX_RUNNING + 1, cores=16) == 5
    jobs.share_cores.cache_clear()


def test_the_page_shares_the_cores_before_its_own_pass(monkeypatch, calls):
    """The page's own forward pass already runs at the shared thread count (not torch's default of one thread per
    core beside the jobs), set before the first pass of the process, not at its first explanation."""
    import torch

    from vitviz.app import jobs

    events: list[tuple] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: events.append(("threads", n)))
    counting = vitviz.analysis.onepass.analyze_batch

    def recording(*args, **kwargs):
        events.append(("pass",))
        return counting(*args, **kwargs)

    monkeypatch.setattr(vitviz.analysis.onepass, "analyze_batch", recording)
    monkeypatch.setenv("VITVIZ_THREADS", "1")
    jobs.share_cores.cache_clear()
    try:
        at = started()
        assert not at.exception and calls, "the page ran its pass"
        assert ("pass",) in events and events.index(("threads", 1)) < events.index(("pass",)), events
    finally:
        jobs.share_cores.cache_clear()


# ------------------------------------------------------------------------------- what a new user hit (issue 19)


def heat_trace(at: AppTest, key: str) -> dict:
    return next(t for t in spec(at, key)["data"] if t["type"] == "heatmap")


def plotly_array(value) -> np.ndarray:
    """An array of a figure's JSON spec: a list, or plotly's typed array ({"dtype", "bdata", "shape"})."""
    if isinstance(value, dict):
        import base64

        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(v) for v in str(value.get("shape", flat.size)).split(",")]
        return flat.reshape(shape).astype(float)
    return np.asarray(value, dtype=float)


def luminance(rgb_text: str) -> float:
    r, g, b = (float(v) / 255 for v in re.findall(r"[\d.]+", rgb_text)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_every_offered_colour_scale_grows_brighter_with_the_value(calls):
    """Issue 19, 2: "Greys" drew the highest values black while every caption says brighter = more. Each scale the
    sidebar offers reaches the figure darkest at its low end and brightest at its high end."""
    at = show(started(), "Attention rollout")
    box = at.selectbox(key="colorscale")
    assert "Greys" in [box.format_func(o) for o in box.options]
    for option in box.options:
        box.set_value(option).run()
        ok(at)
        scale = heat_trace(at, "fig_rollout")["colorscale"]
        assert luminance(scale[-1][1]) > luminance(scale[0][1]) + 0.5, (box.format_func(option), scale)
        box = at.selectbox(key="colorscale")
    assert len(calls) == 1


def test_the_query_patch_is_outlined_in_the_query_and_rollout_views(calls):
    """Issue 19, 7: the Query patch view (and the rollout) outline the query patch, as every other view does."""
    at = started()
    at.number_input(key="query_patch").set_value(3 * 14 + 12).run()
    for view, key in (("Query patch", "fig_query"), ("Attention rollout", "fig_rollout")):
        shapes = spec(show(at, view), key)["layout"]["shapes"]
        assert [(s["x0"], s["y0"], s["x1"], s["y1"]) for s in shapes] == [(12 * P, 3 * P, 13 * P, 4 * P)], view


def test_probabilities_keep_their_significant_digits():
    """Issue 19, 8: the predictions caption printed "p = 0.00" for a small probability."""
    from vitviz.models.labels import Prediction

    assert Prediction(207, "golden retriever", 0.8312, 3.0).describe() == "class 207 'golden retriever' (p = 0.83)"
    assert "(p = 0.0031)" in Prediction(3, None, 0.00312, -1.0).describe()
    assert "(p = 4.2e-06)" in Prediction(3, None, 4.2e-6, -9.0).describe()


def test_each_head_on_its_own_range_says_its_range(calls):
    """Issue 19, 9: with each head on its own range there was no colour bar and no word of the ranges."""
    at = show(started(), "Heads")
    at.radio(key="heads_scale").set_value("per head").run()
    ok(at)
    fig = spec(at, "fig_heads")
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    heats = [t for t in fig["data"] if t["type"] == "heatmap"]
    assert len(titles) == len(heats) == HEADS
    for title, trace in zip(titles, heats, strict=True):
        z = plotly_array(trace["z"])
        lo, hi = (float(v) for v in re.search(r"· (\S+)–(\S+)$", title).groups())
        assert lo == pytest.approx(np.nanmin(z), rel=0.05, abs=1e-12) and hi == pytest.approx(np.nanmax(z), rel=0.05)
    assert "each head's title gives its range" in view_text(at)


def test_two_image_views_name_each_image_and_say_what_the_match_means(calls):
    """Issue 19, 10: two unlabelled figures side by side; a match caption ("N of its patches are at least half as
    similar") that said little in late layers."""
    at = started()
    name = "my *second*.jpg"
    at.file_uploader(key="upload2").set_value((name, jpeg_bytes((120, 80)), "image/jpeg")).run()
    for view, keys in (("Patch features", ("fig_pca_0", "fig_pca_1")),
                       ("Feature similarity", ("fig_similarity", "fig_similarity_2"))):
        ok(show(at, view))
        assert {el.key for el in at.get("plotly_chart")} >= set(keys)
        text = read(view_text(at))
        assert "**Your image** (cat.jpg)" in text and f"**Second image**: {name}" in text, view
    caption = captions(at)
    assert "Best match in the second image" in caption and "typical patch of the second image" in caption
    assert "half as similar" not in caption


@pytest.mark.parametrize("left_out", [[], [3, 17]])
def test_leaving_out_artefacts_says_how_many_and_which(calls, monkeypatch, left_out):
    """Issue 19, 11: "Without artefacts" changed the map by 4e-4 and said nothing. The view says how many tokens
    were left out (0 is an answer) and which; those patches get no rollout mass."""
    import vitviz.analysis.tokens

    def artefacts(norms, received=None, *, num_prefix_tokens, **kw):
        mask = np.zeros(norms.shape[-1], bool)
        mask[[num_prefix_tokens + i for i in left_out]] = True
        return mask

    monkeypatch.setattr(vitviz.analysis.tokens, "artefact_tokens", artefacts)
    at = show(started(), "Attention rollout")
    at.checkbox(key="drop_artefacts").check().run()
    ok(at)
    text = view_text(at)
    if left_out:
        assert "2 artefact tokens left out (patches 3, 17)" in text
        z = plotly_array(heat_trace(at, "fig_rollout")["z"]).ravel()
        assert z[left_out].tolist() == [0.0, 0.0] and (np.delete(z, left_out) > 0).all()
    else:
        assert "0 artefact tokens left out (none found in this image" in text


def test_captions_are_short_and_the_long_words_one_click_away(calls):
    """Issue 19, 21: a five-line caption on every rollout view, a subtitle that named three of eleven views, "1
    prefix (1 CLS)". The rollout's caption is short, its long explanation in an expander; the subtitle names the
    sections; the token count is in plain words."""
    at = started()
    subtitle = at.main.markdown[0].value
    assert all(section in subtitle for section in SECTIONS)
    assert "prefix" not in status(at) and "1 CLS token" in status(at)
    show(at, "Attention rollout")
    caption = [m.value for m in at.tabs[0].markdown if "Attention of the CLS token" in m.value]
    assert len(caption) == 1 and len(caption[0]) < 250
    (about,) = [e for e in at.tabs[0].expander]
    assert "Attention is not explanation" in "\n".join(m.value for m in about.markdown)
    show(at, "Token norms")
    assert "robust SDs" not in at.tabs[0].markdown[0].value  # the rule is in its expander
    assert any("robust SDs" in m.value for e in at.tabs[0].expander for m in e.markdown)


def test_a_backbone_says_why_it_makes_no_predictions(calls, tmp_path, monkeypatch):
    """Issue 19, 22: the default model makes no predictions and the page never said why. One sentence, under the
    status line, says it is a backbone without a classifier head and what to do; a classifier does not get it."""
    torch.manual_seed(0)
    classifier = timm.create_model(ARCH, pretrained=False, num_classes=10, img_size=64)
    torch.save(classifier.state_dict(), tmp_path / "classifier.pth")
    monkeypatch.setenv("VITVIZ_CHECKPOINT_DIR", str(tmp_path))
    at = started()
    note = [c.value for c in at.main.caption if "No class predictions" in c.value]
    assert len(note) == 1
    assert "backbone without a classifier head" in note[0] and "classifier checkpoint" in note[0]
    assert "deit_small_patch16_224" in read(note[0]) and "linear probe" in note[0]
    at.selectbox(key="model").set_value("dir:classifier.pth").run()
    ok(at)
    assert "classifier.pth" in status(at)
    assert not [c.value for c in at.main.caption if "No class predictions" in c.value]


def test_the_checkpoint_uploader_takes_a_vit_b_file_and_images_keep_their_own_limit(calls):
    """Issue 19 item 19: the server takes 400 MB uploads (an fp32 ViT-B checkpoint is 350 MB) and says so under the
    checkpoint uploader; an image over its own 50 MB limit is still refused by name before it is decoded."""
    from vitviz.app.config import SERVER_OPTIONS
    from vitviz.inputs.image import MAX_UPLOAD_BYTES

    assert SERVER_OPTIONS["server.maxUploadSize"] == 400 and MAX_UPLOAD_BYTES == 50 * 10**6
    at = started()
    big = b"\xff\xd8" + b"\x00" * MAX_UPLOAD_BYTES
    at.file_uploader(key="upload").set_value(("big.jpg", big, "image/jpeg")).run()
    assert not at.exception and "'big.jpg' is" in err(at) and "the limit is" in err(at)
    at.selectbox(key="model").set_value("upload").run()
    assert any("Up to 400 MB a file" in c.value for c in at.sidebar.caption)
