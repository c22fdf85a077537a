"""The controls of a section, one function per section, each returning a frozen dataclass (or a value).

They are drawn above the section's tabs while the section is open, and only then; while another section is open the
same choices are read from the session state (the downloads and every view use them), so a function returns the
same whether it draws or not. Each section has one layer control, shared by its views.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from vitviz.analysis.rollout import FUSIONS
from vitviz.models import ModelInfo
from vitviz.settings import DEFAULTS

from .state import ALL_HEADS, keep

__all__ = ["AttentionChoice", "VIEWS_OF_A_MAP", "attention_ui", "token_layer_ui"]

VIEWS_OF_A_MAP = {"rollout": "rollout over layers", "raw": "raw, one layer"}


@dataclass(frozen=True)
class AttentionChoice:
    start: int
    end: int  # the layer the Attention section's views open at
    view: str  # "rollout" or "raw"
    head_choice: str | int  # ALL_HEADS or a head index
    fusion: str
    discard: float
    drop_artefacts: bool = False  # artefact-aware rollout: outlier/sink tokens left out

    @property
    def head(self) -> str | int:
        """What the maps fuse: a fusion name for all heads, else one head's index."""
        return self.fusion if self.head_choice == ALL_HEADS else int(self.head_choice)


def _keep_attention(info: ModelInfo) -> None:
    """Every attention key valid for this model (a new model may have fewer layers or heads)."""
    depth = info.depth
    keep("view", lambda v: v in VIEWS_OF_A_MAP, "rollout")
    keep("layers", lambda v: isinstance(v, (tuple, list)) and 0 <= v[0] <= v[1] < depth, DEFAULTS.layer_range(depth))
    if st.session_state["view"] == "raw":  # first opened at the rollout's end layer
        keep("raw_layer", lambda v: isinstance(v, int) and 0 <= v < depth, st.session_state["layers"][1])
    keep("head", lambda v: v in (ALL_HEADS, *range(info.num_heads)), ALL_HEADS)
    keep("head_fusion", lambda v: v in FUSIONS, DEFAULTS.head_fusion)
    keep("discard_ratio", lambda v: isinstance(v, (int, float)) and 0 <= v <= 0.99, DEFAULTS.discard_ratio)
    keep("drop_artefacts", lambda v: isinstance(v, bool), False)


def _layers_widget(depth: int, view: str) -> None:
    """The section's one layer control: the rollout's layer range, or the one layer the raw view shows (a raw map
    has no start layer). Its end layer is the layer the Heads and Query patch views show."""
    if depth == 1:  # a one-layer model: nothing to choose (a slider needs two ends)
        st.caption("Layers: the model has a single layer.")
    elif view == "raw":
        st.slider("Layer", 0, depth - 1, key="raw_layer",
                  help="The layer whose raw CLS attention is shown; the heads and the query patch views show it too.")
    else:
        st.slider("Layers (start..end)", 0, depth - 1, key="layers",
                  help="Rollout multiplies the attention of layers start..end; the end layer is the one the heads "
                       "and the query patch views show.")


def _draw_attention(info: ModelInfo) -> None:
    left, layers, heads, rollout = st.columns([1.0, 1.5, 1.1, 1.3])
    label = "CLS attention" if info.readout == "cls" else "Readout attention"  # a CLS-less model: what its head pools
    view = left.radio(label, list(VIEWS_OF_A_MAP), key="view", format_func=VIEWS_OF_A_MAP.get,
                      help="Rollout follows the CLS token's attention through the residual stream over a range of "
                           "layers; raw shows one layer's attention on its own.")
    with layers:
        _layers_widget(info.depth, view)
    head_choice = heads.selectbox("Head", [ALL_HEADS, *range(info.num_heads)], key="head",
                                  format_func=lambda h: h if h == ALL_HEADS else f"head {h}",
                                  help="Fuse all heads, or follow one head through every layer.")
    heads.selectbox("Head fusion", FUSIONS, key="head_fusion", disabled=head_choice != ALL_HEADS,
                    help="How the heads of a layer are combined.")
    rollout.slider("Discard ratio", 0.0, 0.99, step=0.01, key="discard_ratio", disabled=view == "raw",
                   help="Zero this share of the weakest attention entries per layer before rollout (not the CLS "
                        "column). Rollout only: the raw view shows attention as it is.")
    rollout.checkbox("Without artefacts", key="drop_artefacts", disabled=view == "raw",
                     help="Artefact-aware rollout: patch tokens whose norm or received attention is an outlier in "
                          "some layer (see the Token norms and Attention sinks views) are left out of every layer.")


def attention_ui(info: ModelInfo, *, shown: bool) -> AttentionChoice:
    """The Attention section's controls (drawn when ``shown``): map, layers, head, fusion, discard, artefacts."""
    _keep_attention(info)
    if shown:
        with st.container(border=True, key="attention_controls"):
            _draw_attention(info)
    s = st.session_state
    if info.depth == 1:
        start = end = 0
    elif s["view"] == "raw":
        start = end = int(s["raw_layer"])
    else:
        start, end = (int(v) for v in s["layers"])
    return AttentionChoice(start, end, s["view"], s["head"], s["head_fusion"], float(s["discard_ratio"]),
                           bool(s["drop_artefacts"]))


def token_layer_ui(depth: int, *, shown: bool) -> int:
    """The Tokens & features section's one layer (drawn when ``shown``): every view of the section reads it."""
    keep("tokens_layer", lambda v: isinstance(v, int) and 0 <= v < depth, depth - 1)
    if shown:
        st.columns([1, 3])[0].selectbox(
            "Layer", list(range(depth)), key="tokens_layer",
            help="The block output every view of this section looks at, numbered from 0 as timm's blocks.")
    return int(st.session_state["tokens_layer"])
