"""Query patch: where one patch attends, mean over heads layer by layer, and per head in one layer."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..widgets import chart
from .heads import SCALES, head_grid

TITLE = "Query patch"


def render(ctx) -> None:
    info, d, layer = ctx.info, ctx.display, ctx.attention.end  # the section's layer control
    qmaps = cache.query_maps(ctx.key, ctx.query, ctx.res)
    r, c = divmod(ctx.query, info.grid[1])
    st.markdown(f"Patch {ctx.query} (row {r}, col {c}): its attention, mean over heads, layer by layer (the slider "
                "under the figure scrubs the layers in your browser); brighter = more attention.")
    chart(vf.layer_scrub_figure(ctx.res.pixels, qmaps.mean(axis=1), patch_size=info.patch_size,
                                labels=[f"layer {b}" for b in range(info.depth)], active=layer, opacity=d.opacity,
                                colorscale=d.colorscale, colorbar_title="attention", highlight=ctx.query),
          "fig_query", stem=ctx.stem)
    scale = SCALES[st.session_state.get("heads_scale", "shared")]
    st.markdown(f"Layer {layer} (the end layer above): patch {ctx.query}'s attention, each head ({scale}; set in the "
                "Heads view).")
    head_grid(ctx, qmaps[layer], "fig_query_heads")
