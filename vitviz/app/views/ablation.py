"""Head ablation: remove attention heads and see what the model's answer loses, head by head and together.

The intact run is cached per (image, model, target); the table of every head ablated on its own is computed on a
button, then cached per (image, model, mode, target); a chosen set of heads is one more pass, cached per choice.
"""

from __future__ import annotations

import streamlit as st

from vitviz import figures as vf
from vitviz.analysis.maps import query_attention_maps, rollout_map
from vitviz.analysis.readout import embedding_name, readout_name
from vitviz.experiments.ablation import Ablated, HeadTable, Reference, ablate, head_table, reference
from vitviz.inputs.image import to_tensor
from vitviz.models.labels import class_names, has_classes, top_predictions

from .. import cache, jobs
from ..state import keep
from ..widgets import chart, md_escape, readout_note

TITLE = "Head ablation"
MODES = {"zero": "zero its output", "mean": "replace its output by its mean over the tokens"}
TOP = 10  # the most important heads listed


def _inputs(key: cache.AnalysisKey, res, weights):
    """The model and the image tensor the analysis ran on."""
    jobs.share_cores()  # the page's torch threads, set once, as for the explanation jobs
    built, info = cache.model(key.model, weights)
    param = next(built.parameters())
    return built, to_tensor(res.pixels, mean=info.mean, std=info.std).to(device=param.device, dtype=param.dtype)


@st.cache_resource(max_entries=8, show_spinner="Running the intact model...")
def _reference(key: cache.AnalysisKey, target: int | None, _res, _weights) -> Reference:
    return reference(*_inputs(key, _res, _weights), target=target)


@st.cache_resource(max_entries=8, show_spinner="Ablating every head, one at a time (a batch per few heads)...")
def _table(key: cache.AnalysisKey, mode: str, target: int | None, _ref, _res, _weights) -> HeadTable:
    return head_table(*_inputs(key, _res, _weights), mode=mode, ref=_ref)


@st.cache_resource(max_entries=8, show_spinner="Running the model without the chosen heads...")
def _ablated(key: cache.AnalysisKey, heads: tuple, mode: str, target: int | None, _ref, _res, _weights) -> Ablated:
    return ablate(*_inputs(key, _res, _weights), heads, mode=mode, ref=_ref, attention=True)


def _target(ctx, built) -> int | None:
    """The class measured: one of the intact run's top 5 (its top-1 first); None for a backbone."""
    if not has_classes(built):
        st.caption(f"This model has no classifier head: an ablation's effect is 1 − the cosine of "
                   f"{embedding_name(ctx.info.pooling)} with the intact one.")
        return None
    ref = _reference(ctx.key, None, ctx.res, ctx.weights)
    top = top_predictions(ref.logits, names=class_names(built), k=min(5, ref.logits.numel()))
    labels = {p.index: f"class {p.index}" + (f" '{p.name}'" if p.name else "") for p in top}
    keep("ablate_target", lambda v: v in labels, top[0].index)
    return st.selectbox("Class measured (the intact run's top 5)", list(labels), key="ablate_target",
                        format_func=labels.get)


def _effect_text(table: HeadTable, pooling: str) -> str:
    ref = table.reference
    if table.probability is None:
        return f"effect = 1 − cosine of {embedding_name(pooling)} with the intact one"
    return (f"effect = the probability of '{md_escape(ref.target_name)}' lost (intact p = {ref.probability:.3g}); "
            "negative: the class gained")


def _ranked(table: HeadTable) -> None:
    rows = ["| rank | layer | head | effect | " + ("p after | logit after |" if table.probability is not None
                                                    else "cosine |"),
            "|---:|---:|---:|---:|" + ("---:|---:|" if table.probability is not None else "---:|")]
    for rank, (layer, head, effect) in enumerate(table.ranked(TOP), 1):
        rest = (f"{table.probability[layer, head]:.3g} | {table.logit[layer, head]:.3g} |"
                if table.probability is not None else f"{table.cosine[layer, head]:.4f} |")
        rows.append(f"| {rank} | {layer} | {head} | {effect:+.3g} | {rest}")
    st.markdown("\n".join(rows))


