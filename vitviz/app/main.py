"""The page: sidebar groups top to bottom, one cached pass, then the open section's controls and its open tab.

The views are grouped in sections (``views.SECTIONS``): a section control, then the open section's own controls (one
layer control per section) and its views as tabs. Only the open tab is built; every section reads the same cached
pass, so moving between sections or tabs never runs the model again.

Run with ``streamlit run app.py`` from a checkout or ``vitviz app`` from an installed package.

Environment:
    VITVIZ_CHECKPOINT_DIR  a folder of checkpoint files offered as models (operator-provided, never a user path)
    VITVIZ_APP_MODEL       replaces the embedded default model (a checkpoint path or timm name; used by the tests)
    VITVIZ_APP_ARCH        its timm architecture, where the checkpoint does not name it
"""

from __future__ import annotations

import dataclasses
import functools
import re

import streamlit as st

from vitviz import figures as vf
from vitviz.export import export_arrays, npz_bytes
from vitviz.models import ModelKey
from vitviz.models.labels import has_classes, is_projection_head
from vitviz.settings import DEFAULTS

from . import cache
from .context import ViewContext
from .controls import attention_ui, token_layer_ui
from .jobs import share_cores
from .sidebar import (
    DisplayChoice,
    ImageChoice,
    InputChoice,
    ModelChoice,
    display_ui,
    image_ui,
    input_ui,
    model_ui,
    second_image_ui,
)
from .state import TABS_PREFIX, init_state, keep, keep_query
from .views import ATTENTION, SECTIONS, TOKENS
from .views.patch_grid import token_text
from .widgets import file_stem, guarded, md_escape

__all__ = ["main"]


def _weights(choice: ModelChoice) -> cache.Weights:
    """(ModelSource, state dict) of the chosen model: cached, shared by every session."""
    with guarded("loading the model"):
        if choice.upload is not None:
            return cache.uploaded_source(choice.name, choice.arch, choice.filename, choice.upload)
        return cache.model_source(choice.name, choice.arch)


def _analysis(choice: ModelChoice, inputs: InputChoice, image: ImageChoice, weights: cache.Weights):
    """The one cached pass over the image, and its key."""
    from vitviz.analysis.onepass import input_size_for

    with guarded("the forward pass"):
        decoded = cache.image(image.digest, image.data, image.name)
        size = input_size_for(decoded.image, img_size=inputs.img_size, patch_size=inputs.patch_size, fit=inputs.fit)
        model_key = ModelKey(choice.name, choice.arch, inputs.patch_size, size, inputs.device, inputs.precision)
        key = cache.AnalysisKey(model_key, image.digest, inputs.fit)
        res, notice = cache.analysis(key, decoded, weights)
    if notice:  # the GPU was full (other sessions, a big grid): this analysis ran on the CPU
        st.warning(md_escape(notice))
    return res, key, decoded


def _second(key: cache.AnalysisKey, image: ImageChoice | None):
    """The second image's key (the same model, fitted the same way: centre crop keeps its grid equal) and decoding."""
    if image is None:
        return None, None
    with guarded("reading the second image"):
        decoded = cache.image(image.digest, image.data, image.name)
    return cache.AnalysisKey(key.model, image.digest, "crop"), decoded


PROJECTION = ("**No class predictions:** this is the image tower of an image-text model (CLIP, SigLIP): its head "
              "projects the image into the space of text embeddings and scores no classes. Explain explains that "
              "embedding, a patch's feature, or (an open_clip model loaded as `clip:NAME/TAG`) a text prompt.")
NO_HEAD = ("**No class predictions:** this model is a backbone without a classifier head: it returns an embedding "
           "of the image, not classes, so Explain explains that embedding or a patch's feature. To get one here: "
           "fit a linear probe on its embedding with your own labelled images, or train a tiny ViT from scratch "
           "(both on the **Train & probe** page of the Experiments section), or choose a classifier in the sidebar "
           "(a Hub model such as `deit_small_patch16_224`, or a classifier checkpoint file).")


def _status(res, inputs: InputChoice, key: cache.AnalysisKey, weights: cache.Weights) -> None:
    info = res.info
    st.sidebar.caption(f"Model input: **{info.img_size[1]} x {info.img_size[0]} px** = {info.grid[1]} x "
                       f"{info.grid[0]} patches of {inputs.patch_size} px.")
    notes = f" · notes: {md_escape('; '.join(res.notes))}" if res.notes else ""
    st.caption(f"**{md_escape(info.name)}** ({md_escape(info.arch)}) · {res.device}, {res.dtype} · "
               f"grid {info.grid[0]}x{info.grid[1]} · {token_text(info)} · forward pass {res.seconds * 1000:.0f} ms · "
               f"{res.fit_description}{notes}")
    built, _info = cache.model(key.model, weights)  # the model the pass ran on (cached): its head or none
    if not has_classes(built):  # the one place the app says why there are no predictions
        st.caption(PROJECTION if is_projection_head(built) else NO_HEAD)


