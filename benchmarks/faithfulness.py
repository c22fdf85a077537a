"""Faithfulness of every map vitviz offers on real photos, whether it stays on the object, and what it costs.

``.venv/bin/python benchmarks/faithfulness.py --out benchmarks/results-faithfulness.md [--rows FILE.csv]``

Faithfulness (per photo, the default DINOv2 model at 224 px, the label-free embedding target, 10 steps): every
method's map of the photo (timm's eval crop), its MoRF and LeRF curves of the CLS-embedding cosine, score = LeRF
AUC - MoRF AUC (:mod:`vitviz.faithfulness`), by token removal (the app's measure) and by filling patches with the
image's mean (Chefer et al.'s protocol, and one that greedy deletion never sees). Means with a 95%
percentile-bootstrap interval over the photos (:func:`vitviz.evaluate.bootstrap_interval`, fixed seed).

On the object: the same methods on ``benchmarks/scenes.pasted_scene(photo, seed=index)`` (the photo pasted at half
the canvas side on flat grey, so the object's box is known): the share of the map's mass inside the box
(``mass_inside``) and the share of its top patches inside it (:func:`top_inside`); an even or a random map
scores 0.25 on both.

Timing (``--timing``): CPU, interleaved rounds (each variant once per round, the order rotated), medians and
minima, as ratios to the plain fused forward ``model(x)`` of the same input; both curves of one map against their
floor, Σ over the perturbed inputs of (kept tokens / all tokens) × the plain forward (step 0 counted once: MoRF and
LeRF share it). Wall clock at 2 threads, then CPU time at 1 thread.

Per-photo rows are appended to ``--rows`` as they are measured, so an interrupted run resumes where it stopped;
``--shard PART/COUNT`` splits the photos between processes (concatenate their rows files, then report from it).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved, median_ms, min_ms, timed  # noqa: E402
from scenes import mass_inside, pasted_scene  # noqa: E402

from vitviz import models as _models  # noqa: E402
from vitviz.evaluate import bootstrap_interval, prepare_image  # noqa: E402
from vitviz.explain import Method, explain, explain_all  # noqa: E402
from vitviz.inputs.image import to_tensor  # noqa: E402
from vitviz.metrics.faithfulness import curves, faithfulness, removed_counts  # noqa: E402

__all__ = ["METHODS", "load_default", "measure_photo", "time_rows", "report", "main"]

METHODS: tuple[str, ...] = (
    "rollout",  # all layers, no discard
    "rollout:start=1",
    "rollout:discard=0.9",
    "rollout:start=1,discard=0.9",  # the app's default before this measurement
    "rollout:start=1,discard=0.9,fusion=max",
    "raw",  # the last layer's CLS attention
    "chefer",
    "legrad",  # all layers (the paper)
    "legrad:start=-2",  # the authors' wrapper default: the last two layers
    "gradxattn",
    "deletion",  # greedy token deletion, 32 steps
    "deletion:steps=16",
    "random",
)
EXPERIMENT = "experiment: cos(CLS, patch) features"
BASELINE = "rollout:start=1,discard=0.9"  # the app's default before greedy deletion was measured: Δ is against it
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
FIELDS = ["index", "photo", "method", "morf_auc", "lerf_auc", "score", "pixel_morf_auc", "pixel_lerf_auc",
          "pixel_score", "seconds", "mass", "top_inside"]


def load_default(img_size: int = 224):
    """The default model on the CPU in fp32, whichever loader this checkout has."""
    load = getattr(_models, "get_model", None) or _models.load_model
    return load("default", img_size=img_size, device="cpu", precision="fp32")


def photo_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _methods(index: int) -> list[Method]:
    return [m.with_settings(seed=index) if m.name == "random" else m for m in map(Method.parse, METHODS)]


def feature_similarity(model, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """EXPERIMENT, not a library method: cos(final CLS token, final patch token) per patch, (gh, gw), and seconds.

    A by-product of any forward (DINO's patch features are known to separate the object from the background);
    measured here beside the library's methods to see whether such a map is more faithful.
    """
    def run() -> np.ndarray:
        with torch.inference_mode():
            feats = model.forward_features(x)[0]  # (T, C), normed
            p = int(model.num_prefix_tokens)
            sim = torch.nn.functional.cosine_similarity(feats[p:], feats[:1], dim=-1)
        gh, gw = (int(v) for v in model.patch_embed.grid_size)
        return sim.reshape(gh, gw).clamp(min=0).numpy().astype(np.float32)

    return timed(run)


def top_inside(heat: np.ndarray, box: tuple[int, int, int, int], *, patch_size: int) -> float:
    """Share of the map's top patches inside ``box``, as many as there are patches with their centre in it (a
    ranking measure, blind to the map's scale; a random ranking scores the box's share of the grid, 0.25 here)."""
    gh, gw = heat.shape
    top, left, bottom, right = box
    cy, cx = (np.arange(gh) + 0.5) * patch_size, (np.arange(gw) + 0.5) * patch_size
    inside = ((cy[:, None] >= top) & (cy[:, None] < bottom) & (cx[None] >= left) & (cx[None] < right)).reshape(-1)
    first = np.argsort(-np.asarray(heat, dtype=np.float64).reshape(-1), kind="stable")[: int(inside.sum())]
    return float(inside[first].mean())


def measure_photo(model, info, photo: Image.Image, index: int) -> list[dict]:
    """One photo: each method's score (token removal and pixel filling, embedding target) and on-object measures
    (pasted scene)."""
    x = prepare_image(photo, info)
    methods = _methods(index)
    ex = explain_all(model, x, methods=methods, target="embedding")
    sim, sim_s = feature_similarity(model, x)
    maps = [e.map for e in ex] + [sim]
    cs = curves(model, x, maps, target=ex[0].target, perturbation="tokens", steps=10)
    cp = curves(model, x, maps, target=ex[0].target, perturbation="pixels", steps=10)
    scene, box = pasted_scene(photo, size=info.img_size[0], seed=index)
    xs = to_tensor(np.asarray(scene), mean=info.mean, std=info.std)
    on = [e.map for e in explain_all(model, xs, methods=methods, target="embedding")]
    on.append(feature_similarity(model, xs)[0])
    seconds = [e.seconds for e in ex] + [sim_s]
    return [
        dict(index=index, method=label, morf_auc=c.morf_auc, lerf_auc=c.lerf_auc, score=c.score,
             pixel_morf_auc=d.morf_auc, pixel_lerf_auc=d.lerf_auc, pixel_score=d.score, seconds=sec,
             mass=mass_inside(s, box, patch_size=info.patch_size),
             top_inside=top_inside(s, box, patch_size=info.patch_size))
        for label, sec, c, d, s in zip((*METHODS, EXPERIMENT), seconds, cs, cp, on, strict=True)
    ]


def _done(rows_path: Path | None) -> list[dict]:
    if rows_path is None or not rows_path.exists():
        return []
    with rows_path.open(newline="") as f:
        return [{k: (v if k in ("photo", "method") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def measure_all(model, info, paths: Sequence[Path], rows_path: Path | None,
                shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Every photo (index i with i % count == part for ``shard`` (part, count)) not yet in ``rows_path``."""
    rows = _done(rows_path)
    seen = {int(r["index"]) for r in rows} | {i for i in range(len(paths)) if i % shard[1] != shard[0]}
    new_file = rows_path is not None and not rows_path.exists()
    f = rows_path.open("a", newline="") if rows_path else None
    writer = csv.DictWriter(f, fieldnames=FIELDS) if f else None
    if writer and new_file:
        writer.writeheader()
    try:
        for index, path in enumerate(paths):
            if index in seen:
                continue
            def one(path=path, index=index) -> list[dict]:
                with Image.open(path) as im:
                    photo = im.convert("RGB")
                return measure_photo(model, info, photo, index)

            got, seconds = timed(one)
            for r in got:
                r["photo"] = path.name
            rows += got
            if writer:
                writer.writerows(got)
                f.flush()
            print(f"[{index + 1}/{len(paths)}] {path.name}: {seconds:.1f} s", flush=True)
    finally:
        if f:
            f.close()
    return rows


