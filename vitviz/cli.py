"""Command line: ``vitviz analyze IMAGE... --out DIR`` (also ``python -m vitviz``).

Per image it writes ``STEM.png`` (rollout overlay on what the model saw) and ``STEM.npz`` (maps, geometry,
settings; with ``--save-attention`` also every layer's attention), plus ``summary.csv`` for the batch. A bad image is
reported in one line and skipped; the exit code is 1 when any image failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import __version__
from .errors import VitvizError

__all__ = ["main", "build_parser", "collect_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def build_parser() -> argparse.ArgumentParser:
    from .analysis import DEFAULTS

    d = DEFAULTS
    parser = argparse.ArgumentParser(prog="vitviz", description="See how a Vision Transformer reads images.")
    parser.add_argument("--version", action="version", version=f"vitviz {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="rollout overlays and arrays for images or folders of images")
    a.add_argument("images", nargs="+", type=Path, help="image files or folders (their images, not recursive)")
    a.add_argument("--out", type=Path, required=True, help="output folder (created)")
    a.add_argument("--model", default=d.model, help="'default', a timm model name, or a checkpoint file")
    a.add_argument("--arch", default=None, help="timm architecture of a checkpoint file without metadata")
    a.add_argument("--patch-size", type=int, default=d.patch_size, help="patch size (default: the model's own)")
    a.add_argument("--img-size", type=int, default=d.img_size, help=f"input size in px (default {d.img_size})")
    a.add_argument("--fit", choices=["crop", "whole"], default=d.fit, help="centre crop (timm eval) or whole image")
    a.add_argument("--start-layer", type=int, default=d.start_layer, help=f"first layer (default {d.start_layer})")
    a.add_argument("--end-layer", type=int, default=d.end_layer, help="last layer, -1 = last (default)")
    a.add_argument("--head-fusion", choices=["mean", "max", "min"], default=d.head_fusion)
    a.add_argument("--discard", type=float, default=d.discard_ratio, help="discard ratio in [0, 1)")
    a.add_argument("--device", default=d.device, help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps")
    a.add_argument("--precision", default=d.precision, help="auto, fp32, fp16 or bf16 (GPU only)")
    a.add_argument("--batch-size", type=int, default=None, help="images per pass (default: 16 on GPU, 1 on CPU)")
    a.add_argument("--opacity", type=float, default=0.6, help="overlay opacity in the PNG")
    a.add_argument("--save-attention", action="store_true", help="also store attention (L x H x T x T) in the npz")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); missing paths are kept to be reported."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(p)
    return found


def _stems(paths: list[Path]) -> list[str]:
    """Output stems, unique even when inputs share a name (a.jpg and a.png, two folders, or an 'a-2.jpg' too)."""
    used: set[str] = set()
    out = []
    for p in paths:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.stem) or "image"
        name, n = stem, 1
        while name.lower() in used:  # lower: case-insensitive file systems
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        out.append(name)
    return out


def _progress(total: int, quiet: bool):
    if quiet or total <= 1:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .analysis import DEFAULTS, analyze_with_fallback, get_model, input_size_for, native_patch_size, rollout_map
    from .device import pick_device, pick_dtype
    from .figures import overlay_png
    from .image import load_image
    from .models import resolve_sizes

    settings = replace(
        DEFAULTS,
        model=args.model,
        patch_size=args.patch_size,
        img_size=args.img_size,
        fit=args.fit,
        start_layer=args.start_layer,
        end_layer=args.end_layer,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard,
        device=args.device,
        precision=args.precision,
    )
    settings.check()
    if not 0.0 <= args.opacity <= 1.0:
        raise VitvizError(f"opacity must be in [0, 1], got {args.opacity}")
    device = pick_device(settings.device)
    dtype = pick_dtype(device, settings.precision)
    batch = args.batch_size if args.batch_size is not None else (16 if device.type != "cpu" else 1)
    if batch < 1:
        raise VitvizError(f"batch size must be at least 1, got {batch}")
    paths = collect_images(args.images)
    if not paths:
        raise VitvizError("no images found in the given paths")
    args.out.mkdir(parents=True, exist_ok=True)

    native = native_patch_size(settings.model, arch=args.arch)
    patch, square = resolve_sizes(native_patch_size=native, patch_size=settings.patch_size, img_size=settings.img_size)
    _, probe_info = get_model(settings.model, patch_size=patch, img_size=square, device=str(device), dtype=dtype,
                              arch=args.arch)
    settings.layer_range(probe_info.depth)  # a bad layer range is refused before any image is run

    failures, rows = 0, []
    bar = _progress(len(paths), args.quiet)
    pending: list[tuple[Path, str, object]] = []

    def flush() -> None:
        nonlocal failures
        if not pending:
            return
        size = input_size_for(pending[0][2].image, img_size=settings.img_size, patch_size=patch, fit=settings.fit)

        def load(dev: str):
            return get_model(settings.model, patch_size=patch, img_size=size, device=dev,
                             dtype=dtype if dev == str(device) else torch.float32, arch=args.arch)

        try:
            results, notice = analyze_with_fallback(load, [p[2] for p in pending], device=str(device), fit=settings.fit)
        except VitvizError as exc:
            for path, _stem, _im in pending:
                failures += 1
                print(f"vitviz: {path}: {exc}", file=sys.stderr)
            pending.clear()
            return
        if notice:
            print(f"vitviz: {notice}", file=sys.stderr)
        for (path, stem, loaded), res in zip(pending, results, strict=True):
            rows.append(_write(args, settings, path, stem, loaded, res, rollout_map, overlay_png))
        if bar:
            bar.update(len(pending))
        pending.clear()

    for path, stem in zip(paths, _stems(paths), strict=True):
        try:
            loaded = load_image(path, name=path.name)
        except (VitvizError, OSError) as exc:
            failures += 1
            print(f"vitviz: {path}: {exc}", file=sys.stderr)
            if bar:
                bar.update(1)
            continue
        if pending and (settings.fit == "whole" or len(pending) >= batch):
            flush()
        pending.append((path, stem, loaded))
    flush()
    if bar:
        bar.close()
    _write_summary(args.out / "summary.csv", rows)
    ok = len(rows)
    print(f"vitviz: {ok} of {len(paths)} image(s) written to {args.out}" + (f", {failures} failed" if failures else ""),
          file=sys.stderr)
    return 1 if failures else 0


def _write(args, settings, path, stem, loaded, res, rollout_map, overlay_png) -> dict:
    from .analysis import export_arrays

    t0 = time.perf_counter()
    info = res.info
    start, end = settings.layer_range(info.depth)
    heat = rollout_map(res.attention, info=info, settings=settings)
    (args.out / f"{stem}.png").write_bytes(
        overlay_png(res.pixels, heat, patch_size=info.patch_size, opacity=args.opacity)
    )
    used = {**asdict(settings), "patch_size": info.patch_size, "img_size": list(info.img_size), "device": res.device,
            "start_layer": start, "end_layer": end}
    arrays = export_arrays(res, heat, settings=used, attention=args.save_attention)
    np.savez_compressed(args.out / f"{stem}.npz", **arrays)
    return dict(
        image=str(path),
        stem=stem,
        width=loaded.original_size[0],
        height=loaded.original_size[1],
        box=" ".join(f"{v:.1f}" for v in res.box),
        input_h=info.img_size[0],
        input_w=info.img_size[1],
        grid=f"{info.grid[0]}x{info.grid[1]}",
        peak_row=int(np.argmax(heat) // info.grid[1]),
        peak_col=int(np.argmax(heat) % info.grid[1]),
        forward_s=f"{res.seconds:.4f}",
        total_s=f"{res.seconds + time.perf_counter() - t0:.4f}",
        device=res.device,
        notes="; ".join(loaded.notes),
    )


def _write_summary(path: Path, rows: list[dict]) -> None:
    fields = ["image", "stem", "width", "height", "box", "input_h", "input_w", "grid", "peak_row", "peak_col",
              "forward_s", "total_s", "device", "notes"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except VitvizError as exc:
        print(f"vitviz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
