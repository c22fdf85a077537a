"""Faithfulness of several explanation methods over a set of images: per-image rows, a per-method summary, files.

For each image: every method's map of one target (:func:`vitviz.explain.explain_all`, passes shared), then every
map's MoRF and LeRF curves (:func:`vitviz.faithfulness.curves`, batched together). The random map is always
included, seeded per image (``seed`` + the image's position), as the baseline a faithful method must beat.

The summary gives per method the mean of the per-image scores and a 95% interval by the percentile bootstrap of
the mean (10,000 resamples of the images with replacement, ``numpy.random.default_rng(0)``; no normality
assumed, and the same numbers on every run). The plot is a PNG drawn with PIL (plotly's static export needs
kaleido, which vitviz does not depend on): the mean MoRF and LeRF curves per method.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ParameterError
from .explain import Method, Target, explain_all
from .explain.baseline import random_map
from .inputs.image import LoadedImage, fit_image, to_tensor
from .metrics.faithfulness import PERTURBATION_WORDS, Curves, Perturbation, Readout, curves_by_readout
from .metrics.sensitivity import sensitivity_n
from .models import ModelInfo, describe_model

__all__ = [
    "DEFAULT_METHODS",
    "Row",
    "MethodSummary",
    "prepare_image",
    "evaluate_image",
    "evaluate",
    "bootstrap_interval",
    "summarize",
    "write_rows_csv",
    "write_summary_csv",
    "summary_markdown",
    "write_plot",
]

DEFAULT_METHODS: tuple[str, ...] = (
    "rollout",
    "rollout:start=1",
    "rollout:discard=0.9",
    "rollout:start=1,discard=0.9",
    "raw",
    "chefer",
    "legrad",
    "gradxattn",
    "lrp",
    "lrp:gamma_from=-4",
    "deletion",
    "deletion:steps=16",
    "random",
)
ImageProgress = Callable[[int, int, str], None]  # (images done, images in all, the last one's name)
RANDOM_DRAWS = 8  # seeded random maps averaged into the random baseline's row (one draw wanders: LeRF dips, climbs)
SENSITIVITY = "sensitivity-n"  # the perturbation column of sensitivity-n rows (token removal, random sets)


@dataclass(frozen=True)
class Row:
    """One map of one image and its faithfulness."""

    image: str
    method: str  # Method.label
    target: str  # the resolved target's label: class:207, embedding, patch:12
    target_description: str
    perturbation: str  # tokens | pixels | blur | road | sensitivity-n
    score_kind: str  # cosine | probability | logit | correlation
    morf_auc: float  # NaN for sensitivity-n
    lerf_auc: float
    score: float  # lerf_auc - morf_auc (the symmetric relevance gain), or sensitivity-n's mean correlation
    seconds: float  # the explanation alone (its pass and map)
    curve_seconds: float  # this map's share of the batched curve passes
    fractions: tuple[float, ...]
    morf: tuple[float, ...]
    lerf: tuple[float, ...]
    readout: str = "target"  # what the score read (vitviz.metrics.faithfulness.READOUTS)
    note: str = ""  # why there is no score (a constant map ranks nothing: score, AUCs NaN), else empty


@dataclass(frozen=True)
class MethodSummary:
    """Means over the images of one method (and perturbation), with the score's bootstrap interval."""

    method: str
    perturbation: str
    readout: str
    n: int
    score: float
    score_low: float
    score_high: float
    morf_auc: float
    lerf_auc: float
    seconds: float
    fractions: tuple[float, ...]
    morf: tuple[float, ...]  # the mean curves
    lerf: tuple[float, ...]


def prepare_image(image: Image.Image | LoadedImage, info: ModelInfo, *, fit: str = "crop") -> torch.Tensor:
    """An image fitted to the model's input as the app does (timm's eval crop by default): (1, 3, H, W)."""
    img = image.image if isinstance(image, LoadedImage) else image
    interp = info.interpolation if info.interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    fitted = fit_image(img, input_size=info.img_size, fit=fit, crop_pct=info.crop_pct, interpolation=interp)
    return to_tensor(fitted.pixels, mean=info.mean, std=info.std)


def _with_random(methods: Sequence[Method | str]) -> list[Method]:
    parsed = list(dict.fromkeys(Method.parse(m) for m in methods))
    if not any(m.name == "random" for m in parsed):
        parsed.append(Method("random"))
    return parsed


