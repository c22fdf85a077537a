"""``vitviz evaluate IMAGES... --methods ... --target ... --perturbation tokens,blur --readout cls,mean --out DIR``.

Per image and method: the explanation map of the target and its faithfulness curves (random always included).
Writes ``rows.csv`` (one row per image and method, the curves included), ``summary.csv`` and ``summary.md`` (mean
score per method with its 95% bootstrap interval, most faithful first), ``curves.png`` (the mean curves) and
``failures.csv`` (inputs that could not be read, with the reason). Inputs are decoded in ``--workers`` DataLoader
processes, ``--batch-size`` of them at a time (each image is still evaluated alone). Under ``torchrun`` those chunks
are shared out like ``analyze``'s and rank 0 writes the same files one process writes: each image's random map is
seeded by its place in the input order, so the numbers do not depend on the world size or the batch size.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ..errors import VitvizError
from ._common import Lazy, batch_size, check_common, collect, image_prompt, parse_methods, progress, prompts, workers

__all__ = ["add_parser", "run"]


def add_parser(sub, parent: argparse.ArgumentParser) -> None:
    a = sub.add_parser("evaluate", parents=[parent], add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="faithfulness of explanation methods over images (MoRF/LeRF curves)",
                       description="Faithfulness of explanation methods over images: rows.csv, summary.csv, "
                                   "summary.md, curves.png and failures.csv.")
    a.add_argument("--methods", default=Lazy("vitviz.evaluate", "DEFAULT_METHODS", ";".join),
                   help="methods separated by ';' (settings after ':' use ','), e.g. 'legrad;chefer;rollout:start=1'; "
                        "random is always included (the methods and the default list are below)")
    a.add_argument("--target", default="auto", help="auto (a classifier's top-1, else the embedding), class:N, "
                                                    "embedding or patch:N")
    a.add_argument("--perturbation", type=_words("PERTURBATIONS"), default=("tokens",), metavar="HOW[,HOW...]",
                   help="how patches are removed, one or several of tokens (drop the patch tokens, default), pixels "
                        "(fill with the image mean), blur (a Gaussian blur, sigma 10 px), road (noisy linear "
                        "imputation, Rong et al. 2022)")
    a.add_argument("--readout", type=_words("READOUTS"), default=("target",), metavar="WHAT[,WHAT...]",
                   help="what the curves read, one or several of target (what was explained, default), cls (the "
                        "CLS embedding), mean (the mean patch token), probability, logit (classifiers)")
    a.add_argument("--sensitivity-n", action="store_true",
                   help="also sensitivity-n (Ancona et al. 2018): how well each map's sum over random patch sets "
                        "predicts what removing them costs")
    a.add_argument("--steps", type=int, default=10, help="removal steps per curve (default %(default)s)")
    a.add_argument("--random-draws", type=int, default=8,
                   help="seeded random maps averaged into the random baseline per image (default %(default)s)")


def _words(table: str):
    """A comma-separated list of names from ``vitviz.metrics.faithfulness.TABLE``, checked when a run starts."""
    def parse(text: str) -> tuple[str, ...]:
        allowed = Lazy("vitviz.metrics.faithfulness", table).get()
        words = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
        bad = [w for w in words if w not in allowed]
        if bad or not words:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'}: choose from {', '.join(allowed)}")
        return words
    return parse


def _methods(text: str) -> list:
    return parse_methods([m for m in text.split(";") if m.strip()])  # a bad one fails before any model is opened


def _model(args: argparse.Namespace, device: str):
    from ..models import get_model, native_patch_size, resolve_sizes

    native = native_patch_size(args.model, arch=args.arch)
    patch, square = resolve_sizes(native_patch_size=native, patch_size=args.patch_size, img_size=args.img_size)
    return get_model(args.model, arch=args.arch, patch_size=patch, img_size=square, device=device,
                     precision=args.precision)


def _rows_for(model, info, decoded, args, methods, found=None) -> tuple[list, str | None]:
    """One decoded input's rows, or the reason it could not be read; ``found``: --prompt/--prompts (a CLIP model)."""
    from ..evaluate import evaluate_image, prepare_image

    if decoded.image is None:
        return [], decoded.error
    param = next(model.parameters())
    x = prepare_image(decoded.image, info, fit=args.fit).to(device=param.device, dtype=param.dtype)
    target, _predictions = image_prompt(found, model, x, args.target)
    return evaluate_image(model, x, name=str(decoded.item.path), methods=methods, target=target,
                          perturbations=args.perturbation, readouts=args.readout, sensitivity=args.sensitivity_n,
                          steps=args.steps, seed=decoded.item.index, random_draws=args.random_draws), None


