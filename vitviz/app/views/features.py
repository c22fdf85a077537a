"""Patch features: the first three principal components of a layer's patch tokens as RGB (DINOv2, Fig. 1)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz import figures as vf
from vitviz.analysis import tokens as vt

from .. import cache
from ..widgets import chart
from ._tokens import image_titles

TITLE = "Patch features"
SCALING = ("each component's scores from −2 to +2 standard deviations mapped to 0..1 (clipped beyond), "
           "red, green, blue = components 1, 2, 3")


def _patches(res, layer: int) -> np.ndarray:
    return res.tokens[layer, res.info.num_prefix_tokens:]


def render(ctx) -> None:
    info, layer = ctx.info, ctx.token_layer
    foreground = st.checkbox("Only the foreground (DINOv2: first component above its mean)", key="pca_foreground",
                             help="The background is the side of the first component that the image's border "
                                  "patches fall on; artefact tokens are left out of every fit.")
    second = ctx.second()
    stats = cache.token_stats(ctx.key, ctx.res)
    exclude = stats.artefacts[info.num_prefix_tokens:]
    sets = [_patches(ctx.res, layer)] + ([_patches(second, layer)] if second is not None else [])
    excludes = [exclude] + ([cache.token_stats(ctx.second_key, second).artefacts[info.num_prefix_tokens:]]
                            if second is not None else [])
    pca = vt.fit_pca(sets if second is not None else sets[0], exclude=excludes if second is not None else exclude)
    shared = " on one basis fitted to both images, so a colour means the same feature in each" if second else ""
    st.markdown(f"Layer {layer}: the patch tokens' first three principal components as colours{shared} "
                f"({SCALING}; they explain {100 * pca.explained.sum():.0f}% of the variance). Patches alike in "
                "colour are alike to the model.")
    cols = st.columns(len(sets))
    for k, (col, patches, res) in enumerate(zip(cols, sets, [ctx.res, second], strict=False)):
        rgb = vt.pca_rgb(pca, patches).reshape(*res.info.grid, 3)
        if foreground:
            mask = vt.foreground_mask(patches, grid=res.info.grid, exclude=excludes[k]).reshape(res.info.grid)
            rgb = np.where(mask[..., None], rgb, 0.0)
        with col:
            if second is not None:
                st.markdown(image_titles(ctx)[k])
            chart(vf.rgb_patch_figure(rgb, patch_size=res.info.patch_size, pixels=res.pixels, opacity=0.85,
                                      highlight=ctx.query if k == 0 else None), f"fig_pca_{k}", stem=ctx.stem,
                  clickable=k == 0)
    if second is None:
        st.caption("Add a second image in the sidebar to compare two images on one basis.")