# ---------------------------------------------------------------------------------------------------------- timing


def _floor_units(info, steps: int = 10) -> float:
    """Σ over the perturbed inputs of kept tokens / all tokens: step 0 once, then MoRF and LeRF of each step."""
    n, p = info.num_patches, info.num_prefix_tokens
    return 1 + 2 * sum((p + n - int(k)) / (p + n) for k in removed_counts(n, steps)[1:])


def _work(model, x, heat) -> dict[str, tuple[str, Callable[[], object], str]]:
    """name -> (row label, the work, target) of every timing row."""
    def plain():
        with torch.inference_mode():
            model(x)

    def ex(method):
        return lambda: explain(model, x, method=method, target="embedding")

    return {
        "plain": ("plain `model(x)`, fused attention", plain, "—"),
        "chefer": ("Chefer explanation: forward + backward + map", ex("chefer"), "≤ 2.5× plain"),
        "legrad": ("LeGrad explanation: forward + per-layer backward + map", ex("legrad"), "≤ 2.5× plain"),
        "gradxattn": ("grad×attn explanation (backward through the last block)", ex("gradxattn"), "≤ 2.5× plain"),
        "lrp": ("AttnLRP explanation (γ-rule, the default γ): forward + backward under the relevance rules",
                ex("lrp"), "≤ 2.5× plain"),
        "lrp0": ("AttnLRP explanation, LRP-0 (`lrp:gamma=0`)", ex("lrp:gamma=0"), "≤ 2.5× plain"),
        "lrp_top4": ("AttnLRP explanation, γ-rule in the last 4 blocks only (`lrp:gamma_from=-4`)",
                     ex("lrp:gamma_from=-4"), "≤ 2.5× plain"),
        "lrp_top2": ("AttnLRP explanation, γ-rule in the last 2 blocks only (`lrp:gamma_from=-2`)",
                     ex("lrp:gamma_from=-2"), "≤ 2.5× plain"),
        "rollout": ("rollout (start 1, discard 0.9): capture + map", ex(BASELINE), "—"),
        "deletion": ("greedy deletion, 32 steps (the default)", ex("deletion"), "— (not one pass)"),
        "deletion16": ("greedy deletion, 16 steps", ex("deletion:steps=16"), "— (not one pass)"),
        "curves_tokens": ("both curves of one map, token removal", lambda: faithfulness(
            model, x, heat, target="embedding", perturbation="tokens"), "≤ 1.2× floor"),
        "curves_pixels": ("both curves of one map, mean fill", lambda: faithfulness(
            model, x, heat, target="embedding", perturbation="pixels"), "≤ 1.2× floor"),
        "curves_blur": ("both curves of one map, blur", lambda: faithfulness(
            model, x, heat, target="embedding", perturbation="blur"), "≤ 1.2× floor"),
        "curves_road": ("both curves of one map, ROAD imputation", lambda: faithfulness(
            model, x, heat, target="embedding", perturbation="road"), "≤ 1.2× floor"),
    }


