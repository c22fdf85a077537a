"""Inside the tokens of the default model (DINOv2 ViT-S/14, no registers) on the photos, and what the views cost.

Run ``nice -n 10 .venv/bin/python benchmarks/tokens.py --out benchmarks/results-tokens.md`` (a few minutes on
2 CPU threads). It measures, on every photo in ``--photos`` at 224 px centre crop and on the same photo pasted at
half size on a grey canvas (``scenes.pasted_scene(photo, seed=index)``, whose box says object vs background):

- outlier tokens per layer by ``vitviz.tokens.find_outliers``: high-norm tokens and attention sinks (tokens that
  receive outlying attention), and where they sit: object (pasted box, or the DINOv2 PCA foreground on the plain
  photos) or background;
- the layer-0 spikes: which patches the CLS token attends to in layer 0, their share and their norms;
- artefact-aware rollout (``rollout_matrices(..., drop_tokens=...)``) against the current default (layers 1 to
  11, mean fusion, discard 0.9) by on-object mass (``scenes.mass_inside``) on the pasted scenes;
- timings (interleaved medians, ``torch.set_num_threads(--threads)``): the capture with and without tokens next
  to the plain fused ``model(x)``, and the PCA and similarity computations at 224 px, patch 14 and patch 8.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved, median_ms, min_ms, timed  # noqa: E402
from bench import time_interleaved  # noqa: E402
from scenes import mass_inside, pasted_scene  # noqa: E402

from vitviz.analysis.onepass import HALF_STORAGE_BYTES, attention_bytes  # noqa: E402
from vitviz.analysis.rollout import cls_attention, rollout_matrices, rollout_row, tokens_to_grid  # noqa: E402
from vitviz.analysis.tokens import (  # noqa: E402
    best_matches,
    cosine_similarity,
    find_outliers,
    fit_pca,
    foreground_mask,
    pca_rgb,
    received_attention,
    token_norms,
)
from vitviz.inputs.image import fit_image, to_tensor  # noqa: E402
from vitviz.models import get_model  # noqa: E402
from vitviz.walk.capture import attention_forward  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
SUFFIXES = {".jpg", ".jpeg", ".png"}

# the rollout variants: (label, start layer, discard ratio, which tokens to leave out)
VARIANTS = (
    ("current default: layers 1-11, discard 0.9", 1, 0.9, None),
    ("all layers, discard 0 (Abnar & Zuidema)", 0, 0.0, None),
    ("all layers, discard 0.9", 0, 0.9, None),
    ("all layers, artefacts left out, discard 0", 0, 0.0, "any"),
    ("all layers, artefacts left out, discard 0.9", 0, 0.9, "any"),
    ("all layers, sinks (of any layer) left out, discard 0", 0, 0.0, "sinks"),
    ("all layers, sinks (of any layer) left out, discard 0.9", 0, 0.9, "sinks"),
    ("all layers, each layer's sinks and previous block's high-norm tokens left out, discard 0", 0, 0.0, "layer"),
    ("all layers, each layer's sinks and previous block's high-norm tokens left out, discard 0.9", 0, 0.9, "layer"),
    ("layers 1-11, artefacts left out, discard 0.9", 1, 0.9, "any"),
)


# ------------------------------------------------------------------------------------------------------ the pass


def load_photos(folder: Path, limit: int | None) -> list[tuple[str, Image.Image]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)[:limit]
    return [(p.name, Image.open(p).convert("RGB")) for p in files]


def batch_input(images: list[Image.Image], info) -> tuple[torch.Tensor, list[np.ndarray]]:
    fitted = [fit_image(im, input_size=info.img_size, fit="crop", crop_pct=info.crop_pct) for im in images]
    x = torch.cat([to_tensor(f.pixels, mean=info.mean, std=info.std) for f in fitted])
    return x, [f.pixels for f in fitted]


def measure(model, info, images: list[Image.Image]) -> list[dict]:
    """One pass per batch; per image the norms, received attention, outlier flags, PCA foreground and attention."""
    x, _pixels = batch_input(images, info)
    cap = attention_forward(model, x, tokens=True)
    p = info.num_prefix_tokens
    out = []
    for b in range(len(images)):
        norms = token_norms(cap.tokens[b])  # (L, T)
        received = received_attention(cap.attention[b])  # (L, T)
        out.append(dict(
            norms=norms,
            received=received,
            norm_out=find_outliers(norms, num_prefix_tokens=p),  # (L, T)
            sinks=find_outliers(received, num_prefix_tokens=p),  # (L, T)
            cls0=cls_attention(cap.attention[b, :1])[0].numpy(),  # (T,) layer 0, mean over heads
            foreground=foreground_mask(cap.features[b, p:], grid=info.grid),  # (N,) DINOv2 recipe, final features
            attention=cap.attention[b],  # (L, H, T, T), dropped after the rollouts
        ))
    return out


def on_box(box: tuple[int, int, int, int], *, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(N,) bool: the patch's centre lies inside the pasted box."""
    gh, gw = grid
    top, left, bottom, right = box
    cy = (np.arange(gh) + 0.5) * patch_size
    cx = (np.arange(gw) + 0.5) * patch_size
    inside = ((cy >= top) & (cy < bottom))[:, None] & ((cx >= left) & (cx < right))[None, :]
    return inside.reshape(-1)


