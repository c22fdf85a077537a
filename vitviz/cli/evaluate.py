"""``vitviz evaluate IMAGES... --methods ... --target ... --perturbation tokens|pixels --out DIR``.

Per image and method: the explanation map of the target and its faithfulness curves (random always included).
Writes ``rows.csv`` (one row per image and method, the curves included), ``summary.csv`` and ``summary.md`` (mean
score per method with its 95% bootstrap interval, most faithful first), ``curves.png`` (the mean curves) and
``failures.csv`` (inputs that could not be read, with the reason). Under ``torchrun`` the images are shared out
like ``analyze``'s and rank 0 writes the same files one process writes: each image's random map is seeded by its
place in the input order, so the numbers do not depend on the world size.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .errors import VitvizError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from .evaluate import DEFAULT_METHODS
    from .metrics.faithfulness import PERTURBATIONS
    from .settings import DEFAULTS, FITS

    a = sub.add_parser("evaluate", help="faithfulness of explanation methods over images (MoRF/LeRF curves)")
    a.add_argument("images", nargs="+", type=Path, help="image files, folders (recursive) or text files of paths")
    a.add_argument("--out", type=Path, required=True, help="output folder (created)")
    a.add_argument("--methods", default=";".join(DEFAULT_METHODS),
                   help="methods separated by ';' (settings after ':' use ','), e.g. 'legrad;chefer;rollout:start=1'")
    a.add_argument("--target", default="auto", help="auto (a classifier's top-1, else the embedding), class:N, "
                                                    "embedding or patch:N")
    a.add_argument("--perturbation", choices=PERTURBATIONS, default="tokens",
                   help="remove patch tokens (default) or fill patches with the image mean (pixels)")
    a.add_argument("--steps", type=int, default=10, help="removal steps per curve (default 10)")
    a.add_argument("--model", default=DEFAULTS.model, help="'default', a timm model name, or a checkpoint file")
    a.add_argument("--arch", default=None, help="timm architecture of a checkpoint file without metadata")
    a.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's own)")
    a.add_argument("--img-size", type=int, default=DEFAULTS.img_size, help="input size in px")
    a.add_argument("--fit", choices=FITS, default="crop", help="centre crop (timm eval) or whole image")
    a.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps")
    a.add_argument("--precision", default="auto", help="auto, fp32, fp16 or bf16 (GPU only)")
    a.add_argument("--dist-timeout", type=float, default=24 * 3600, help="seconds to wait for the other ranks")


def _methods(text: str) -> list:
    from .explain import Method

    return [Method.parse(m) for m in text.split(";") if m.strip()]


def _model(args: argparse.Namespace, device: str):
    from .models import get_model, native_patch_size, resolve_sizes

    native = native_patch_size(args.model, arch=args.arch)
    patch, square = resolve_sizes(native_patch_size=native, patch_size=args.patch_size, img_size=args.img_size)
    return get_model(args.model, arch=args.arch, patch_size=patch, img_size=square, device=device,
                     precision=args.precision)


def _rows_for(model, info, item, args, methods) -> tuple[list, str | None]:
    from .evaluate import evaluate_image, prepare_image
    from .inputs.image import load_image

    try:
        image = load_image(item.path, name=item.path.name)
    except (VitvizError, OSError) as exc:
        return [], str(exc)
    param = next(model.parameters())
    x = prepare_image(image, info, fit=args.fit).to(device=param.device, dtype=param.dtype)
    return evaluate_image(model, x, name=str(item.path), methods=methods, target=args.target,
                          perturbation=args.perturbation, steps=args.steps, seed=item.index), None


def _write(out: Path, rows: list, failures: list[tuple[str, str]]) -> None:
    from .evaluate import summarize, summary_markdown, write_plot, write_rows_csv, write_summary_csv

    write_rows_csv(rows, out / "rows.csv")
    with (out / "failures.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "error"), *failures])
    if not rows:
        return
    summaries = summarize(rows)
    write_summary_csv(summaries, out / "summary.csv")
    (out / "summary.md").write_text(summary_markdown(summaries), encoding="utf-8")
    write_plot(summaries, out / "curves.png")
    print(summary_markdown(summaries), end="")


def run(args: argparse.Namespace) -> int:
    from .cli import _inputs
    from .device import pick_device
    from .distributed import gather, local_device, merge_indexed, process_group, shard, wait_all, world_from_env

    world = world_from_env()
    methods = _methods(args.methods)
    if args.steps < 2:
        raise VitvizError(f"steps must be at least 2, got {args.steps}")
    device = local_device(str(pick_device(args.device)), world)
    model, info = _model(args, device)
    with process_group(world, device=device, timeout_s=args.dist_timeout):
        args.out.mkdir(parents=True, exist_ok=True)
        items = _inputs(args, world)
        done = [(item.index, _rows_for(model, info, item, args, methods)) for item in
                shard(items, rank=world.rank, world=world.size)]
        parts = gather(done, world)
        if world.main:
            merged = merge_indexed(parts, total=len(items))
            rows = [r for rs, _err in merged for r in rs]
            failures = [(str(item.path), err) for item, (_rs, err) in zip(items, merged, strict=True) if err]
            for path, err in failures:
                print(f"vitviz: {path}: {err}", file=sys.stderr)
            _write(args.out, rows, failures)
            print(f"vitviz: {len(items) - len(failures)} of {len(items)} image(s) evaluated into {args.out}",
                  file=sys.stderr)
        wait_all(world, timeout_s=args.dist_timeout)
    return 0
