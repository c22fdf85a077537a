"""Heads: each head's attention in one layer, from the readout (the CLS token, or the tokens a CLS-less model's
head pools) or from the query patch, as small multiples."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf
from vitviz.analysis.readout import readout_name

from .. import cache
from ..widgets import chart

TITLE = "Heads"
SCALES = {"shared": "one colour range for all heads (compare heads)",
          "per head": "each head its own range (shapes, not strength)"}
RANGES = {"per head": "; each head's title gives its range, darkest to brightest"}  # no colour bar can say it


def head_grid(ctx, maps, key: str) -> None:
    """The small multiples of ``maps`` (H, gh, gw) on the colour range the user picked: one shared range with a
    colour bar, or each head's own, stated in its title."""
    d = ctx.display
    shared = st.session_state.get("heads_scale", "shared") == "shared"
    chart(vf.head_grid_figure(maps, patch_size=ctx.info.patch_size, pixels=ctx.res.pixels, colorscale=d.colorscale,
                              opacity=d.opacity, shared_scale=shared, colorbar_title="attention"), key,
          stem=ctx.stem, toolbar=False)


def render(ctx) -> None:
    info, layer = ctx.info, ctx.attention.end  # the section's layer control
    left, right = st.columns(2)
    readout = readout_name(info.readout, short=True).removeprefix("the ")  # the option's value stays "CLS token"
    source = left.radio("Attention of", ["CLS token", "query patch"], key="heads_source", horizontal=True,
                        format_func=lambda o: readout if o == "CLS token" else o)
    right.radio("Colour range", list(SCALES), key="heads_scale", horizontal=True, format_func=SCALES.get)
    query = None if source == "CLS token" else ctx.query
    maps = cache.query_maps(ctx.key, query, ctx.res)[layer]
    who = readout_name(info.readout) if query is None else f"patch {query}"
    scale = SCALES[st.session_state["heads_scale"]] + RANGES.get(st.session_state["heads_scale"], "")
    st.markdown(f"Layer {layer} (the end layer above): where {who} attends, each of the {info.num_heads} heads; "
                f"brighter = more attention, {scale}.")
    head_grid(ctx, maps, "fig_heads")
