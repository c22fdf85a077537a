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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ParameterError
from .explain import Method, Target, explain_all
from .inputs.image import LoadedImage, fit_image, to_tensor
from .metrics.faithfulness import Perturbation, curves
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
    "deletion",
    "deletion:steps=16",
    "random",
)
ImageProgress = Callable[[int, int, str], None]  # (images done, images in all, the last one's name)


@dataclass(frozen=True)
class Row:
    """One map of one image and its faithfulness."""

    image: str
    method: str  # Method.label
    target: str  # the resolved target's label: class:207, embedding, patch:12
    target_description: str
    perturbation: str
    score_kind: str  # cosine | probability
    morf_auc: float
    lerf_auc: float
    score: float  # lerf_auc - morf_auc
    seconds: float  # the explanation alone (its pass and map)
    curve_seconds: float  # this map's share of the batched curve passes
    fractions: tuple[float, ...]
    morf: tuple[float, ...]
    lerf: tuple[float, ...]


@dataclass(frozen=True)
class MethodSummary:
    """Means over the images of one method (and perturbation), with the score's bootstrap interval."""

    method: str
    perturbation: str
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


def evaluate_image(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        name: str,
        methods: Sequence[Method | str] = DEFAULT_METHODS,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
        steps: int = 10,
        seed: int = 0,
) -> list[Row]:
    """Rows for one image ``x`` (1, 3, H, W): each method's map of ``target`` and its curves (random included)."""
    wanted = _with_random(methods)
    run = [m.with_settings(seed=m.settings.seed + seed) if m.name == "random" else m for m in wanted]  # fresh per image
    explanations = explain_all(model, x, methods=run, target=target)
    resolved = explanations[0].target
    measured = curves(model, x, [e.map for e in explanations], target=resolved, perturbation=perturbation,
                      steps=steps)
    return [
        Row(image=name, method=m.label, target=resolved.label, target_description=e.target_description,
            perturbation=perturbation, score_kind=c.score_kind, morf_auc=c.morf_auc, lerf_auc=c.lerf_auc,
            score=c.score, seconds=e.seconds, curve_seconds=c.seconds,
            fractions=tuple(float(v) for v in c.fractions), morf=tuple(float(v) for v in c.morf),
            lerf=tuple(float(v) for v in c.lerf))
        for m, e, c in zip(wanted, explanations, measured, strict=True)
    ]


def evaluate(
        model: torch.nn.Module,
        images: Sequence[tuple[str, Image.Image | LoadedImage]],
        *,
        info: ModelInfo | None = None,
        methods: Sequence[Method | str] = DEFAULT_METHODS,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
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
        rows += evaluate_image(model, x, name=name, methods=methods, target=target, perturbation=perturbation,
                               steps=steps, seed=i)
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
    """One summary per (method, perturbation), in the order the rows first name them."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.perturbation), []).append(r)
    out = []
    for (method, pert), rs in groups.items():
        scores = [r.score for r in rs]
        lo, hi = bootstrap_interval(scores, confidence=confidence, resamples=resamples, seed=seed)
        out.append(MethodSummary(
            method=method, perturbation=pert, n=len(rs), score=float(np.mean(scores)), score_low=lo, score_high=hi,
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
    cols = ["image", "method", "target", "target_description", "perturbation", "score_kind", "morf_auc",
            "lerf_auc", "score", "seconds", "curve_seconds", "fractions", "morf", "lerf"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.image, r.method, r.target, r.target_description, r.perturbation, r.score_kind,
                        f"{r.morf_auc:.6f}", f"{r.lerf_auc:.6f}", f"{r.score:.6f}", f"{r.seconds:.4f}",
                        f"{r.curve_seconds:.4f}", _curve_text(r.fractions), _curve_text(r.morf),
                        _curve_text(r.lerf)])
    return path


def write_summary_csv(summaries: Sequence[MethodSummary], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "perturbation", "n", "score", "score_low_95", "score_high_95", "morf_auc", "lerf_auc",
                    "seconds"])
        for s in summaries:
            w.writerow([s.method, s.perturbation, s.n, f"{s.score:.6f}", f"{s.score_low:.6f}",
                        f"{s.score_high:.6f}", f"{s.morf_auc:.6f}", f"{s.lerf_auc:.6f}", f"{s.seconds:.4f}"])
    return path


def summary_markdown(summaries: Sequence[MethodSummary]) -> str:
    """A Markdown table, most faithful first: score = LeRF AUC - MoRF AUC with its 95% bootstrap interval."""
    lines = ["| method | perturbation | n | score (95% interval) | MoRF AUC | LeRF AUC | s per map |",
             "|---|---|---:|---|---:|---:|---:|"]
    for s in sorted(summaries, key=lambda s: -s.score):
        lines.append(f"| {s.method} | {s.perturbation} | {s.n} | {s.score:.3f} [{s.score_low:.3f}, "
                     f"{s.score_high:.3f}] | {s.morf_auc:.3f} | {s.lerf_auc:.3f} | {s.seconds:.3f} |")
    return "\n".join(lines) + "\n"


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series, lo: float, hi: float, font) -> None:
    """One curve panel in ``box`` (left, top, right, bottom): axes, title and a polyline per (colour, xs, ys)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 14), title, fill=(0, 0, 0), font=font)
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.text((left - 40, y - 6), f"{lo + frac * (hi - lo):.2f}", fill=(0, 0, 0), font=font)
    span = max(hi - lo, 1e-9)
    for colour, xs, ys in series:
        x_max = max(xs[-1], 1e-9)
        pts = [(left + x / x_max * (right - left), bottom - (y - lo) / span * (bottom - top))
               for x, y in zip(xs, ys, strict=True)]
        draw.line(pts, fill=colour, width=2)
    draw.text((left, bottom + 4), f"removed fraction 0 .. {series[0][1][-1]:.1f}", fill=(0, 0, 0), font=font)


def write_plot(summaries: Sequence[MethodSummary], path: str | Path, *, size: tuple[int, int] = (960, 440)) -> Path:
    """The mean MoRF and LeRF curves of each method, side by side, with a legend: a PNG drawn with PIL."""
    if not summaries:
        raise ParameterError("nothing to plot")
    path = Path(path)
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    values = [v for s in summaries for v in (*s.morf, *s.lerf)]
    lo, hi = min(values), max(values)
    panel_w = (w - 300) // 2
    for k, (title, pick) in enumerate((("MoRF (most relevant removed first)", "morf"),
                                       ("LeRF (least relevant removed first)", "lerf"))):
        left = 50 + k * (panel_w + 40)
        series = [(_COLOURS[i % len(_COLOURS)], s.fractions, getattr(s, pick)) for i, s in enumerate(summaries)]
        _panel(draw, (left, 30, left + panel_w, h - 40), title, series, lo, hi, font)
    for i, s in enumerate(summaries):
        y = 30 + 16 * i
        draw.line([(w - 210, y + 6), (w - 190, y + 6)], fill=_COLOURS[i % len(_COLOURS)], width=3)
        draw.text((w - 185, y), f"{s.method} ({s.score:+.3f})", fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")
    return path

