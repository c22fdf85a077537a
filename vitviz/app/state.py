"""Session state: every widget key, its initial value, and the rules that keep a value valid.

Streamlit drops the state of a widget that a run does not draw (the architecture box while a hub model is chosen);
re-assigning the persistent keys at the top of every run keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import streamlit as st

from vitviz.settings import DEFAULTS

__all__ = ["ALL_HEADS", "COLORSCALES", "COLORSCALE_LABELS", "TABS_PREFIX", "app_model", "init_state", "keep",
           "keep_query"]

ALL_HEADS = "all heads (fused)"
# plotly names of the offered colour scales: each grows brighter with the value all the way, as every caption says
# ("brighter = more"). Plotly's Greys runs white -> black, so the reversed one is offered, under its plain name; the
# rainbows (Turbo, Jet) are brightest in the middle and as dark at the top as at the bottom, so they are not offered
COLORSCALES = ("Inferno", "Viridis", "Magma", "Plasma", "Greys_r")
COLORSCALE_LABELS = {"Greys_r": "Greys"}

PERSISTENT = ("example", "model", "arch", "patch_size", "img_size", "fit", "device", "precision", "layers", "view",
              "head", "head_fusion", "discard_ratio", "opacity", "colorscale", "query_patch", "heads_source",
              "hub_name", "heads_scale", "raw_layer", "drop_artefacts", "tokens_layer", "pca_foreground",
              "explain_target", "explain_method", "explain_prompt", "explain_classes", "explain_curves_by",
              "section")
TABS_PREFIX = "tab_"  # each section's open tab, under "tab_<section>": kept too, so a section reopens where it was
INITIAL: dict[str, Any] = dict(
    model="default", device="auto", precision="auto", img_size=DEFAULTS.img_size,
    fit=DEFAULTS.fit, view="rollout", head=ALL_HEADS, head_fusion=DEFAULTS.head_fusion,
    discard_ratio=DEFAULTS.discard_ratio, opacity=0.6, colorscale="Inferno", heads_source="CLS token",
    heads_scale="shared", drop_artefacts=False,
)


def app_model() -> tuple[str, str | None]:
    """The app's default model and its architecture: the embedded DINOv2 unless the operator (or a test) sets
    VITVIZ_APP_MODEL / VITVIZ_APP_ARCH. Read on every run, so a changed environment takes effect."""
    return os.environ.get("VITVIZ_APP_MODEL", "default"), os.environ.get("VITVIZ_APP_ARCH") or None


def init_state() -> None:
    """Initial values once per session; persistent widget values carried over runs that do not draw them."""
    for key in [*PERSISTENT, *(k for k in st.session_state if str(k).startswith(TABS_PREFIX))]:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    for key, value in {**INITIAL, "arch": app_model()[1] or ""}.items():
        st.session_state.setdefault(key, value)


def keep(key: str, ok: Callable[[Any], bool], default: Any) -> None:
    """Reset a widget's value to ``default`` when it no longer fits the current model or image."""
    if key not in st.session_state or not ok(st.session_state[key]):
        st.session_state[key] = default


def keep_query(grid: tuple[int, int]) -> None:
    """The query patch stays at the same place in the image when the grid changes (patch or image size), else the
    centre patch is the query."""
    gh, gw = grid
    old = st.session_state.get("_query_grid")
    q = st.session_state.get("query_patch")
    if old is not None and tuple(old) != (gh, gw) and isinstance(q, int) and 0 <= q < old[0] * old[1]:
        r, c = divmod(q, old[1])
        st.session_state["query_patch"] = int((r + 0.5) * gh / old[0]) * gw + int((c + 0.5) * gw / old[1])
    st.session_state["_query_grid"] = (gh, gw)
    keep("query_patch", lambda v: isinstance(v, int) and 0 <= v < gh * gw, (gh // 2) * gw + gw // 2)