def _download_npz(ctx: ViewContext, fit: str) -> bytes:
    a, info = ctx.attention, ctx.info
    settings = {**dataclasses.asdict(DEFAULTS), "model": info.name, "arch": info.arch, "patch_size": info.patch_size,
                "img_size": list(info.img_size), "fit": fit, "start_layer": a.start, "end_layer": a.end,
                "view": a.view, "head": a.head_choice, "head_fusion": a.fusion, "discard_ratio": a.discard,
                "device": ctx.res.device}
    return npz_bytes(export_arrays(ctx.res, ctx.cls_map(), settings=settings))


def _download_png(ctx: ViewContext) -> bytes:
    """The Attention section's map on the part of the original image the model saw, at the original's resolution."""
    d = ctx.display
    return vf.overlay_original_png(ctx.image.image, ctx.res.box, ctx.cls_map(), opacity=d.opacity,
                                   colorscale=d.colorscale)


def _downloads(ctx: ViewContext, fit: str) -> None:
    """The Attention section's map as a PNG and as arrays, named after the image; computed only when clicked."""
    sb = st.sidebar
    sb.header("Downloads")
    raw = "raw CLS attention" if ctx.info.readout == "cls" else "raw readout attention"  # a CLS-less model's pooling
    what = "rollout" if ctx.attention.view == "rollout" else raw
    sb.caption(f"The map the Attention section's settings select (now the {what}), on the part of your image the "
               "model saw, at its original resolution; the arrays as `.npz`.")
    c1, c2 = sb.columns(2)
    c1.download_button("Overlay PNG", data=functools.partial(_download_png, ctx), file_name=f"{ctx.stem}-overlay.png",
                       mime="image/png", key="dl_png", on_click="ignore")
    c2.download_button("Arrays (.npz)", data=functools.partial(_download_npz, ctx, fit), file_name=f"{ctx.stem}.npz",
                       mime="application/octet-stream", key="dl_npz", on_click="ignore")


def _tab_key(section: str) -> str:
    """The session key of a section's open tab: "tab_input", "tab_tokens_features"."""
    return TABS_PREFIX + "_".join(re.findall(r"[a-z0-9]+", section.lower()))


def _navigation(info) -> tuple[str, int]:
    """The section control and the query patch, side by side: (open section, query patch)."""
    keep("section", lambda v: v in SECTIONS, next(iter(SECTIONS)))
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    section = left.segmented_control("Section", list(SECTIONS), key="section", required=True,
                                     help="The views in five groups; the open group's views are its tabs. Every "
                                          "view reads the same forward pass.")
    query = right.number_input("Query patch (or click a patch)", 0, info.num_patches - 1, key="query_patch",
                               help="Row-major patch index, as timm flattens the grid.")
    return section, int(query)


def _views(ctx: ViewContext, section: str) -> None:
    """The open section's views, one tab each; only the open one is built (on_change="rerun" tells the app which).
    A section of one view has no tabs."""
    views = SECTIONS[section]
    if len(views) == 1:
        with guarded(f"the {views[0].TITLE} view"):
            views[0].render(ctx)
        return
    tabs = st.tabs([view.TITLE for view in views], key=_tab_key(section), on_change="rerun")
    for tab, view in zip(tabs, views, strict=True):
        if tab.open:
            with tab, guarded(f"the {view.TITLE} view"):
                view.render(ctx)


def _context(res, key, weights, image: ImageChoice, decoded, second: ImageChoice | None,
             display: DisplayChoice) -> tuple[ViewContext, str]:
    """The open section's controls (every section's choices read, only the open one's drawn) and the context."""
    section, query = _navigation(res.info)
    attention = attention_ui(res.info, shown=section == ATTENTION)
    token_layer = token_layer_ui(res.info.depth, shown=section == TOKENS)
    second_key, second_image = _second(key, second)
    ctx = ViewContext(res=res, key=key, weights=weights, attention=attention, display=display,
                      token_layer=token_layer, query=query, image=decoded, stem=file_stem(image.name),
                      second_key=second_key, second_image=second_image)
    return ctx, section


def main() -> None:
    st.set_page_config(page_title="vitviz", page_icon=":eye:", layout="wide")
    st.title("vitviz")
    st.write("How a Vision Transformer reads an image: what it is given (**Input**: the patches, their positions), "
             "where its attention goes (**Attention**), what its answer depends on (**Explain**), what its tokens "
             "hold (**Tokens & features**), and what changes when you change the model (**Experiments**: remove its "
             "positions, knock out heads, train or probe your own).")
    init_state()
    share_cores()  # torch threads for this process, once, before the page's own pass (not at the first job)
    image = image_ui()  # first, so a model that fails to load never drops the upload
    second = second_image_ui()
    choice = model_ui()
    weights = _weights(choice)
    inputs = input_ui(weights[0], (choice.name, choice.arch))
    display = display_ui()
    if image is None:
        st.info("Upload an image or choose an example in the sidebar to begin.")
        st.stop()
    res, key, decoded = _analysis(choice, inputs, image, weights)
    _status(res, inputs, key, weights)
    st.session_state["_geometry"] = dict(grid=res.info.grid, patch_size=res.info.patch_size)
    keep_query(res.info.grid)
    ctx, section = _context(res, key, weights, image, decoded, second, display)
    _downloads(ctx, inputs.fit)
    _views(ctx, section)