def _row(name: str, m: Method, e, c: Curves) -> Row:
    """One map's row; a map that ranks nothing (constant, not finite) is a failure row: no score, the reason."""
    failed = m.name != "random" and not e.informative
    nan = float("nan")
    return Row(image=name, method=m.label, target=c.target.label, target_description=e.target_description,
               perturbation=c.perturbation, score_kind=c.score_kind, morf_auc=nan if failed else c.morf_auc,
               lerf_auc=nan if failed else c.lerf_auc, score=nan if failed else c.score, seconds=e.seconds,
               curve_seconds=c.seconds, fractions=tuple(float(v) for v in c.fractions),
               morf=tuple(float(v) for v in c.morf), lerf=tuple(float(v) for v in c.lerf), readout=c.readout,
               note=" ".join(e.notes) if failed else "")


def _averaged(rows: Sequence[Row]) -> Row:
    """The random baseline's row: the mean curves and scores of its seeded draws."""
    mean = lambda key: float(np.mean([getattr(r, key) for r in rows]))  # noqa: E731
    curve = lambda key: tuple(np.mean([getattr(r, key) for r in rows], axis=0).tolist())  # noqa: E731
    return replace(rows[0], morf_auc=mean("morf_auc"), lerf_auc=mean("lerf_auc"), score=mean("score"),
                   morf=curve("morf"), lerf=curve("lerf"), curve_seconds=mean("curve_seconds"))


def _sensitivity_rows(model, x, name, wanted, explanations, maps, *, readouts, seed) -> list[Row]:
    rows = []
    for readout in readouts:
        found = sensitivity_n(model, x, maps, target=explanations[0].target, readout=readout, seed=seed)
        for k, (m, e) in enumerate(zip(wanted, explanations, strict=True)):
            score = found[k].score if m.name != "random" else float(np.nanmean([f.score for f in found[k:]]))
            score = score if m.name == "random" or e.informative else float("nan")
            rows.append(Row(image=name, method=m.label, target=e.target.label, target_description=e.target_description,
                            perturbation=SENSITIVITY, score_kind="correlation", morf_auc=float("nan"),
                            lerf_auc=float("nan"), score=score, seconds=e.seconds, curve_seconds=0.0, fractions=(),
                            morf=(), lerf=(), readout=readout))
    return rows


def evaluate_image(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        name: str,
        methods: Sequence[Method | str] = DEFAULT_METHODS,
        target: Target | str = "auto",
        perturbations: Sequence[Perturbation] = ("tokens",),
        readouts: Sequence[Readout] = ("target",),
        sensitivity: bool = False,
        steps: int = 10,
        seed: int = 0,
        random_draws: int = RANDOM_DRAWS,
) -> list[Row]:
    """Rows for one image ``x`` (1, 3, H, W): each method's map of ``target`` and its curves under every
    perturbation × read-out (one set of passes per perturbation), and sensitivity-n if asked. The random baseline
    (always included) is the mean of ``random_draws`` seeded maps, fresh for each image (``seed``)."""
    if random_draws < 1:
        raise ParameterError(f"random draws must be at least 1, got {random_draws}")
    wanted = _with_random(methods)
    run = [m.with_settings(seed=m.settings.seed + seed * random_draws) if m.name == "random" else m for m in wanted]
    explanations = explain_all(model, x, methods=run, target=target)
    grid = explanations[0].map.shape
    draws = [random_map(grid, seed=seed * random_draws + k) for k in range(1, random_draws)]
    maps, r = [e.map for e in explanations] + draws, next(i for i, m in enumerate(wanted) if m.name == "random")
    rows = []
    for perturbation in perturbations:
        by = curves_by_readout(model, x, maps, target=explanations[0].target, perturbation=perturbation,
                               readouts=readouts, steps=steps, seed=seed)
        for cs in by.values():
            mine = [_row(name, m, e, c) for m, e, c in zip(wanted, explanations, cs, strict=False)]
            mine[r] = _averaged([mine[r], *(_row(name, wanted[r], explanations[r], c) for c in cs[len(wanted):])])
            rows += mine
    if sensitivity:  # the random row's maps are the last: wanted[r] then the draws
        order = [*(i for i in range(len(wanted)) if i != r), r]
        rows += _sensitivity_rows(model, x, name, [wanted[i] for i in order], [explanations[i] for i in order],
                                  [maps[i] for i in order] + draws, readouts=readouts, seed=seed)
    return rows


