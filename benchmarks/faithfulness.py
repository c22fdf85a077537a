"""Faithfulness of every map vitviz offers on real photos, their on-object mass, and what explaining costs.

``.venv/bin/python benchmarks/faithfulness.py --out benchmarks/results-faithfulness.md [--rows FILE.csv]``

Faithfulness (per photo, the default DINOv2 model at 224 px, the label-free embedding target, token removal,
10 steps): every method's map of the photo (timm's eval crop), its MoRF and LeRF curves of the CLS-embedding
cosine, score = LeRF AUC - MoRF AUC (:mod:`vitviz.faithfulness`). Means with a 95% percentile-bootstrap interval
over the photos (:func:`vitviz.evaluate.bootstrap_interval`, fixed seed).

On-object mass: the same methods on ``benchmarks/scenes.pasted_scene(photo, seed=index)`` (the photo pasted at half
the canvas side on flat grey, so the object's box is known), the share of the map inside the box
(``mass_inside``); a map spread evenly would put 25% there.

Timing (``--timing``): CPU, ``torch.set_num_threads(2)``, interleaved rounds (each variant once per round, the order
rotated), medians, as ratios to the plain fused forward ``model(x)`` of the same input: a gradient explanation
(forward + backward + map) and both curves of one map against their floor, Σ over the perturbed inputs of
(kept tokens / all tokens) × the plain forward (step 0 counted once: MoRF and LeRF share it).

Per-photo rows are appended to ``--rows`` as they are measured, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenes import mass_inside, pasted_scene  # noqa: E402

from vitviz import models as _models  # noqa: E402
from vitviz.evaluate import bootstrap_interval, prepare_image  # noqa: E402
from vitviz.explain import Method, explain, explain_all  # noqa: E402
from vitviz.faithfulness import curves, faithfulness, removed_counts  # noqa: E402
from vitviz.image import to_tensor  # noqa: E402

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
    "random",
)
EXPERIMENT = "experiment: cos(CLS, patch) features"
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
FIELDS = ["index", "photo", "method", "morf_auc", "lerf_auc", "score", "seconds", "mass"]


def load_default(img_size: int = 224):
    """The default model on the CPU in fp32, whichever loader this checkout has."""
    load = getattr(_models, "get_model", None) or _models.load_model
    return load("default", img_size=img_size, device="cpu", precision="fp32")


def photo_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _methods(index: int) -> list[Method]:
    return [replace(m, seed=index) if m.name == "random" else m for m in map(Method.parse, METHODS)]


def feature_similarity(model, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """EXPERIMENT, not a library method: cos(final CLS token, final patch token) per patch, (gh, gw), and seconds.

    A by-product of any forward (DINO's patch features are known to separate the object from the background);
    measured here beside the library's methods to see whether such a map is more faithful.
    """
    t0 = time.perf_counter()
    with torch.inference_mode():
        feats = model.forward_features(x)[0]  # (T, C), normed
        p = int(model.num_prefix_tokens)
        sim = torch.nn.functional.cosine_similarity(feats[p:], feats[:1], dim=-1)
    gh, gw = (int(v) for v in model.patch_embed.grid_size)
    return sim.reshape(gh, gw).clamp(min=0).numpy().astype(np.float32), time.perf_counter() - t0


def measure_photo(model, info, photo: Image.Image, index: int) -> list[dict]:
    """One photo: each method's score (token removal, embedding target) and on-object mass (pasted scene)."""
    x = prepare_image(photo, info)
    methods = _methods(index)
    ex = explain_all(model, x, methods=methods, target="embedding")
    sim, sim_s = feature_similarity(model, x)
    maps = [e.map for e in ex] + [sim]
    cs = curves(model, x, maps, target=ex[0].target, perturbation="tokens", steps=10)
    scene, box = pasted_scene(photo, size=info.img_size[0], seed=index)
    xs = to_tensor(np.asarray(scene), mean=info.mean, std=info.std)
    on = [e.map for e in explain_all(model, xs, methods=methods, target="embedding")]
    on.append(feature_similarity(model, xs)[0])
    seconds = [e.seconds for e in ex] + [sim_s]
    return [
        dict(index=index, method=label, morf_auc=c.morf_auc, lerf_auc=c.lerf_auc, score=c.score, seconds=sec,
             mass=mass_inside(s, box, patch_size=info.patch_size))
        for label, sec, c, s in zip((*METHODS, EXPERIMENT), seconds, cs, on, strict=True)
    ]


def _done(rows_path: Path | None) -> list[dict]:
    if rows_path is None or not rows_path.exists():
        return []
    with rows_path.open(newline="") as f:
        return [{k: (v if k in ("photo", "method") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def measure_all(model, info, paths: Sequence[Path], rows_path: Path | None) -> list[dict]:
    rows = _done(rows_path)
    seen = {int(r["index"]) for r in rows}
    new_file = rows_path is not None and not rows_path.exists()
    f = rows_path.open("a", newline="") if rows_path else None
    writer = csv.DictWriter(f, fieldnames=FIELDS) if f else None
    if writer and new_file:
        writer.writeheader()
    try:
        for index, path in enumerate(paths):
            if index in seen:
                continue
            t0 = time.perf_counter()
            with Image.open(path) as im:
                photo = im.convert("RGB")
            got = measure_photo(model, info, photo, index)
            for r in got:
                r["photo"] = path.name
            rows += got
            if writer:
                writer.writerows(got)
                f.flush()
            print(f"[{index + 1}/{len(paths)}] {path.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        if f:
            f.close()
    return rows


# ---------------------------------------------------------------------------------------------------------- timing


def _interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            t0 = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _floor_units(info, steps: int = 10) -> float:
    """Σ over the perturbed inputs of kept tokens / all tokens: step 0 once, then MoRF and LeRF of each step."""
    n, p = info.num_patches, info.num_prefix_tokens
    return 1 + 2 * sum((p + n - int(k)) / (p + n) for k in removed_counts(n, steps)[1:])


def time_rows(model, info, photo: Image.Image, *, repeats: int = 7, warmup: int = 2) -> tuple[list[str], dict]:
    """Interleaved medians of the plain forward, gradient explanations and one map's curves (tokens, pixels)."""
    x = prepare_image(photo, info)
    heat = explain(model, x, method="rollout:start=1,discard=0.9").map

    def plain():
        with torch.inference_mode():
            model(x)

    fns = {
        "plain": plain,
        "chefer": lambda: explain(model, x, method="chefer", target="embedding"),
        "legrad": lambda: explain(model, x, method="legrad", target="embedding"),
        "gradxattn": lambda: explain(model, x, method="gradxattn", target="embedding"),
        "rollout": lambda: explain(model, x, method="rollout:start=1,discard=0.9", target="embedding"),
        "curves_tokens": lambda: faithfulness(model, x, heat, target="embedding", perturbation="tokens"),
        "curves_pixels": lambda: faithfulness(model, x, heat, target="embedding", perturbation="pixels"),
    }
    t = _interleaved(fns, repeats=repeats, warmup=warmup)
    med = {k: statistics.median(v) for k, v in t.items()}
    floor_tokens = _floor_units(info) * med["plain"]
    floor_pixels = 19 * med["plain"]  # every input is whole: 1 + 2 x 9 full passes
    ratios = {
        "chefer": med["chefer"] / med["plain"], "legrad": med["legrad"] / med["plain"],
        "gradxattn": med["gradxattn"] / med["plain"], "rollout": med["rollout"] / med["plain"],
        "curves_tokens": med["curves_tokens"] / floor_tokens, "curves_pixels": med["curves_pixels"] / floor_pixels,
    }
    labels = {
        "plain": ("plain `model(x)`, fused attention", med["plain"], 1.0, "—"),
        "chefer": ("Chefer explanation: forward + backward + map", med["chefer"], ratios["chefer"], "≤ 2.5× plain"),
        "legrad": ("LeGrad explanation: forward + backward (per layer) + map", med["legrad"], ratios["legrad"],
                   "≤ 2.5× plain"),
        "gradxattn": ("grad×attn explanation", med["gradxattn"], ratios["gradxattn"], "≤ 2.5× plain"),
        "rollout": ("rollout (start 1, discard 0.9): capture + map", med["rollout"], ratios["rollout"], "—"),
        "curves_tokens": (f"both curves, token removal (floor {_floor_units(info):.2f} × plain = "
                          f"{floor_tokens * 1e3:.0f} ms)", med["curves_tokens"], ratios["curves_tokens"],
                          "≤ 1.2× floor"),
        "curves_pixels": (f"both curves, mean fill (floor 19 × plain = {floor_pixels * 1e3:.0f} ms)",
                          med["curves_pixels"], ratios["curves_pixels"], "—"),
    }
    rows = ["| what | median ms | min ms | ratio | target |", "|---|---:|---:|---:|---|"]
    for k, (label, m, ratio, target) in labels.items():
        rows.append(f"| {label} | {m * 1e3:.0f} | {min(t[k]) * 1e3:.0f} | {ratio:.2f}× | {target} |")
    spread = max(statistics.median(v) / min(v) for v in t.values())
    return rows, {"ratios": ratios, "spread": spread}


# ---------------------------------------------------------------------------------------------------------- report


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for label in (*METHODS, EXPERIMENT):
        rs = [r for r in rows if r["method"] == label]
        if not rs:
            continue
        score = [r["score"] for r in rs]
        mass = [r["mass"] for r in rs]
        out.append(dict(
            method=label, n=len(rs), score=float(np.mean(score)), ci=bootstrap_interval(score),
            morf=float(np.mean([r["morf_auc"] for r in rs])), lerf=float(np.mean([r["lerf_auc"] for r in rs])),
            mass=float(np.mean(mass)), mass_ci=bootstrap_interval(mass),
            seconds=float(np.median([r["seconds"] for r in rs])),
        ))
    return out


def report(rows: list[dict], timing: list[str] | None, *, machine: str, n_photos: int,
           minutes: tuple[float, float]) -> str:
    summary = sorted(_summary(rows), key=lambda s: -s["score"])
    lines = [
        "# Faithfulness of vitviz's maps on the shared photos",
        "",
        f"Generated by `benchmarks/faithfulness.py` on {datetime.date.today().isoformat()}; {machine}.",
        f"{n_photos} photos, default model (DINOv2 ViT-S/14, 224 px, 16×16 patches), label-free embedding target, "
        f"token removal, 10 steps (0, 0.1, ..., 0.9 of the patches removed); this run took {minutes[0]:.1f} min "
        f"({minutes[1]:.1f} min of CPU; a resumed run counts its last part only).",
        "",
        "score = LeRF AUC − MoRF AUC of cos(f(x̃), f(x)) (trapezoids over the removed fraction, so at most 0.9); "
        "95% intervals by the percentile bootstrap over the photos (10,000 resamples, seed 0). On-object mass: the "
        "share of the map inside the pasted photo's box on `scenes.pasted_scene(photo, seed=index)` (25% of the "
        "canvas; an even map puts 0.25 there). Seconds: median per map (its own pass(es) and map) at the thread "
        "count above, under whatever else ran on the machine.",
        "",
        "| method | score (95% interval) | MoRF AUC | LeRF AUC | on-object mass (95% interval) | s per map |",
        "|---|---|---:|---:|---|---:|",
    ]
    for s in summary:
        lines.append(f"| {s['method']} | {s['score']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {s['morf']:.3f} | "
                     f"{s['lerf']:.3f} | {s['mass']:.2f} [{s['mass_ci'][0]:.2f}, {s['mass_ci'][1]:.2f}] | "
                     f"{s['seconds']:.3f} |")
    if timing:
        lines += ["", "## Timing (CPU, 2 threads, interleaved medians)", "", *timing]
    return "\n".join(lines) + "\n"


def _machine(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch.set_num_threads({threads}), "
            f"torch {torch.__version__}, timm {timm.__version__}, load average at start {load:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    ap.add_argument("--every", type=int, default=1, help="measure every k-th photo only (a subsample)")
    ap.add_argument("--rows", type=Path, default=None, help="per-photo CSV, appended to and resumed from")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument("--timing", action="store_true", help="also time the explanation and the curves")
    ap.add_argument("--no-faithfulness", action="store_true", help="timing only")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the faithfulness run (timing: 2)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = _machine(args.threads)
    model, info = load_default()
    paths = photo_paths(args.photos)[:: args.every]
    t0, c0 = time.perf_counter(), time.process_time()
    rows = [] if args.no_faithfulness else measure_all(model, info, paths, args.rows)
    minutes = ((time.perf_counter() - t0) / 60, (time.process_time() - c0) / 60)
    timing = None
    if args.timing:
        torch.set_num_threads(2)
        with Image.open(paths[0]) as im:
            timing, extra = time_rows(model, info, im.convert("RGB"), repeats=args.repeats)
        timing.append("")
        timing.append(f"Largest median / minimum over the variants: {extra['spread']:.2f} (above ~1.25 other jobs "
                      "shared the cores during some rounds).")
    text = report(rows, timing, machine=machine, n_photos=len({r["index"] for r in rows}), minutes=minutes)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
