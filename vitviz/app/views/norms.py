"""Token norms: how long each token is after a layer; high-norm artefact tokens (Darcet et al. 2023) outlined."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..widgets import chart
from ._tokens import token_name

TITLE = "Token norms"
RULE = ("a wide empty range (≥ 2.5 robust SDs) in the top log-norms of this layer's "
        "patches, the lowest outlier ≥ 3.5 robust SDs above the median")


def render(ctx) -> None:
    info, d, layer = ctx.info, ctx.display, ctx.token_layer
    stats = cache.token_stats(ctx.key, ctx.res)
    p = info.num_prefix_tokens
    norms, flags = stats.norms[layer], stats.norm_outliers[layer]
    marked = np.flatnonzero(flags[p:])
    st.markdown(f"The length (L2 norm) of every patch token after layer {layer}; brighter = longer. Outlined: "
                f"{len(marked)} outliers, far longer than the other patches (such tokens hold global information "
                "instead of their patch's content).")
    with st.expander("How outliers are found"):
        st.markdown(f"By the data's own gap: {RULE}.")
    left, right = st.columns(2)
    with left:
        chart(vf.overlay_figure(ctx.res.pixels, norms[p:].reshape(info.grid), patch_size=info.patch_size,
                                opacity=d.opacity, colorscale=d.colorscale, highlight=ctx.query, outlined=marked,
                                colorbar_title="token norm", hover="norm"), "fig_norms", stem=ctx.stem)
    with right:
        prefix = {token_name(info, t): float(norms[t]) for t in range(p)}
        chart(vf.histogram_figure(norms[p:], marked=flags[p:], x_title="token norm", extra=prefix),
              "fig_norm_hist", stem=ctx.stem, clickable=False)
    rows = [f"{token_name(info, t)}: {norms[t]:.1f}" for t in range(p)]
    st.caption("Prefix tokens (shown apart, never counted as outliers): " + "; ".join(rows))