def evaluate(
        model: torch.nn.Module,
        images: Sequence[tuple[str, Image.Image | LoadedImage]],
        *,
        info: ModelInfo | None = None,
        methods: Sequence[Method | str] = DEFAULT_METHODS,
        target: Target | str = "auto",
        perturbations: Sequence[Perturbation] = ("tokens",),
        readouts: Sequence[Readout] = ("target",),
        sensitivity: bool = False,
        steps: int = 10,
        fit: str = "crop",
        progress: ImageProgress | None = None,
) -> list[Row]:
    """Rows for every (name, image) x method; ``progress(done, total, name)`` after each image."""
    if not images:
        raise ParameterError("no images to evaluate")
    info = info or describe_model(model)
    param = next(model.parameters())
    rows: list[Row] = []
    for i, (name, image) in enumerate(images):
        x = prepare_image(image, info, fit=fit).to(device=param.device, dtype=param.dtype)
        rows += evaluate_image(model, x, name=name, methods=methods, target=target, perturbations=perturbations,
                               readouts=readouts, sensitivity=sensitivity, steps=steps, seed=i)
        if progress is not None:
            progress(i + 1, len(images), name)
    return rows


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample with replacement, take the (α/2, 1 - α/2) quantiles."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ParameterError("no values to summarise")
    if not 0 < confidence < 1:
        raise ParameterError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(rows: Sequence[Row], *, confidence: float = 0.95, resamples: int = 10_000,
              seed: int = 0) -> list[MethodSummary]:
    """One summary per (method, perturbation, read-out), in the order the rows first name them."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.perturbation, r.readout), []).append(r)
    out = []
    for (method, pert, readout), group in groups.items():
        rs = [r for r in group if np.isfinite(r.score)]  # failure rows (a map that ranks nothing) have no score
        if not rs:
            continue
        scores = [r.score for r in rs]
        lo, hi = bootstrap_interval(scores, confidence=confidence, resamples=resamples, seed=seed)
        out.append(MethodSummary(
            method=method, perturbation=pert, readout=readout, n=len(rs), score=float(np.mean(scores)), score_low=lo,
            score_high=hi,
            morf_auc=float(np.mean([r.morf_auc for r in rs])), lerf_auc=float(np.mean([r.lerf_auc for r in rs])),
            seconds=float(np.mean([r.seconds for r in rs])), fractions=rs[0].fractions,
            morf=tuple(np.mean([r.morf for r in rs], axis=0).tolist()),
            lerf=tuple(np.mean([r.lerf for r in rs], axis=0).tolist()),
        ))
    return out


def _curve_text(values: Sequence[float]) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def write_rows_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Per-image CSV: one row per (image, method); the curves as space-separated values over ``fractions``."""
    path = Path(path)
    cols = ["image", "method", "target", "target_description", "perturbation", "readout", "score_kind", "morf_auc",
            "lerf_auc", "score", "seconds", "curve_seconds", "fractions", "morf", "lerf", "note"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.image, r.method, r.target, r.target_description, r.perturbation, r.readout, r.score_kind,
                        f"{r.morf_auc:.6f}", f"{r.lerf_auc:.6f}", f"{r.score:.6f}", f"{r.seconds:.4f}",
                        f"{r.curve_seconds:.4f}", _curve_text(r.fractions), _curve_text(r.morf),
                        _curve_text(r.lerf), r.note])
    return path


def write_summary_csv(summaries: Sequence[MethodSummary], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "perturbation", "readout", "n", "score", "score_low_95", "score_high_95", "morf_auc",
                    "lerf_auc", "seconds"])
        for s in summaries:
            w.writerow([s.method, s.perturbation, s.readout, s.n, f"{s.score:.6f}", f"{s.score_low:.6f}",
                        f"{s.score_high:.6f}", f"{s.morf_auc:.6f}", f"{s.lerf_auc:.6f}", f"{s.seconds:.4f}"])
    return path


