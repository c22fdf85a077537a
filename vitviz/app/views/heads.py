"""Heads: each head's attention in one layer, from the CLS token or from the query patch, as small multiples."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..state import keep
from ..widgets import chart

TITLE = "Heads"
SCALES = {"shared": "one colour range for all heads (compare heads)",
          "per head": "each head its own range (shapes, not strength)"}


def head_grid(ctx, maps, key: str) -> None:
    """The small multiples of ``maps`` (H, gh, gw) on the colour range the user picked, with a colour bar."""
    a = ctx.attention
    shared = st.session_state.get("heads_scale", "shared") == "shared"
    chart(vf.head_grid_figure(maps, patch_size=ctx.info.patch_size, pixels=ctx.res.pixels, colorscale=a.colorscale,
                              opacity=a.opacity, shared_scale=shared, colorbar_title="attention"), key, toolbar=False)


def render(ctx) -> None:
    info, a = ctx.info, ctx.attention
    keep("heads_layer", lambda v: isinstance(v, int) and 0 <= v < info.depth, a.end)
    left, mid, right = st.columns(3)
    layer = left.selectbox("Layer", list(range(info.depth)), key="heads_layer")
    source = mid.radio("Attention of", ["CLS token", "query patch"], key="heads_source", horizontal=True)
    right.radio("Colour range", list(SCALES), key="heads_scale", horizontal=True, format_func=SCALES.get)
    query = None if source == "CLS token" else ctx.query
    maps = cache.query_maps(ctx.key, query, ctx.res)[layer]
    who = "the CLS token" if query is None else f"patch {query}"
    scale = SCALES[st.session_state["heads_scale"]]
    st.markdown(f"Layer {layer}: where {who} attends, each of the {info.num_heads} heads; brighter = more attention, "
                f"{scale}.")
    head_grid(ctx, maps, "fig_heads")
