"""Attention distance: how far, in pixels, each head looks, against depth (ViT paper, Fig. 7 right)."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..widgets import chart

TITLE = "Attention distance"


def render(ctx) -> None:
    st.markdown("Mean distance, in input pixels, between each patch and the patches it attends to (ViT paper, "
                "Fig. 7), one dot per head and layer: a head with a small distance attends to nearby patches, one "
                "with a large distance attends across the image.")
    chart(vf.attention_distance_figure(cache.distances(ctx.key, ctx.res)), "fig_distance", stem=ctx.stem,
          clickable=False)