def summary_markdown(summaries: Sequence[MethodSummary]) -> str:
    """A Markdown table per measure, most faithful first: the symmetric relevance gain (LeRF AUC − MoRF AUC), or
    sensitivity-n's mean correlation, with its 95% bootstrap interval."""
    lines = ["| method | perturbation | read-out | n | score (95% interval) | MoRF AUC | LeRF AUC | s per map |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for s in sorted(summaries, key=lambda s: (s.perturbation, s.readout, -s.score)):
        lines.append(f"| {s.method} | {s.perturbation} | {s.readout} | {s.n} | {s.score:.3f} [{s.score_low:.3f}, "
                     f"{s.score_high:.3f}] | {s.morf_auc:.3f} | {s.lerf_auc:.3f} | {s.seconds:.3f} |")
    return "\n".join(lines) + "\n"


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], steps of 1, 2 or 5 times a power of ten, about ``count`` of them."""
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    raw = (hi - lo) / (count - 1)
    steps = [m * 10 ** (math.floor(math.log10(raw)) + e) for e in (0, 1) for m in (1, 2, 5)]

    def ticks(step: float) -> list[float]:
        first = math.floor(lo / step + 1e-9) * step
        return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]

    return min((ticks(st) for st in steps), key=lambda t: (abs(len(t) - count), t[-1] - t[0]))


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series, ticks: list[float], font, y_title: str) -> None:
    """One curve panel in ``box`` (left, top, right, bottom): axes with ticks and titles, a polyline per series."""
    left, top, right, bottom = box
    lo, hi = ticks[0], ticks[-1]
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 18), title, fill=(0, 0, 0), font=font)
    for v in ticks:
        y = bottom - (v - lo) / (hi - lo) * (bottom - top)
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        draw.text((left - 6, y), f"{v:.3g}", fill=(0, 0, 0), font=font, anchor="rm")
    x_max = max(series[0][1][-1], 1e-9)
    for v in np.round(np.arange(0, x_max + 1e-9, 0.3 if x_max > 0.6 else 0.1), 2):
        x = left + v / x_max * (right - left)
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        draw.text((x, bottom + 6), f"{v:g}", fill=(0, 0, 0), font=font, anchor="mt")
    for colour, xs, ys in series:
        pts = [(left + x / x_max * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
               for x, y in zip(xs, ys, strict=True)]
        draw.line(pts, fill=colour, width=2)
    draw.text(((left + right) / 2, bottom + 24), "fraction of patches removed", fill=(0, 0, 0), font=font,
              anchor="mt")
    draw.text((left - 46, top - 40), f"y: {y_title}", fill=(90, 90, 90), font=font)


def _y_title(s: MethodSummary) -> str:
    what = {"target": "the explained score", "cls": "cosine, CLS embedding", "mean": "cosine, mean patch token",
            "probability": "class probability", "logit": "class logit"}.get(s.readout, s.readout)
    return f"{what} (by {PERTURBATION_WORDS.get(s.perturbation, s.perturbation)})"


def write_plot(summaries: Sequence[MethodSummary], path: str | Path, *, size: tuple[int, int] = (1180, 480)) -> Path:
    """The mean MoRF and LeRF curves of each method under one measure (the first perturbation × read-out with
    curves among ``summaries``), side by side, with tick values, axis titles and a legend: a PNG drawn with PIL."""
    summaries = [s for s in summaries if s.morf]
    if not summaries:
        raise ParameterError("nothing to plot")
    first = (summaries[0].perturbation, summaries[0].readout)
    summaries = [s for s in summaries if (s.perturbation, s.readout) == first]
    path = Path(path)
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)  # a scalable font with every glyph (the bitmap default had few)
    values = [v for s in summaries for v in (*s.morf, *s.lerf)]
    ticks = _nice_ticks(min(values), max(values))
    legend_w = 360
    panel_w = (w - legend_w - 140) // 2
    for k, (title, pick) in enumerate((("MoRF (most relevant removed first)", "morf"),
                                       ("LeRF (least relevant removed first)", "lerf"))):
        left = 70 + k * (panel_w + 60)
        series = [(_COLOURS[i % len(_COLOURS)], s.fractions, getattr(s, pick)) for i, s in enumerate(summaries)]
        _panel(draw, (left, 70, left + panel_w, h - 60), title, series, ticks, font, _y_title(summaries[0]))
    for i, s in enumerate(summaries):
        y = 70 + 18 * i
        draw.line([(w - legend_w, y + 7), (w - legend_w + 20, y + 7)], fill=_COLOURS[i % len(_COLOURS)], width=3)
        draw.text((w - legend_w + 26, y), f"{s.method} ({s.score:+.3f})", fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")
    return path

