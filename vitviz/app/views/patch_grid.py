"""Patch grid: the N = HW/P² patches the model cuts the image into, and its token count."""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf

from ..widgets import chart

TITLE = "Patch grid"


def token_text(info) -> str:
    """'261 tokens = 256 patches + 1 CLS token + 4 registers': every token the transformer reads, in plain words."""
    cls = int(info.has_class_token)
    dist = info.num_prefix_tokens - cls - info.num_reg_tokens
    kinds = ((cls, "CLS token"), (info.num_reg_tokens, "register"), (dist, "distillation token"))
    extra = [f"{n} {what if n == 1 else what + 's'}" for n, what in kinds if n > 0]
    return " + ".join([f"{info.num_tokens} tokens = {info.num_patches} patches", *extra])


def render(ctx) -> None:
    info, res = ctx.info, ctx.res
    st.markdown(f"N = H·W / P² = {info.img_size[0]}·{info.img_size[1]} / {info.patch_size}² = "
                f"**{info.num_patches} patches**; the transformer reads {token_text(info)}. Click a patch to make it "
                "the query.")
    chart(vf.patch_grid_figure(res.pixels, patch_size=info.patch_size, grid=info.grid, highlight=ctx.query),
          "fig_grid", stem=ctx.stem)
