"""Command line: ``vitviz analyze IMAGE... --out DIR``, ``vitviz app`` (also ``python -m vitviz``).

``analyze`` writes per image ``STEM.png`` (rollout overlay on what the model saw) and ``STEM.npz`` (maps, geometry,
settings; with ``--save-attention`` also every layer's attention), plus ``summary.csv`` for the batch. Every file is
written atomically, and an interrupted run still writes the summary of what finished. A bad image is reported in
one line and skipped; the exit code is 1 when any image failed, 2 for bad arguments, 130 when interrupted.

``app`` starts the Streamlit UI of an installed vitviz; options after ``--port`` are passed to streamlit.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import __version__
from .errors import VitvizError
from .image import IMAGE_SUFFIXES

__all__ = ["main", "build_parser", "collect_images"]

SUMMARY_FIELDS = ("image", "stem", "width", "height", "box", "input_h", "input_w", "grid", "peak_row", "peak_col",
                  "forward_s", "total_s", "device", "notes")


def _add_analyze(sub) -> None:
    from .rollout import FUSIONS
    from .settings import DEFAULTS, FITS

    d = DEFAULTS
    a = sub.add_parser("analyze", help="rollout overlays and arrays for images or folders of images")
    a.add_argument("images", nargs="+", type=Path, help="image files or folders (their images, not recursive)")
    a.add_argument("--out", type=Path, required=True, help="output folder (created)")
    a.add_argument("--model", default=d.model, help="'default', a timm model name, or a checkpoint file")
    a.add_argument("--arch", default=None, help="timm architecture of a checkpoint file without metadata")
    a.add_argument("--patch-size", type=int, default=d.patch_size, help="patch size (default: the model's own)")
    a.add_argument("--img-size", type=int, default=d.img_size, help=f"input size in px (default {d.img_size})")
    a.add_argument("--fit", choices=FITS, default=d.fit, help="centre crop (timm eval) or whole image")
    a.add_argument("--start-layer", type=int, default=d.start_layer, help=f"first layer (default {d.start_layer})")
    a.add_argument("--end-layer", type=int, default=d.end_layer, help="last layer, -1 = last (default)")
    a.add_argument("--head-fusion", choices=FUSIONS, default=d.head_fusion)
    a.add_argument("--discard", type=float, default=d.discard_ratio, help="discard ratio in [0, 1)")
    a.add_argument("--device", default=d.device, help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps")
    a.add_argument("--precision", default=d.precision, help="auto, fp32, fp16 or bf16 (GPU only)")
    a.add_argument("--batch-size", type=int, default=None, help="images per pass (default: 16 on GPU, 1 on CPU)")
    a.add_argument("--opacity", type=float, default=0.6, help="overlay opacity in the PNG")
    a.add_argument("--save-attention", action="store_true", help="also store attention (L x H x T x T) in the npz")
    a.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_app(sub) -> None:
    a = sub.add_parser("app", help="start the web app (streamlit); further options go to streamlit",
                       description="Start the vitviz web app. Options other than --port are passed to streamlit, "
                                   "e.g. --server.address 127.0.0.1 --server.headless true.")
    a.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitviz", description="See how a Vision Transformer reads images.")
    parser.add_argument("--version", action="version", version=f"vitviz {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_analyze(sub)
    _add_app(sub)
    return parser


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); missing paths and dangling links are kept so
    that they are reported, never skipped in silence."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and (q.is_file() or
                                                                                           q.is_symlink()))
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


@dataclass(frozen=True)
class _Job:
    """What one ``analyze`` run does, resolved from the arguments before any image is read."""

    settings: object  # vitviz.settings.Settings
    arch: str | None
    patch_size: int
    precision: str
    device: str
    batch: int
    out: Path
    opacity: float
    save_attention: bool
    quiet: bool


def _job(args: argparse.Namespace) -> _Job:
    """Settings checked, the model opened once, the layer range checked against it: bad arguments fail here."""
    from .device import pick_device
    from .models import get_model, native_patch_size, resolve_sizes
    from .settings import DEFAULTS

    settings = replace(DEFAULTS, model=args.model, patch_size=args.patch_size, img_size=args.img_size, fit=args.fit,
                       start_layer=args.start_layer, end_layer=args.end_layer, head_fusion=args.head_fusion,
                       discard_ratio=args.discard, device=args.device, precision=args.precision)
    settings.check()
    if not 0.0 <= args.opacity <= 1.0:
        raise VitvizError(f"opacity must be in [0, 1], got {args.opacity}")
    device = str(pick_device(settings.device))
    batch = args.batch_size if args.batch_size is not None else (1 if device == "cpu" else 16)
    if batch < 1:
        raise VitvizError(f"batch size must be at least 1, got {batch}")
    native = native_patch_size(settings.model, arch=args.arch)
    patch, square = resolve_sizes(native_patch_size=native, patch_size=settings.patch_size, img_size=settings.img_size)
    _, info = get_model(settings.model, arch=args.arch, patch_size=patch, img_size=square, device=device,
                        precision=settings.precision)
    settings.layer_range(info.depth)  # a bad layer range is refused before any image is run
    return _Job(settings, args.arch, patch, settings.precision, device, batch, args.out, args.opacity,
                args.save_attention, args.quiet)


def _batches(job: _Job, paths: list[Path], failed: list[str]) -> Iterator[list[tuple[Path, str, object]]]:
    """Decoded images in batches of one input size; unreadable ones go to ``failed`` with their reason."""
    from .image import load_image

    pending: list[tuple[Path, str, object]] = []
    for path, stem in zip(paths, _stems(paths), strict=True):
        try:
            loaded = load_image(path, name=path.name)
        except (VitvizError, OSError) as exc:
            failed.append(f"{path}: {exc}")
            continue
        if pending and (job.settings.fit == "whole" or len(pending) >= job.batch):
            yield pending
            pending = []
        pending.append((path, stem, loaded))
    if pending:
        yield pending


def _analyze(job: _Job, batch: list[tuple[Path, str, object]]):
    from .analysis import analyze_with_fallback, input_size_for
    from .models import get_model

    size = input_size_for(batch[0][2].image, img_size=job.settings.img_size, patch_size=job.patch_size,
                          fit=job.settings.fit)

    def load(dev: str):
        return get_model(job.settings.model, arch=job.arch, patch_size=job.patch_size, img_size=size, device=dev,
                         precision=job.precision if dev == job.device else "auto")

    return analyze_with_fallback(load, [b[2] for b in batch], device=job.device, fit=job.settings.fit)


def _write(job: _Job, path: Path, stem: str, loaded, res) -> dict:
    """The PNG and npz of one result, each written atomically; its summary row."""
    import numpy as np

    from .export import export_arrays, write_atomic, write_npz
    from .figures import overlay_png
    from .maps import rollout_map

    t0 = time.perf_counter()
    info = res.info
    start, end = job.settings.layer_range(info.depth)
    heat = rollout_map(res.attention, info=info, settings=job.settings)
    write_atomic(job.out / f"{stem}.png", overlay_png(res.pixels, heat, patch_size=info.patch_size,
                                                      opacity=job.opacity))
    used = {**asdict(job.settings), "patch_size": info.patch_size, "img_size": list(info.img_size),
            "device": res.device, "start_layer": start, "end_layer": end}
    write_npz(job.out / f"{stem}.npz", export_arrays(res, heat, settings=used, attention=job.save_attention))
    peak_row, peak_col = divmod(int(np.argmax(heat)), info.grid[1])
    return dict(image=str(path), stem=stem, width=loaded.original_size[0], height=loaded.original_size[1],
                box=" ".join(f"{v:.1f}" for v in res.box), input_h=info.img_size[0], input_w=info.img_size[1],
                grid=f"{info.grid[0]}x{info.grid[1]}", peak_row=peak_row, peak_col=peak_col,
                forward_s=f"{res.seconds:.4f}", total_s=f"{res.seconds + time.perf_counter() - t0:.4f}",
                device=res.device, notes="; ".join(loaded.notes))


def _write_summary(path: Path, rows: list[dict]) -> None:
    from .export import write_atomic

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def _progress(total: int, quiet: bool):
    if quiet or total <= 1:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


def _run_batches(job: _Job, paths: list[Path], rows: list[dict], failed: list[str]) -> None:
    bar = _progress(len(paths), job.quiet)
    for batch in _batches(job, paths, failed):
        try:
            results, notice = _analyze(job, batch)
        except VitvizError as exc:
            failed += [f"{path}: {exc}" for path, _stem, _im in batch]
            continue
        if notice:
            print(f"vitviz: {notice}", file=sys.stderr)
        rows += [_write(job, path, stem, loaded, res) for (path, stem, loaded), res in zip(batch, results, strict=True)]
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()


def _run_analyze(args: argparse.Namespace) -> int:
    job = _job(args)
    paths = collect_images(args.images)
    if not paths:
        raise VitvizError("no images found in the given paths")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed: list[str] = []
    try:
        _run_batches(job, paths, rows, failed)
    finally:  # also when interrupted: the summary of what finished
        _write_summary(args.out / "summary.csv", rows)
        for line in failed:
            print(f"vitviz: {line}", file=sys.stderr)
    print(f"vitviz: {len(rows)} of {len(paths)} image(s) written to {args.out}"
          + (f", {len(failed)} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _run_app(args: argparse.Namespace, extra: list[str]) -> int:
    from .app.launch import launch

    return launch(port=args.port, streamlit_args=extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "app":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run_app(args, extra) if args.command == "app" else _run_analyze(args)
    except VitvizError as exc:
        print(f"vitviz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
