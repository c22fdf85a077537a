"""Take the position embeddings away: the same image with its positions zeroed or its patches shuffled, side by side.

One batched pass through the walk (:func:`vitviz.experiments.position.position_experiment`), cached per (image,
model, map, seed): moving another control never runs it again.
"""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf
from vitviz.analysis.readout import embedding_name, readout_name
from vitviz.experiments.position import DESCRIPTIONS, PositionExperiment, position_experiment
from vitviz.inputs.image import to_tensor
from vitviz.settings import DEFAULTS

from .. import cache, jobs
from ..widgets import chart, readout_note

TITLE = "Remove positions"
MAPS = {"rollout": f"rollout (from layer {DEFAULTS.start_layer}, discard {DEFAULTS.discard_ratio})",
        "last_layer": "last layer's attention"}  # of the readout: "CLS rollout" for a model with a CLS token
SHORT = {"intact": "Intact", "no_position": "No position embeddings", "shuffled": "Patches shuffled",
         "shuffled_no_position": "Shuffled, no positions"}


@st.cache_data(max_entries=8, show_spinner="Running the image with its positions taken away...")
def _experiment(key: cache.AnalysisKey, map_kind: str, seed: int, _res, _weights) -> PositionExperiment:
    jobs.share_cores()  # the page's torch threads, set once, as for the explanation jobs
    built, info = cache.model(key.model, _weights)
    param = next(built.parameters())
    x = to_tensor(_res.pixels, mean=info.mean, std=info.std).to(device=param.device, dtype=param.dtype)
    return position_experiment(built, x, variants=("no_position", "shuffled", "shuffled_no_position"), seed=seed,
                               map_kind=map_kind, start=DEFAULTS.start_layer, discard=DEFAULTS.discard_ratio)


def cosine_text(cosine: float) -> str:
    """A cosine near 1 as 1 − its distance in two significant digits (0.99999 would read as 1.0000)."""
    return f"{cosine:.4f}" if 1 - cosine >= 1e-4 else f"1 − {max(1 - cosine, 0):.2g}"


def _map_label(kind: str, readout: str) -> str:
    """"CLS rollout (...)", "last layer's CLS attention"; for a model without a CLS token, the readout's."""
    if readout == "cls":
        return "CLS " + MAPS[kind] if kind == "rollout" else MAPS[kind].replace("attention", "CLS attention")
    return f"{MAPS[kind]} of {readout_name(readout, short=True)}"


def _variant_text(v, pooling: str) -> str:
    same = ("the reference the others are compared with" if v.name == "intact" else
            f"**{cosine_text(v.cosine)}**")
    lines = [f"**{SHORT[v.name]}**: {DESCRIPTIONS[v.name]}.",
             f"Cosine of {embedding_name(pooling)} with the intact run: {same}."]
    if v.predictions:
        lines.append("Predicts " + "; ".join(p.describe() for p in v.predictions[:3]) + ".")
    return "  \n".join(lines)


def render(ctx) -> None:
    info, res, d = ctx.info, ctx.res, ctx.display
    st.markdown("A transformer block treats its tokens as a set: only the **position embeddings** tell the model "
                "where a patch sits. Here the same image runs with them removed (zeroed), with its patches shuffled "
                "(each patch's content moved to another place, the position embeddings left where they are), and "
                "both. Without positions a shuffle changes nothing but the order: "
                f"{embedding_name(info.pooling)} stays the same.")
    if res.pos_sim is None:  # positions inside attention (RoPE, a relative bias): no learned embedding to remove
        st.info(res.pos_note or "This model has no learned position embeddings to take away.")
        return
    left, right = st.columns(2)
    map_kind = left.radio("Map", list(MAPS), key="posx_map", horizontal=True,
                          format_func=lambda k: _map_label(k, info.readout))
    seed = int(right.number_input("Shuffle seed", 0, 10_000, 0, key="posx_seed"))
    done = _experiment(ctx.key, map_kind, seed, res, ctx.weights)
    st.caption(f"Maps: the {_map_label(map_kind, info.readout)}, each in the image's own patch order (a shuffled "
               f"run is put back); brighter = more attention. {readout_note(info)}")
    cols = [c for _ in range(0, len(done.variants), 2) for c in st.columns(2)]  # two a row: maps large enough to read
    for col, v in zip(cols, done.variants, strict=False):
        with col:
            st.markdown(_variant_text(v, info.pooling))
            chart(vf.overlay_figure(res.pixels, v.attention_map, patch_size=info.patch_size, opacity=d.opacity,
                                    colorscale=d.colorscale, colorbar_title="attention"),
                  f"fig_posx_{v.name}", stem=ctx.stem, toolbar=False)
    st.markdown("**The position embeddings themselves:** cosine similarity of each patch's learned embedding with "
                "every other's. Nearby patches look alike when the model learned the 2-D layout.")
    if info.num_patches <= vf.MOSAIC_MAX_TOKENS:
        chart(vf.similarity_mosaic_figure(res.pos_sim, grid=info.grid, highlight=ctx.query), "fig_posx_mosaic",
              stem=ctx.stem, mosaic=True)
    else:
        st.info(f"The mosaic of {info.num_patches} patches is too large to draw (at most {vf.MOSAIC_MAX_TOKENS}).")
