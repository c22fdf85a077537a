"""Heads: each head's attention in one layer, from the CLS token or from the query patch, as small multiples."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..state import keep
from ..widgets import chart

TITLE = "Heads"


def render(ctx) -> None:
    info, a = ctx.info, ctx.attention
    keep("heads_layer", lambda v: isinstance(v, int) and 0 <= v < info.depth, a.end)
    left, right = st.columns(2)
    layer = left.selectbox("Layer", list(range(info.depth)), key="heads_layer")
    source = right.radio("Attention of", ["CLS token", "query patch"], key="heads_source", horizontal=True)
    query = None if source == "CLS token" else ctx.query
    maps = cache.query_maps(ctx.key, query, ctx.res)[layer]
    who = "the CLS token" if query is None else f"patch {query}"
    st.markdown(f"Layer {layer}: where {who} attends, each of the {info.num_heads} heads.")
    chart(vf.head_grid_figure(maps, patch_size=info.patch_size, pixels=ctx.res.pixels, colorscale=a.colorscale,
                              opacity=a.opacity), "fig_heads")