def time_rows(model, info, photo: Image.Image, *, repeats: int = 7, warmup: int = 2,
              clock: Callable[[], float] = time.perf_counter) -> tuple[list[str], float]:
    """Interleaved medians (and minima) of the plain forward, each explanation and one map's curves, as ratios to
    the plain forward (the curves: to their floor). Returns the table's rows and the largest median / minimum."""
    x = prepare_image(photo, info)
    work = _work(model, x, explain(model, x, method=BASELINE).map)
    t = interleaved({k: v[1] for k, v in work.items()}, repeats=repeats, warmup=warmup, clock=clock)
    med = {k: median_ms(v) for k, v in t.items()}
    low = {k: min_ms(v) for k, v in t.items()}
    units = {"curves_tokens": _floor_units(info), **dict.fromkeys(("curves_pixels", "curves_blur", "curves_road"),
                                                                  19.0)}  # 19: 1 + 2 × 9 whole inputs
    rows = ["| what | median ms | min ms | ratio of medians | ratio of minima | target |",
            "|---|---:|---:|---:|---:|---|"]
    for k, (label, _fn, target) in work.items():
        u = units.get(k, 1.0)
        if k in units:
            label = f"{label}; floor {u:.2f} × plain"
        rows.append(f"| {label} | {med[k]:.0f} | {low[k]:.0f} | {med[k] / (u * med['plain']):.2f}× | "
                    f"{low[k] / (u * low['plain']):.2f}× | {target} |")
    return rows, max(med[k] / low[k] for k in t)


