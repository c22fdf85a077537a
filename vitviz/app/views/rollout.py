"""Attention rollout: the CLS token's attention through the layers (Abnar & Zuidema 2020), or each layer raw."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from ..state import ALL_HEADS
from ..widgets import chart

TITLE = "Attention rollout"
LAYERS_NOTE = ("The layers above set this sentence, the downloads and the other views of this section; the slider "
               "under the figure previews the other end layers in your browser only.")


def describe(ctx) -> str:
    """What the map shows, in one sentence."""
    a = ctx.attention
    what = f"rollout over layers {a.start}-{a.end}" if a.view == "rollout" else f"raw attention of layer {a.end}"
    heads = f"all heads ({a.fusion})" if a.head_choice == ALL_HEADS else f"head {a.head}"
    discard = f", discard {a.discard:.2f}" if a.discard and a.view == "rollout" else ""
    artefacts = ", artefact tokens left out" if a.drop_artefacts and a.view == "rollout" else ""
    return f"Attention of the CLS token: {what}, {heads}{discard}{artefacts}."


def render(ctx) -> None:
    a, d, info = ctx.attention, ctx.display, ctx.info
    maps, labels, active = ctx.cls_maps()
    st.markdown(f"{describe(ctx)} Brighter patches get more of the CLS token's attention; each layer's map is "
                f"coloured from its own lowest to its highest value. {LAYERS_NOTE} Attention is not explanation: "
                "the Explain section shows what the answer depends on and measures how faithful each map is. By that "
                "test (removing the patches a map ranks first) no rollout is the most faithful view on the photos "
                "we measured: the Explain section's default, greedy token deletion, is.")
    unit = "share of CLS attention" if a.view == "rollout" else "CLS attention"
    chart(vf.layer_scrub_figure(ctx.res.pixels, maps, patch_size=info.patch_size, labels=labels, active=active,
                                opacity=d.opacity, colorscale=d.colorscale, colorbar_title=unit), "fig_rollout",
          stem=ctx.stem)
