"""Feature similarity: the query patch's token against every patch of a layer, and its best match in a second image."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz import figures as vf
from vitviz.analysis import tokens as vt

from ..widgets import chart
from ._tokens import image_titles

TITLE = "Feature similarity"


def render(ctx) -> None:
    info, d, layer = ctx.info, ctx.display, ctx.token_layer
    p = info.num_prefix_tokens
    patches = ctx.res.tokens[layer, p:]
    query = patches[ctx.query][None]  # (1, D)
    sim = vt.cosine_similarity(query, patches)[0].reshape(info.grid)
    r, c = divmod(ctx.query, info.grid[1])
    st.markdown(f"Layer {layer}: cosine similarity of patch {ctx.query} (row {r}, col {c}) to every patch; brighter "
                "= more alike to the model. Click a patch to make it the query.")
    second = ctx.second()
    cols = st.columns(2 if second is not None else 1)
    with cols[0]:
        if second is not None:
            st.markdown(image_titles(ctx)[0])
        chart(vf.overlay_figure(ctx.res.pixels, sim, patch_size=info.patch_size, opacity=d.opacity,
                                colorscale=d.colorscale, highlight=ctx.query, zmin=-1, zmax=1,
                                colorbar_title="cosine similarity", hover="cosine"), "fig_similarity", stem=ctx.stem)
    if second is None:
        st.caption("Add a second image in the sidebar to find where this patch's best match lies in it.")
        return
    other = second.tokens[layer, second.info.num_prefix_tokens:]
    idx, best = vt.best_matches(query, other, k=1)
    match = int(idx[0, 0])
    sim2 = vt.cosine_similarity(query, other)[0].reshape(second.info.grid)
    mr, mc = divmod(match, second.info.grid[1])
    with cols[1]:
        st.markdown(image_titles(ctx)[1])
        chart(vf.overlay_figure(second.pixels, sim2, patch_size=second.info.patch_size, opacity=d.opacity,
                                colorscale=d.colorscale, highlight=match, zmin=-1, zmax=1,
                                colorbar_title="cosine similarity", hover="cosine"), "fig_similarity_2",
              stem=ctx.stem, clickable=False)
    st.caption(match_text(float(best[0, 0]), (match, mr, mc), sim, sim2, ctx.query))


def match_text(best: float, where: tuple[int, int, int], own: np.ndarray, other: np.ndarray, query: int) -> str:
    """The best match and two numbers to judge it by: a typical patch of the second image (the median cosine) and
    the query's closest other patch in its own image. (A share of "half as similar" patches said nothing in late
    layers, where most cosines are high.)"""
    match, r, c = where
    others = np.delete(own.ravel(), query)
    closest = f"; the closest other patch of your image, {float(others.max()):.2f}" if others.size else ""
    return (f"Best match in the second image: patch {match} (row {r}, col {c}), cosine {best:.2f}. For scale: a "
            f"typical patch of the second image scores {float(np.median(other)):.2f} (the median){closest}. A best "
            "match far above the typical patch is a distinct correspondence; one close to it is not.")