# ---------------------------------------------------------------------------------------------------------- report


def _mean_ci(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    return float(np.mean(values)), bootstrap_interval(values)


def _summary(rows: list[dict]) -> list[dict]:
    base = {int(r["index"]): r["score"] for r in rows if r["method"] == BASELINE}
    out = []
    for label in (*METHODS, EXPERIMENT):
        rs = [r for r in rows if r["method"] == label]
        if not rs:
            continue
        delta = [r["score"] - base[int(r["index"])] for r in rs if int(r["index"]) in base]
        out.append(dict(
            method=label, n=len(rs), score=_mean_ci([r["score"] for r in rs]),
            delta=_mean_ci(delta) if delta else (float("nan"), (float("nan"), float("nan"))),
            morf=float(np.mean([r["morf_auc"] for r in rs])), lerf=float(np.mean([r["lerf_auc"] for r in rs])),
            pixel=_mean_ci([r["pixel_score"] for r in rs]), mass=_mean_ci([r["mass"] for r in rs]),
            top=_mean_ci([r["top_inside"] for r in rs]), seconds=float(np.median([r["seconds"] for r in rs])),
        ))
    return sorted(out, key=lambda s: -s["score"][0])


def _ci(v: tuple[float, tuple[float, float]], fmt: str = ".3f", sign: str = "") -> str:
    m, (lo, hi) = v
    return f"{m:{sign}{fmt}} [{lo:{sign}{fmt}}, {hi:{sign}{fmt}}]"


def table(rows: list[dict]) -> list[str]:
    """The Markdown table of every method's means over the photos, most faithful first."""
    lines = [f"| method | score, token removal (95% interval) | Δ vs {BASELINE} | MoRF AUC | LeRF AUC | "
             "score, pixel fill | on-object mass | top patches on object | s per map |",
             "|---|---|---|---:|---:|---|---|---|---:|"]
    for s in _summary(rows):
        lines.append(f"| {s['method']} | {_ci(s['score'])} | {_ci(s['delta'], sign='+')} | {s['morf']:.3f} | "
                     f"{s['lerf']:.3f} | {_ci(s['pixel'])} | {_ci(s['mass'], '.2f')} | {_ci(s['top'], '.2f')} | "
                     f"{s['seconds']:.2f} |")
    return lines


def subsets(rows: list[dict]) -> list[str]:
    """Mean token-removal scores on the ImageNet validation photos (``n0…`` names) and the first 20 of them, beside
    all photos: the issue's "for scale" numbers came from 20 ImageNet photos."""
    imagenet = sorted({r["photo"] for r in rows if str(r["photo"]).startswith("n0")})
    groups = {"all": None, f"{len(imagenet)} ImageNet": set(imagenet), "first 20 ImageNet": set(imagenet[:20])}
    lines = ["| method | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for s in _summary(rows):
        cells = []
        for names in groups.values():
            got = [r["score"] for r in rows if r["method"] == s["method"] and (names is None or r["photo"] in names)]
            cells.append(f"{np.mean(got):.3f}" if got else "—")
        lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
    return lines


def report(rows: list[dict], timing: list[str] | None, *, machine: str, n_photos: int,
           minutes: tuple[float, float]) -> str:
    lines = [
        "# Faithfulness of vitviz's maps on the shared photos",
        "",
        f"Generated by `benchmarks/faithfulness.py` on {datetime.date.today().isoformat()}; {machine}.",
        f"{n_photos} photos, default model (DINOv2 ViT-S/14, 224 px, 16×16 patches), label-free embedding target, "
        f"10 steps (0, 0.1, ..., 0.9 of the patches removed); this run took {minutes[0]:.1f} min "
        f"({minutes[1]:.1f} min of CPU; a resumed run counts its last part only).",
        "",
        "score = LeRF AUC − MoRF AUC of cos(f(x̃), f(x)) (trapezoids over the removed fraction, so at most 0.9), "
        "by token removal and, in its own column, by filling the patches with the image's mean; 95% intervals by "
        "the percentile bootstrap over the photos (10,000 resamples, seed 0), Δ per photo (paired). On-object: "
        "on `scenes.pasted_scene(photo, seed=index)` (the photo at half the canvas side on grey, 25% of the "
        "canvas), the map's mass inside the box and the share of its top patches inside it (as many as the box "
        "holds); an even or random map scores 0.25 on both. Seconds: median per map (its own pass(es) and map).",
        "",
        *table(rows),
        "",
        "Token-removal score by subset of the photos:",
        "",
        *subsets(rows),
    ]
    if timing:
        lines += ["", "## Timing (CPU, interleaved rounds)", "", *timing]
    return "\n".join(lines) + "\n"


def _machine(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch.set_num_threads({threads}), "
            f"torch {torch.__version__}, timm {timm.__version__}, load average at start {load:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    ap.add_argument("--every", type=int, default=1, help="measure every k-th photo only (a subsample)")
    ap.add_argument("--shard", default="0/1", help="PART/COUNT: this process measures photo i if i %% COUNT == PART")
    ap.add_argument("--rows", type=Path, default=None, help="per-photo CSV, appended to and resumed from")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument("--timing", action="store_true", help="also time the explanations and the curves")
    ap.add_argument("--no-faithfulness", action="store_true", help="timing only")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the faithfulness run")
    return ap.parse_args(argv)


def _timing(model, info, path: Path, repeats: int) -> list[str]:
    """Wall clock at 2 threads, then this process's CPU time at 1 thread (less sensitive to other jobs)."""
    out = []
    for threads, clock, what in ((2, time.perf_counter, "Wall clock"), (1, time.process_time, "CPU time")):
        torch.set_num_threads(threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        with Image.open(path) as im:
            rows, spread = time_rows(model, info, im.convert("RGB"), repeats=repeats, clock=clock)
        out += [f"{what}, `torch.set_num_threads({threads})`, load average {load:.2f} before:", "", *rows, "",
                f"Largest median / minimum: {spread:.2f}.", ""]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = _machine(args.threads)
    model, info = load_default()
    paths = photo_paths(args.photos)[:: args.every]
    part, count = (int(v) for v in args.shard.split("/"))
    def measured() -> list[dict]:
        return [] if args.no_faithfulness else measure_all(model, info, paths, args.rows, (part, count))

    (rows, cpu_seconds), wall_seconds = timed(lambda: timed(measured, clock=time.process_time))
    minutes = (wall_seconds / 60, cpu_seconds / 60)
    timing = _timing(model, info, paths[0], args.repeats) if args.timing else None
    text = report(rows, timing, machine=machine, n_photos=len({r["index"] for r in rows}), minutes=minutes)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
