"""Plain charts: a histogram of patch values, faithfulness curves, mean attention distance per head; and any figure
as a standalone HTML page.

Pure functions: numpy arrays in, a :class:`plotly.graph_objects.Figure` (or HTML text) out.
"""

import numpy as np
import plotly.graph_objects as go

from ..errors import ParameterError
from ._common import _PALETTE, _colorbar, _scale_arg

__all__ = ["histogram_figure", "curves_figure", "attention_distance_figure", "layer_head_figure", "figure_html"]


def histogram_figure(
    values: np.ndarray,
    *,
    marked: np.ndarray | None = None,
    title: str | None = None,
    x_title: str = "value",
    log_x: bool = True,
    extra: dict[str, np.ndarray] | None = None,
) -> go.Figure:
    """A histogram of ``values`` (patches), the ``marked`` ones (e.g. outliers) in their own colour; ``extra``
    named values (e.g. the CLS token, registers) as vertical lines, each named above the plot area.

    With ``log_x`` the bins are even in log10 of the values, and the axis is ticked and titled in the values' own
    unit ("token norm (log scale)": 20, 30, 50). The margins grow to hold the tick numbers and the axis titles
    (``automargin``), so neither is drawn over the bars nor cut off.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ParameterError("values must hold at least one value.")
    marked = np.zeros(values.shape, bool) if marked is None else np.asarray(marked, bool).ravel()
    lines = [(name, float(val)) for name, v in (extra or {}).items() for val in np.atleast_1d(v)]
    x = np.log10(np.maximum(values, 1e-12)) if log_x else values
    traces = [go.Histogram(x=x[~marked], name="patches", marker=dict(color="rgb(120, 120, 140)"), nbinsx=60)]
    if marked.any():
        traces.append(go.Histogram(x=x[marked], name="outliers", marker=dict(color="rgb(0, 229, 255)"), nbinsx=60))
    xaxis = dict(title=dict(text=f"{x_title} (log scale)" if log_x else x_title), automargin=True)
    if log_x:
        shown = np.concatenate([values, [v for _, v in lines]])
        shown = shown[np.isfinite(shown) & (shown > 0)]
        if shown.size:
            xaxis.update(_log_ticks(float(shown.min()), float(shown.max())))
    names = list(dict.fromkeys(name for name, _ in lines))
    layout = dict(barmode="overlay", margin=dict(l=10, r=10, b=10, t=(40 if title else 10) + _LINE_LABEL * len(names)),
                  xaxis=xaxis, yaxis=dict(title=dict(text="patches"), automargin=True), showlegend=True,
                  title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)) if title else None)
    fig = go.Figure(data=traces, layout=layout)
    for name, val in lines:
        k = names.index(name)
        pos = float(np.log10(max(val, 1e-12)) if log_x else val)
        colour = _PALETTE[k % len(_PALETTE)]
        fig.add_vline(x=pos, line=dict(color=colour, dash="dot"))
        # above the plot area (y = 1 of the y domain, anchored at its bottom), one row per name: never on the bars,
        # the axis titles or each other
        fig.add_annotation(x=pos, xref="x", y=1, yref="y domain", yanchor="bottom", yshift=_LINE_LABEL * k,
                           text=name, showarrow=False, font=dict(color=colour, size=12))
    return fig


_LINE_LABEL = 16  # px: the height of one row of line names above a histogram


def _log_ticks(lo: float, hi: float) -> dict:
    """Tick positions (log10) and their labels (the values) for a log10 axis over values ``lo..hi``: decades, or
    1-2-5 steps, or every digit, whichever first gives three ticks; else evenly spaced round values."""
    k0, k1 = int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1
    vals: list[float] = []
    for digits in ((1,), (1, 2, 5), tuple(range(1, 10))):
        vals = [float(f"{d * 10.0**k:.12g}") for k in range(k0, k1 + 1) for d in digits]
        vals = [v for v in vals if lo <= v <= hi]
        if len(vals) >= 3:
            break
    else:  # a range narrower than one digit step (e.g. 101..108): round steps
        raw = (hi - lo) / 4 if hi > lo else max(abs(lo), 1e-12)
        base = 10.0 ** np.floor(np.log10(raw))
        step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
        vals = [float(f"{v:.12g}") for v in np.arange(np.floor(lo / step), np.ceil(hi / step) + 1) * step if v > 0]
    text = [f"{v:,.6g}" if 1e-4 <= v < 1e6 else f"{v:.3g}" for v in vals]
    return dict(tickvals=[float(np.log10(v)) for v in vals], ticktext=text, tickmode="array")


def curves_figure(
    fractions: np.ndarray,
    curves: dict[str, np.ndarray],
    *,
    title: str | None = None,
    y_title: str = "score",
) -> go.Figure:
    """Line plots against the removed fraction (faithfulness curves): ``curves`` maps a label to its values."""
    fractions = np.asarray(fractions, dtype=np.float64)
    traces = []
    for k, (label, values) in enumerate(curves.items()):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != fractions.shape:
            raise ParameterError(f"curve {label!r} has {values.size} values for {fractions.size} fractions.")
        dash = "dot" if "random" in label.lower() else "solid"
        traces.append(go.Scatter(x=fractions, y=values, mode="lines+markers", name=label,
                                 line=dict(color=_PALETTE[k % len(_PALETTE)], dash=dash)))
    # ticks and legend inside the figure's own box: a half-width column leaves no room for a legend at the side
    layout = dict(margin=dict(l=10, r=10, b=10, t=40 if title else 10),
                  xaxis=dict(title=dict(text="share of patches removed"), automargin=True,
                             range=[0, max(1e-9, float(fractions.max())) * 1.02], tickformat=".0%"),
                  yaxis=dict(title=dict(text=y_title), automargin=True),
                  legend=dict(orientation="h", x=0, xanchor="left", y=-0.25, yanchor="top"),
                  title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)) if title else None)
    return go.Figure(data=traces, layout=layout)


def attention_distance_figure(dist: np.ndarray, *, title: str | None = None) -> go.Figure:
    """ViT paper Fig. 7 (right): mean attention distance (pixels) per head against depth, one colour per head.

    ``dist`` is ``(layers, heads)``; layers are numbered from 0, as timm's ``blocks`` and the app's layer controls.
    """
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim != 2 or dist.size == 0:
        raise ParameterError(f"dist must be (layers, heads), got shape {dist.shape}.")
    n_layers, n_heads = dist.shape
    layers = np.arange(n_layers)
    traces = [
        go.Scatter(
            x=layers, y=dist[:, k], mode="markers", name=f"head {k}",
            marker=dict(size=7, color=_PALETTE[k % len(_PALETTE)]),
            hovertemplate=f"layer %{{x}} · head {k}<br>%{{y:.1f}} px<extra></extra>",
        )
        for k in range(n_heads)
    ]
    layout = dict(
        title=dict(text=title or "Mean attention distance", x=0.0, xanchor="left", font=dict(size=14)),
        xaxis=dict(title=dict(text="network depth (layer)"), dtick=1, range=[-0.5, n_layers - 0.5], automargin=True),
        yaxis=dict(title=dict(text="mean attention distance (pixels)"), rangemode="tozero", automargin=True),
        margin=dict(l=0, r=0, b=0, t=40), legend=dict(title=dict(text="head")),
    )
    return go.Figure(data=traces, layout=layout)


def layer_head_figure(values: np.ndarray, *, title: str | None = None, colorbar_title: str | None = None,
                      marked: list[tuple[int, int]] | None = None) -> go.Figure:
    """A (layers, heads) table as a heat map, layer 0 at the top: e.g. what ablating each head takes from the target.

    Signed values sit on a diverging scale centred at 0 (red: the value, blue: its negative); ``marked`` (layer,
    head) cells are outlined.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ParameterError(f"values must be (layers, heads), got shape {values.shape}.")
    n_layers, n_heads = values.shape
    heat = go.Heatmap(z=values, x=np.arange(n_heads), y=np.arange(n_layers), colorscale=_scale_arg("RdBu_r"),
                      zmid=0.0, colorbar=_colorbar(colorbar_title), xgap=1, ygap=1,
                      hovertemplate="layer %{y} · head %{x}<br>%{z:.3g}<extra></extra>")
    layout = dict(
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)) if title else None,
        xaxis=dict(title=dict(text="head"), dtick=1, automargin=True),
        yaxis=dict(title=dict(text="layer"), dtick=1, autorange="reversed", automargin=True),
        margin=dict(l=0, r=0, b=0, t=40 if title else 10), height=max(240, 26 * n_layers + 90),
        shapes=[dict(type="rect", x0=h - 0.5, x1=h + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                     line=dict(color="black", width=2)) for layer, h in (marked or [])],
    )
    return go.Figure(data=[heat], layout=layout)


def figure_html(fig: go.Figure) -> str:
    """Standalone HTML page of ``fig`` with plotly.js inlined, so it works offline; a figure with frames opens on
    the frame it shows (plotly's default would play every frame once on opening)."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False}, auto_play=False)