def drop_mask(rec: dict, how: str | None, num_prefix_tokens: int):
    """The ``drop_tokens`` mask of a variant: artefacts of any layer (T,), or per layer (L, T)."""
    if how is None:
        return None
    if how == "any":
        return torch.from_numpy(rec["norm_out"].any(0) | rec["sinks"].any(0))
    if how == "sinks":
        return torch.from_numpy(rec["sinks"].any(0))
    # per layer: the tokens that receive outlying attention in that layer, and those whose norm was an outlier
    # at the layer's input (the previous block's output)
    prev = np.zeros_like(rec["norm_out"])
    prev[1:] = rec["norm_out"][:-1]
    return torch.from_numpy(rec["sinks"] | prev)


def rollout_masses(rec: dict, info, box) -> list[tuple[float, float]]:
    """(on-object mass, the top patch's share of the map) of each rollout variant (mean fusion)."""
    attn = rec["attention"]
    masses = []
    for _label, start, ratio, how in VARIANTS:
        drop = drop_mask(rec, how, info.num_prefix_tokens)
        if drop is not None and drop.ndim == 2:
            drop = drop[start:]
        mats = rollout_matrices(attn[start:], head_fusion="mean", discard_ratio=ratio, drop_tokens=drop)
        row = rollout_row(mats, start=0, end=mats.shape[0] - 1)
        heat = tokens_to_grid(row, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy()
        masses.append((mass_inside(heat, box, patch_size=info.patch_size), float(heat.max() / heat.sum())))
    return masses


def run_photos(model, info, photos, *, batch: int) -> tuple[list[dict], list[dict]]:
    """(plain records, pasted records); the pasted ones carry their box, on-box patches and rollout masses."""
    plain, pasted = [], []
    for i in range(0, len(photos), batch):
        chunk = photos[i : i + batch]
        for rec in measure(model, info, [im for _n, im in chunk]):
            rec.pop("attention")
            plain.append(rec)
        scenes = [pasted_scene(im, seed=i + j) for j, (_n, im) in enumerate(chunk)]
        for rec, (_canvas, box) in zip(measure(model, info, [c for c, _b in scenes]), scenes, strict=True):
            rec["box"] = box
            rec["on_box"] = on_box(box, grid=info.grid, patch_size=info.patch_size)
            rec["masses"] = rollout_masses(rec, info, box)
            rec.pop("attention")
            pasted.append(rec)
        print(f"  {min(i + batch, len(photos))}/{len(photos)} photos", file=sys.stderr, flush=True)
    return plain, pasted


# ------------------------------------------------------------------------------------------------------ reports


def outlier_table(plain: list[dict], pasted: list[dict], *, key: str, p: int) -> list[str]:
    """Per layer: outlier tokens in all photos, per image, and their share on the object (box / PCA foreground)."""
    depth = plain[0][key].shape[0]
    box_share = np.mean([r["on_box"].mean() for r in pasted])
    fg_share = np.mean([r["foreground"].mean() for r in plain])
    lines = [
        "| layer | plain: tokens (images) | on PCA foreground | pasted: tokens (images) | on the object's box |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer in range(depth):
        cells = []
        for recs, where in ((plain, "foreground"), (pasted, "on_box")):
            flags = [r[key][layer, p:] for r in recs]
            n = int(sum(f.sum() for f in flags))
            imgs = sum(bool(f.any()) for f in flags)
            on = int(sum((f & r[where]).sum() for f, r in zip(flags, recs, strict=True)))
            cells += [f"{n} ({imgs})", f"{on} ({100 * on / n:.0f}%)" if n else "–"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append(f"| all | base rate | {100 * fg_share:.0f}% of patches | | {100 * box_share:.0f}% of patches |")
    return lines


def spike_report(plain: list[dict], pasted: list[dict], *, p: int, grid) -> list[str]:
    """Layer 0: the patches the CLS token attends to most, their share, norms and received attention."""
    rows = []
    for name, recs in (("plain photos", plain), ("pasted scenes", pasted)):
        top1, top2, norm_ratio, norm_rank, recv_ratio, same_sink, in_box, fg = [], [], [], [], [], [], [], []
        positions = {}
        for r in recs:
            c = r["cls0"][p:]
            order = np.argsort(-c)
            top1.append(c[order[0]] / c.sum())
            top2.append(c[order[:2]].sum() / c.sum())
            n0 = r["norms"][0, p:]
            norm_ratio.append(n0[order[0]] / np.median(n0))
            norm_rank.append((n0 < n0[order[0]]).mean())
            rec0 = r["received"][0, p:]
            recv_ratio.append(rec0[order[0]] / np.median(rec0))
            same_sink.append(int(np.argmax(rec0)) == order[0])
            fg.append(r["foreground"][order[0]])
            if "on_box" in r:
                in_box.append(r["on_box"][order[0]])
            positions[int(order[0])] = positions.get(int(order[0]), 0) + 1
        common = max(positions.values())
        rows.append(
            f"| {name} | {100 * np.median(top1):.0f}% ({100 * min(top1):.0f}-{100 * max(top1):.0f}%) | "
            f"{100 * np.median(top2):.0f}% | {np.median(norm_ratio):.2f}x (pct {100 * np.median(norm_rank):.0f}) | "
            f"{np.median(recv_ratio):.0f}x | {100 * np.mean(same_sink):.0f}% | "
            f"{len(positions)} ({common}) | {100 * np.mean(fg):.0f}% | "
            + (f"{100 * np.mean(in_box):.0f}% |" if in_box else "– |")
        )
    head = [
        "| images | top-1 patch's share of the CLS's patch attention, median (range) | top-2 share | top-1's "
        "norm after block 0 / median patch (its percentile) | attention it receives from all queries / median "
        "patch | top-1 is layer 0's top receiver | distinct top-1 positions (most repeated) | top-1 on the PCA "
        "foreground | top-1 in the object's box |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return head + rows


def rollout_report(pasted: list[dict]) -> list[str]:
    both = np.array([r["masses"] for r in pasted])  # (images, variants, 2)
    m, peak = both[..., 0], both[..., 1]
    base = m[:, 0]
    lines = [
        "| rollout (mean fusion) | on-object mass: mean | median | wins vs current default (ties) | mean gain | "
        "top patch's share of the map (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v, (label, *_rest) in enumerate(VARIANTS):
        wins = int((m[:, v] > base + 1e-9).sum())
        ties = int((np.abs(m[:, v] - base) <= 1e-9).sum())
        lines.append(f"| {label} | {m[:, v].mean():.3f} | {np.median(m[:, v]):.3f} | {wins}/{len(m)} ({ties}) | "
                     f"{(m[:, v] - base).mean():+.3f} | {100 * np.median(peak[:, v]):.1f}% |")
    box_share = np.mean([r["on_box"].mean() for r in pasted])
    lines.append(f"| (a uniform map: the box's share of the patches) | {box_share:.3f} | | | | "
                 f"{100 / pasted[0]['on_box'].size:.1f}% |")
    return lines


def blank_check(model, info) -> str:
    """Layer 0 on images without objects: a flat grey canvas (every patch alike) and uniform noise."""
    rng = np.random.default_rng(0)
    blank = Image.new("RGB", (224, 224), (128, 128, 128))
    noise = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    p = info.num_prefix_tokens
    parts = []
    for name, rec in zip(("a flat grey image", "uniform noise"), measure(model, info, [blank, noise]), strict=True):
        c = rec["cls0"][p:]
        r = rec["received"][0, p:]
        parts.append(f"{name}: top-1 patch {100 * c.max() / c.sum():.1f}% of the CLS's patch attention, it "
                     f"receives {r.max() / np.median(r):.1f}x the median")
    return "Layer 0 on images without objects: " + "; ".join(parts) + "."


def foreground_check(pasted: list[dict]) -> str:
    prec = [(r["foreground"] & r["on_box"]).sum() / max(r["foreground"].sum(), 1) for r in pasted]
    rec = [(r["foreground"] & r["on_box"]).sum() / max(r["on_box"].sum(), 1) for r in pasted]
    share = [r["foreground"].mean() for r in pasted]
    return (f"On the pasted scenes the PCA foreground (final normed patch features, first component > 0, oriented "
            f"so that the border scores below 0) covers {100 * np.median(share):.0f}% of the patches (median); "
            f"{100 * np.median(prec):.0f}% of it lies in the object's box (median precision; mean "
            f"{100 * np.mean(prec):.0f}%) and it covers {100 * np.median(rec):.0f}% of the box (median recall).")


# ------------------------------------------------------------------------------------------------------ timings


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2
                         ) -> dict[str, list[float]]:
    """Like ``bench.time_interleaved`` but reading the process's CPU time (all threads): on a machine shared
    with other jobs, time spent waiting for a core is not counted. Meant for one thread (no spinning workers)."""
    with torch.inference_mode():
        return interleaved(fns, repeats=repeats, warmup=warmup, clock=time.process_time)


def _median_ms(times: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {k: (median_ms(v), min_ms(v)) for k, v in times.items()}


def capture_rows(name: str, model, info, x: torch.Tensor, *, repeats: int, cpu_clock: bool = False) -> list[str]:
    """The capture with and without tokens next to the plain fused forward, interleaved."""
    need = attention_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens)
    store = torch.float16 if need > HALF_STORAGE_BYTES else torch.float32  # as analyze_batch decides
    fns: dict[str, Callable[[], object]] = {
        "plain `model(x)` (fused attention)": lambda: model(x),
        "capture, no features (today's analysis pass)": lambda: attention_forward(
            model, x, store_dtype=store, features=False),
        "capture, no features, **tokens kept**": lambda: attention_forward(
            model, x, store_dtype=store, features=False, tokens=True),
        "capture with features": lambda: attention_forward(model, x, store_dtype=store),
        "capture with features, **tokens kept**": lambda: attention_forward(model, x, store_dtype=store, tokens=True),
    }
    timer = time_cpu_interleaved if cpu_clock else functools.partial(time_interleaved, device=torch.device("cpu"))
    res = _median_ms(timer(fns, repeats=repeats, warmup=2))
    floor_med, floor_min = res[next(iter(fns))]
    store_name = str(store).removeprefix("torch.")
    return [f"| {name} | {info.num_tokens} | {store_name} | {label} | {med:.1f} | {mn:.1f} | {med / floor_med:.2f} | "
            f"{mn / floor_min:.2f} |" for label, (med, mn) in res.items()]


def view_rows(name: str, model, info, x2: torch.Tensor, *, repeats: int) -> list[str]:
    """PCA, foreground, similarity and artefact computations on a real capture of two images (one pass)."""
    need = attention_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens) * 2
    store = torch.float16 if need > HALF_STORAGE_BYTES else torch.float32
    cap = attention_forward(model, x2, store_dtype=store, tokens=True)
    p, layer = info.num_prefix_tokens, info.depth - 1
    a, b = cap.tokens[0, layer, p:], cap.tokens[1, layer, p:]  # (N, D) each, in the store dtype
    feats = cap.features[0, p:]
    q = info.num_patches // 2 + info.grid[1] // 2  # a patch near the centre
    fns: dict[str, Callable[[], object]] = {
        "PCA of one image's patches at a layer (fit + RGB)": lambda: pca_rgb(fit_pca(a), a),
        "PCA, shared basis for two images (fit on both + 2 RGB)": lambda: [
            pca_rgb(pca, t) for pca in [fit_pca([a, b])] for t in (a, b)],
        "PCA foreground mask (1 component)": lambda: foreground_mask(feats, grid=info.grid),
        "similarity: clicked patch vs every patch": lambda: cosine_similarity(a[q : q + 1], a),
        "correspondence: clicked patch's 5 best matches in image 2": lambda: best_matches(a[q : q + 1], b, k=5),
        "correspondence: every patch's best match in image 2": lambda: best_matches(a, b),
        "norms + outliers, all layers (once per analysis)": lambda: find_outliers(
            token_norms(cap.tokens[0]), num_prefix_tokens=p),
        "received attention + sinks, all layers (once per analysis)": lambda: find_outliers(
            received_attention(cap.attention[0]), num_prefix_tokens=p),
    }
    res = _median_ms(time_interleaved(fns, device=torch.device("cpu"), repeats=repeats, warmup=2))
    return [f"| {name} | {info.num_patches} x {a.shape[-1]} | {label} | {med:.1f} | {mn:.1f} |"
            for label, (med, mn) in res.items()]


# ---------------------------------------------------------------------------------------------------------- main


def header(threads: int) -> list[str]:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    import timm

    return [f"CPU {cpu}, {os.cpu_count()} cores, torch.set_num_threads({threads}); torch {torch.__version__}, "
            f"timm {timm.__version__}, python {platform.python_version()}; numpy's BLAS threads: "
            f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset (one per core)')}; load average "
            f"at start {os.getloadavg()[0]:.2f}. {datetime.datetime.now():%Y-%m-%d %H:%M}."]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    ap.add_argument("--limit", type=int, default=None, help="only the first N photos (sorted by name)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds of the capture rows at patch 14")
    ap.add_argument("--p8-repeats", type=int, default=5, help="timed rounds of the capture rows at patch 8")
    ap.add_argument("--view-repeats", type=int, default=15, help="timed rounds of the view rows")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing sections")
    ap.add_argument("--only-timing", action="store_true", help="only the timing sections (no photo measurements)")
    ap.add_argument("--no-capture", action="store_true", help="time the view computations only")
    ap.add_argument("--no-views", action="store_true", help="time the capture only")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="capture rows by process CPU time, not wall time (with --threads 1 on a busy machine)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    def sections() -> list[str]:
        lines = ["# Inside the tokens: the default model on the photos, and what the views cost", "",
                 *header(args.threads)]
        photos = load_photos(args.photos, args.limit)
        if not args.only_timing:
            lines += photo_sections(photos, batch=args.batch)
        if not args.no_timing:
            lines += timing_sections(args, photos)
        return lines

    lines, seconds = timed(sections)
    lines += ["", f"Total run time {seconds:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def photo_sections(photos, *, batch: int) -> list[str]:
    model, info = get_model("default", img_size=(224, 224))
    with torch.inference_mode():
        plain, pasted = run_photos(model, info, photos, batch=batch)
        blank = blank_check(model, info)
    p = info.num_prefix_tokens
    lines = ["", f"## Outliers on {len(photos)} photos ({info.name}, {info.grid[0]}x{info.grid[1]} patches)", ""]
    for key, what in (("norm_out", "High-norm tokens"), ("sinks", "Attention sinks (received attention)")):
        lines += [f"### {what}: outlier tokens per layer (`find_outliers`)", "", *outlier_table(
            plain, pasted, key=key, p=p), ""]
    return lines + ["### Layer 0: what the CLS token attends to", "", *spike_report(plain, pasted, p=p, grid=info.grid),
                    "", blank, "", foreground_check(pasted), "", "## Artefact-aware rollout on the pasted scenes", "",
                    *rollout_report(pasted), ""]


def timing_sections(args, photos) -> list[str]:
    clock = "process CPU time" if args.cpu_clock else "wall time"
    cap_lines = ["## Capture cost with and without tokens (interleaved)", "",
                 f"Median (and minimum) {clock} of {args.repeats} (patch 14) and {args.p8_repeats} (patch 8) "
                 "interleaved rounds after 2 warm-up rounds, one image; the storage dtype is the one `analyze` "
                 "picks.", "",
                 "| case | tokens | storage | row | median ms | min ms | x plain (medians) | x plain (minima) |",
                 "|---|---:|---|---|---:|---:|---:|---:|"]
    view_lines = ["## View computations (ms, interleaved)", "",
                  f"Median (and minimum) of {args.view_repeats} rounds on a real "
                  "capture of two photos, last layer; the app's control-change budget is 100 ms.", "",
                  "| case | patches x width | computation | median ms | min ms |", "|---|---:|---|---:|---:|"]
    for name, patch in (("default-p14", None), ("default-p8", 8)):
        model, info = get_model("default", patch_size=patch, img_size=(224, 224))
        x2, _ = batch_input([im for _n, im in photos[:2]], info)
        with torch.inference_mode():
            if not args.no_capture:
                cap_lines += capture_rows(name, model, info, x2[:1], repeats=args.p8_repeats if patch else args.repeats,
                                          cpu_clock=args.cpu_clock)
            if not args.no_views:
                view_lines += view_rows(name, model, info, x2, repeats=args.view_repeats)
        print(f"  timed {name}", file=sys.stderr, flush=True)
    return ([] if args.no_capture else [*cap_lines, ""]) + ([] if args.no_views else view_lines)


if __name__ == "__main__":
    main()
