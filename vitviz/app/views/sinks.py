"""Attention sinks: how much attention each token receives in a layer, and the tokens that collect the most."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz import figures as vf
from vitviz.analysis.tokens import top_receivers
from vitviz.models.pretrained import DEFAULT_MODEL_NAME

from .. import cache
from ..widgets import chart
from ._tokens import token_name

TITLE = "Attention sinks"
SPIKES = ("In the first layer the CLS token, and most other tokens, send about a fifth of their attention to one or "
          "two ordinary patches: whichever best match a query that is the same for every image (the CLS token has "
          "seen nothing yet). They are not artefacts (their norms are typical), but a rollout that includes layer 0 "
          "carries them through every later layer, which is why the rollout starts at layer 1 by default "
          "(as measured on 91 photos).")


def render(ctx) -> None:
    info, d, layer = ctx.info, ctx.display, ctx.token_layer
    stats = cache.token_stats(ctx.key, ctx.res)
    p = info.num_prefix_tokens
    received = stats.received[layer]
    marked = np.flatnonzero(stats.sink_outliers[layer][p:])
    st.markdown(f"The attention every patch receives in layer {layer}, averaged over all heads and all queries "
                f"(1/{info.num_tokens} each if attention were uniform); brighter = more. Outlined: {len(marked)} "
                f"sinks, by the same rule as the token norms.")
    if info.name == DEFAULT_MODEL_NAME:
        with st.expander("Layer 0's spikes, and why the rollout starts at layer 1"):
            st.markdown(SPIKES)
    chart(vf.overlay_figure(ctx.res.pixels, received[p:].reshape(info.grid), patch_size=info.patch_size,
                            opacity=d.opacity, colorscale=d.colorscale, highlight=ctx.query, outlined=marked,
                            colorbar_title="attention received", hover="received"), "fig_sinks", stem=ctx.stem)
    idx, vals = top_receivers(received, k=min(5, info.num_tokens), num_prefix_tokens=p)
    uniform = 1 / info.num_tokens
    st.caption("Top receivers: " + "; ".join(f"{token_name(info, int(t))} {v:.3f} ({v / uniform:.0f}× uniform)"
                                             for t, v in zip(idx, vals, strict=True)))