def _chosen(ctx, table: HeadTable | None, mode: str, target: int | None, ref: Reference) -> None:
    """The heads the user picks, ablated together: the effect and the maps with the ablation applied."""
    info, d = ctx.info, ctx.display
    options = [f"{layer}:{head}" for layer in range(info.depth) for head in range(info.num_heads)]
    if table is not None:  # the most important heads first
        options = [f"{layer}:{head}" for layer, head, _e in table.ranked()]
    picked = st.multiselect("Heads to ablate together", options, key="ablate_heads",
                            format_func=lambda o: "layer {} · head {}".format(*o.split(":")),
                            help="Pick every head of a layer to remove that layer's attention.")
    if not picked:
        st.info("Pick heads above to see the model without them.")
        return
    heads = tuple(sorted(tuple(int(v) for v in o.split(":")) for o in picked))
    done = _ablated(ctx.key, heads, mode, target, ref, ctx.res, ctx.weights)
    what = (f"p('{md_escape(ref.target_name)}') {ref.probability:.3g} → **{done.probability:.3g}** "
            f"(logit {ref.logit:.3g} → {done.logit:.3g}); " if done.probability is not None else "")
    st.markdown(f"Without {len(heads)} head(s): {what}cosine of {embedding_name(info.pooling)} with the intact "
                f"one **{done.cosine:.4f}**.")
    who = "CLS" if info.readout == "cls" else "readout"  # the readout: the CLS token, or the tokens the head pools
    cols = st.columns(2)
    for col, attn, w, label in ((cols[0], ctx.res.attention, ctx.res.readout, "intact"),
                                (cols[1], done.attention, done.readout, "ablated")):
        with col:
            st.caption(f"{who} rollout, {label}")
            chart(vf.overlay_figure(ctx.res.pixels, rollout_map(attn, info=info, readout=w),
                                    patch_size=info.patch_size, opacity=d.opacity, colorscale=d.colorscale,
                                    colorbar_title="rollout"), f"fig_ablate_{label}", stem=ctx.stem, toolbar=False)
    st.caption(f"Each head's attention of {readout_name(info.readout, short=True)} in the last layer "
               f"({info.depth - 1}) with the ablation applied. {readout_note(info)}")
    chart(vf.head_grid_figure(query_attention_maps(done.attention, info=info, layer=info.depth - 1,
                                                   readout=done.readout),
                              patch_size=info.patch_size, pixels=ctx.res.pixels, colorscale=d.colorscale,
                              opacity=d.opacity, shared_scale=True, colorbar_title="attention"),
          "fig_ablate_heads", stem=ctx.stem, toolbar=False)


def render(ctx) -> None:
    st.markdown("Knock out attention heads and measure what the model's answer loses. Each head on its own gives "
                "the table (the most important heads first); then pick heads to remove together and see the "
                "attention without them.")
    built, _info = cache.model(ctx.key.model, ctx.weights)
    left, right = st.columns(2)
    with left:
        mode = st.radio("Ablation", list(MODES), key="ablate_mode", horizontal=True, format_func=MODES.get)
    with right:
        target = _target(ctx, built)
    top1 = _reference(ctx.key, None, ctx.res, ctx.weights)  # the intact run measured on its top-1 class
    ref = top1 if target == top1.target else _reference(ctx.key, target, ctx.res, ctx.weights)
    asked = st.session_state.setdefault("_ablate_asked", set())
    wanted = (ctx.key, mode, target)
    if wanted not in asked and st.button(f"Ablate each of the {ctx.info.depth * ctx.info.num_heads} heads",
                                         key="ablate_run"):
        asked.add(wanted)
    table = _table(ctx.key, mode, target, ref, ctx.res, ctx.weights) if wanted in asked else None
    if table is not None:
        st.markdown(f"**Each head ablated on its own** ({MODES[mode]}): {_effect_text(table, ctx.info.pooling)}.")
        chart(vf.layer_head_figure(table.effect, colorbar_title="effect", marked=[r[:2] for r in table.ranked(3)]),
              "fig_ablate_table", stem=ctx.stem, clickable=False)
        _ranked(table)
    _chosen(ctx, table, mode, target, ref)
