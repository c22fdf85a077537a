"""The page: sidebar groups top to bottom, one cached pass, then the open tab's view.

Run with ``streamlit run app.py`` from a checkout or ``vitviz app`` from an installed package.

Environment:
    VITVIZ_CHECKPOINT_DIR  a folder of checkpoint files offered as models (operator-provided, never a user path)
    VITVIZ_APP_MODEL       replaces the embedded default model (a checkpoint path or timm name; used by the tests)
    VITVIZ_APP_ARCH        its timm architecture, where the checkpoint does not name it
"""

from __future__ import annotations

import dataclasses
import functools

import streamlit as st

from vitviz import figures as vf
from vitviz.export import export_arrays, npz_bytes
from vitviz.models import ModelKey
from vitviz.settings import DEFAULTS

from . import cache
from .context import ViewContext
from .sidebar import (
    ImageChoice,
    InputChoice,
    ModelChoice,
    attention_ui,
    image_ui,
    input_ui,
    model_ui,
    second_image_ui,
)
from .state import init_state, keep_query
from .views import VIEWS
from .views.patch_grid import token_text
from .widgets import fail, md_escape

__all__ = ["main"]


def _weights(choice: ModelChoice):
    """(ModelSource, state dict) of the chosen model: cached, shared by every session."""
    try:
        if choice.upload is not None:
            return cache.uploaded_source(choice.name, choice.arch, choice.filename, choice.upload)
        return cache.model_source(choice.name, choice.arch)
    except ValueError as exc:
        fail(exc)


def _analysis(choice: ModelChoice, inputs: InputChoice, image: ImageChoice, loaded):
    """The one cached pass over the image, and its key."""
    from vitviz.analysis.onepass import input_size_for

    try:
        decoded = cache.image(image.digest, image.data, image.name)
        size = input_size_for(decoded.image, img_size=inputs.img_size, patch_size=inputs.patch_size, fit=inputs.fit)
        model_key = ModelKey(choice.name, choice.arch, inputs.patch_size, size, inputs.device, inputs.precision)
        key = cache.AnalysisKey(model_key, image.digest, inputs.fit)
        res, notice = cache.analysis(key, decoded, loaded)
    except ValueError as exc:
        fail(exc)
    if notice:  # the GPU was full (other sessions, a big grid): this analysis ran on the CPU
        st.warning(md_escape(notice))
    return res, key, decoded


def _second(key: cache.AnalysisKey, image: ImageChoice | None):
    """The second image's key (the same model, fitted the same way: centre crop keeps its grid equal) and decoding."""
    if image is None:
        return None, None
    try:
        decoded = cache.image(image.digest, image.data, image.name)
    except ValueError as exc:
        fail(exc)
    return cache.AnalysisKey(key.model, image.digest, "crop"), decoded


def _status(res, inputs: InputChoice) -> None:
    info = res.info
    st.sidebar.caption(f"Model input: **{info.img_size[1]} x {info.img_size[0]} px** = {info.grid[1]} x "
                       f"{info.grid[0]} patches of {inputs.patch_size} px.")
    notes = f" · notes: {md_escape('; '.join(res.notes))}" if res.notes else ""
    st.caption(f"**{md_escape(info.name)}** ({md_escape(info.arch)}) · {res.device}, {res.dtype} · "
               f"grid {info.grid[0]}x{info.grid[1]} · {token_text(info)} · forward pass {res.seconds * 1000:.0f} ms · "
               f"{res.fit_description}{notes}")


def _download_npz(ctx: ViewContext, fit: str) -> bytes:
    a, info = ctx.attention, ctx.info
    settings = {**dataclasses.asdict(DEFAULTS), "model": info.name, "arch": info.arch, "patch_size": info.patch_size,
                "img_size": list(info.img_size), "fit": fit, "start_layer": a.start, "end_layer": a.end,
                "view": a.view, "head": a.head_choice, "head_fusion": a.fusion, "discard_ratio": a.discard,
                "device": ctx.res.device}
    return npz_bytes(export_arrays(ctx.res, ctx.cls_map(), settings=settings))


def _download_png(ctx: ViewContext) -> bytes:
    """The sidebar's map on the part of the original image the model saw, at the original's resolution."""
    a = ctx.attention
    return vf.overlay_original_png(ctx.image.image, ctx.res.box, ctx.cls_map(), opacity=a.opacity,
                                   colorscale=a.colorscale)


def _downloads(ctx: ViewContext, fit: str) -> None:
    """The sidebar view as a PNG and as arrays; computed only when clicked."""
    sb = st.sidebar
    sb.header("Downloads")
    sb.caption("The map the sidebar's layers and heads select, on the part of your image the model saw, at its "
               "original resolution; the arrays as `.npz`.")
    c1, c2 = sb.columns(2)
    c1.download_button("Overlay PNG", data=functools.partial(_download_png, ctx), file_name="overlay.png",
                       mime="image/png", key="dl_png", on_click="ignore")
    c2.download_button("Arrays (.npz)", data=functools.partial(_download_npz, ctx, fit), file_name="vitviz.npz",
                       mime="application/octet-stream", key="dl_npz", on_click="ignore")


def _views(ctx: ViewContext) -> None:
    """One tab per registered view; only the open one is built (on_change="rerun" tells the app which)."""
    tabs = st.tabs([view.TITLE for view in VIEWS], key="tab", on_change="rerun")
    for tab, view in zip(tabs, VIEWS, strict=True):
        with tab:
            if tab.open:
                try:
                    view.render(ctx)
                except ValueError as exc:
                    fail(exc)


def main() -> None:
    st.set_page_config(page_title="vitviz", page_icon=":eye:", layout="wide")
    st.title("vitviz")
    st.write("How a Vision Transformer reads an image: its patch grid, what its position embeddings learned, "
             "and where the CLS token's attention flows layer by layer.")
    init_state()
    image = image_ui()  # first, so a model that fails to load never drops the upload
    second = second_image_ui()
    choice = model_ui()
    loaded = _weights(choice)
    inputs = input_ui(loaded[0], (choice.name, choice.arch))
    if image is None:
        st.info("Upload an image or choose an example in the sidebar to begin.")
        st.stop()
    res, key, decoded = _analysis(choice, inputs, image, loaded)
    _status(res, inputs)
    attention = attention_ui(res.info)
    st.session_state["_geometry"] = dict(grid=res.info.grid, patch_size=res.info.patch_size)
    keep_query(res.info.grid)
    query = st.number_input("Query patch (or click a patch in a figure)", 0, res.info.num_patches - 1,
                            key="query_patch", help="Row-major patch index, as timm flattens the grid.")
    second_key, second_image = _second(key, second)
    ctx = ViewContext(res=res, key=key, attention=attention, query=int(query), image=decoded, loaded=loaded,
                      second_key=second_key, second_image=second_image)
    _downloads(ctx, inputs.fit)
    _views(ctx)
