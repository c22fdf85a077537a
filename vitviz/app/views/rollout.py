"""Attention rollout: the readout's attention through the layers (Abnar & Zuidema 2020), or each layer raw. The
readout is the CLS token, or for a model without one the tokens its head pools (:mod:`vitviz.analysis.readout`)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz import figures as vf
from vitviz.analysis.readout import readout_name

from .. import cache
from ..state import ALL_HEADS
from ..widgets import chart, readout_note

TITLE = "Attention rollout"
# the long explanation, one click away (the caption above the figure stays two lines)
ABOUT = ("**Colours.** Brighter patches get more of the readout's attention (the CLS token's, or for a model "
         "without one that of the tokens its head pools); each layer's map is coloured from its "
         "own lowest to its highest value.\n\n"
         "**The slider under the figure** previews the other end layers in your browser only: the layer control "
         "above sets the sentence above the figure, the downloads and the other views of this section.\n\n"
         "**Attention is not explanation.** The Explain section shows what the model's answer depends on and "
         "measures how faithful each map is, by measures no method is built on (blurring the patches a map ranks "
         "first, among others). On the photos we measured, rollout from layer 1 with the weakest 90% of each "
         "layer's attention discarded ranked below AttnLRP (Explain's default) and "
         "greedy token deletion (the README has the table).")
LISTED = 8  # artefact tokens named one by one; more are counted


def artefacts_text(ctx) -> str:
    """How many artefact tokens the artefact-aware rollout leaves out, and which: "2 artefact tokens left out
    (patches 34, 120)", or that none was found (0 is an answer: the map is then the plain rollout)."""
    p = ctx.info.num_prefix_tokens
    patches = np.flatnonzero(cache.token_stats(ctx.key, ctx.res).artefacts[p:]).tolist()
    if not patches:
        return "0 artefact tokens left out (none found in this image: the map is the plain rollout)"
    listed = ", ".join(map(str, patches[:LISTED])) + (", …" if len(patches) > LISTED else "")
    noun = "token" if len(patches) == 1 else "tokens"
    return f"{len(patches)} artefact {noun} left out (patch{'' if len(patches) == 1 else 'es'} {listed})"


def describe(ctx) -> str:
    """What the map shows, in one sentence."""
    a = ctx.attention
    what = f"rollout over layers {a.start}-{a.end}" if a.view == "rollout" else f"raw attention of layer {a.end}"
    heads = f"all heads ({a.fusion})" if a.head_choice == ALL_HEADS else f"head {a.head}"
    discard = f", discard {a.discard:.2f}" if a.discard and a.view == "rollout" else ""
    artefacts = f", {artefacts_text(ctx)}" if a.drop_artefacts and a.view == "rollout" else ""
    return f"Attention of {readout_name(ctx.info.readout, short=True)}: {what}, {heads}{discard}{artefacts}."


def render(ctx) -> None:
    a, d, info = ctx.attention, ctx.display, ctx.info
    maps, labels, active = ctx.cls_maps()
    st.markdown(f"{describe(ctx)} Brighter = more attention; the slider under the figure previews other layers.")
    if readout_note(info):
        st.caption(readout_note(info))
    with st.expander("How to read this view"):
        st.markdown(ABOUT)
    who = "CLS" if info.readout == "cls" else "readout"
    unit = f"share of {who} attention" if a.view == "rollout" else f"{who} attention"
    chart(vf.layer_scrub_figure(ctx.res.pixels, maps, patch_size=info.patch_size, labels=labels, active=active,
                                opacity=d.opacity, colorscale=d.colorscale, colorbar_title=unit,
                                highlight=ctx.query), "fig_rollout", stem=ctx.stem)
