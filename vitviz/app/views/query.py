"""Query patch: where one patch attends, mean over heads layer by layer, and per head in one layer."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..state import keep
from ..widgets import chart

TITLE = "Query patch"


def render(ctx) -> None:
    info, a = ctx.info, ctx.attention
    qmaps = cache.query_maps(ctx.key, ctx.query, ctx.res)
    keep("query_layer", lambda v: isinstance(v, int) and 0 <= v < info.depth, a.end)
    r, c = divmod(ctx.query, info.grid[1])
    st.markdown(f"Patch {ctx.query} (row {r}, col {c}): its attention, mean over heads, layer by layer.")
    chart(vf.layer_scrub_figure(ctx.res.pixels, qmaps.mean(axis=1), patch_size=info.patch_size,
                                labels=[f"layer {b}" for b in range(info.depth)], active=a.end, opacity=a.opacity,
                                colorscale=a.colorscale), "fig_query")
    layer = st.selectbox("Layer for the heads", list(range(info.depth)), key="query_layer")
    chart(vf.head_grid_figure(qmaps[layer], patch_size=info.patch_size, pixels=ctx.res.pixels,
                              colorscale=a.colorscale, opacity=a.opacity), "fig_query_heads")