def _evaluate(model, info, batches: list[list], args, methods, *, device: str, world, found=None) -> list:
    """``(index, (rows, error))`` for every input of ``batches``, decoded in workers, with a progress bar."""
    from ..inputs.folders import loader

    done = []
    bar = progress(sum(map(len, batches)), args.quiet, world)
    try:
        for decoded in loader(batches, workers=workers(args.workers, device)):
            done += [(d.item.index, _rows_for(model, info, d, args, methods, found)) for d in decoded]
            if bar:
                bar.update(len(decoded))
    finally:
        if bar:
            bar.close()
    return done


def _write(out: Path, rows: list, failures: list[tuple[str, str]]) -> None:
    from ..evaluate import summarize, summary_markdown, write_plot, write_rows_csv, write_summary_csv

    write_rows_csv(rows, out / "rows.csv")
    with (out / "failures.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "error"), *failures])
    if not rows:
        return
    summaries = summarize(rows)
    write_summary_csv(summaries, out / "summary.csv")
    (out / "summary.md").write_text(summary_markdown(summaries), encoding="utf-8")
    measures = list(dict.fromkeys((s.perturbation, s.readout) for s in summaries if s.morf))
    for k, (pert, readout) in enumerate(measures):  # the first measure as curves.png, as before
        name = "curves.png" if k == 0 else f"curves-{pert}-{readout}.png"
        write_plot([s for s in summaries if (s.perturbation, s.readout) == (pert, readout)], out / name)
    print(summary_markdown(summaries), end="")


def _report(out: Path, items: list, parts: list) -> None:
    """Rank 0: the ranks' results merged in input order, written, the failures and a last line printed."""
    from .distributed import merge_indexed

    merged = merge_indexed(parts, total=len(items))
    rows = [r for rs, _err in merged for r in rs]
    failures = [(str(item.path), err) for item, (_rs, err) in zip(items, merged, strict=True) if err]
    for path, err in failures:
        print(f"vitviz: {path}: {err}", file=sys.stderr)
    for image, method, note in dict.fromkeys((r.image, r.method, r.note) for r in rows if r.note):
        print(f"vitviz: {image}: {method}: no score: {note}", file=sys.stderr)  # a failure row in rows.csv
    _write(out, rows, failures)
    print(f"vitviz: {len(items) - len(failures)} of {len(items)} image(s) evaluated into {out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from ..inputs.folders import chunks
    from .distributed import gather, local_device, process_group, shard, wait_all, world_from_env

    check_common(args)
    methods = _methods(args.methods)
    if args.steps < 2:
        raise VitvizError(f"steps must be at least 2, got {args.steps}")
    world = world_from_env()
    device = local_device(str(pick_device(args.device)), world)
    if (args.prompt or args.prompts) and args.target != "auto":
        raise VitvizError("--target and --prompt/--prompts both say what to explain: give one of them")
    found = prompts(args)  # a prompt's text embedding once, before any image
    model, info = _model(args, device)
    with process_group(world, device=device, timeout_s=args.dist_timeout):
        args.out.mkdir(parents=True, exist_ok=True)
        items = collect(args, world)
        mine = shard(chunks(items, batch_size(args.batch_size, device)), rank=world.rank, world=world.size)
        parts = gather(_evaluate(model, info, mine, args, methods, device=device, world=world, found=found), world)
        if world.main:
            _report(args.out, items, parts)
        wait_all(world, timeout_s=args.dist_timeout)
    return 0
