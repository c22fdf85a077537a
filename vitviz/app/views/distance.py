"""Attention distance: how far, in pixels, each head looks, against depth (ViT paper, Fig. 7 right)."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from .. import cache
from ..widgets import chart

TITLE = "Attention distance"


def render(ctx) -> None:
    st.markdown("Mean distance, in input pixels, between each patch and the patches it attends to (ViT paper, "
                "Fig. 7): low heads look locally, high heads globally.")
    chart(vf.attention_distance_figure(cache.distances(ctx.key, ctx.res)), "fig_distance", clickable=False)
