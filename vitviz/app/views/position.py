"""Position embeddings: cosine similarity of the learned patch position embeddings (ViT paper, Fig. 7 centre)."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from ..widgets import chart

TITLE = "Position embeddings"


def render(ctx) -> None:
    info, res = ctx.info, ctx.res
    if res.pos_sim is None:  # RoPE (DINOv3, EVA-02's rotary part) or BEiT's relative bias: nothing learned to compare
        st.info(res.pos_note or "This model has no learned position embedding to compare.")
        return
    st.markdown("Cosine similarity of the learned position embeddings. Nearby patches should look alike: the model "
                "learned the 2-D layout. Click a tile (or set the query patch) to see that patch's map.")
    left, right = st.columns(2)
    with left:
        if info.num_patches <= vf.MOSAIC_MAX_TOKENS:
            chart(vf.similarity_mosaic_figure(res.pos_sim, grid=info.grid, highlight=ctx.query), "fig_mosaic",
                  stem=ctx.stem, mosaic=True)
        else:
            st.info(f"The mosaic of {info.num_patches} patches is too large to draw (at most "
                    f"{vf.MOSAIC_MAX_TOKENS}); pick patches one at a time.")
    with right:
        chart(vf.similarity_map_figure(res.pos_sim, grid=info.grid, index=ctx.query, patch_size=info.patch_size,
                                       pixels=res.pixels, colorscale="Viridis", opacity=ctx.display.opacity),
              "fig_simmap", stem=ctx.stem)
