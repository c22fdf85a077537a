"""``vitviz analyze INPUT... --out DIR``: rollout overlays, maps and arrays per image, and ``summary.csv``.

Writes per image ``STEM.png`` (rollout overlay on what the model saw) and ``STEM.npz`` (maps, geometry, settings; with
``--save-attention`` also every layer's attention), plus ``summary.csv``: one row per input in input order,
``status`` ``ok`` or ``failed`` (then ``error`` says why, and the failure is also printed once). Inputs are image
files, folders (searched recursively) and text files listing paths (:mod:`vitviz.inputs.folders`); they are decoded
in ``--workers`` DataLoader processes (by default none on the CPU, up to four per GPU) and run in batches of
``--batch-size`` images of one input size.

Every file is written atomically (temp name, then rename): an interrupted run never leaves a partial file under a
final name and still writes the summary of what finished. ``--resume`` keeps an input whose ``.png`` and ``.npz``
exist and verify (the npz reads back whole, and the options it was made with, stored in its ``run`` array, are this
run's); its row comes from the npz's ``summary`` array, timing columns empty.

Under ``torchrun`` (:mod:`vitviz.cli.distributed`) each rank takes every WORLD_SIZE-th chunk of ``--batch-size``
inputs, writes their outputs and ``summary.rankR-of-W.csv``; rank 0 merges the ranks' rows into ``summary.csv``, in
input order and the same as one process writes apart from the timing columns (and the GPU index in ``device``). It
is written only when every rank finished: an interrupted or failed run leaves the per-rank summaries of what
finished. A finished rank exits 0 under torchrun (the launcher's status means "the run completed"); one process
exits 1 when an image failed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import VitvizError
from ._common import (
    FUSIONS,
    batch_size,
    check_common,
    collect,
    for_terminal,
    image_prompt,
    parse_methods,
    progress,
    prompts,
    setting,
    workers,
)

__all__ = ["SUMMARY_FIELDS", "TIMING_FIELDS", "add_parser", "run"]

SUMMARY_FIELDS = ("image", "stem", "status", "width", "height", "box", "input_h", "input_w", "grid", "peak_row",
                  "peak_col", "map_method", "map_note", "outliers", "top1", "top1_p", "forward_s", "total_s", "device",
                  "notes", "error")  # top1, top1_p: a classifier's most probable class (its name) and probability
TIMING_FIELDS = ("forward_s", "total_s")  # the only columns that differ between two runs of the same inputs


def add_parser(sub, parent: argparse.ArgumentParser) -> None:
    a = sub.add_parser("analyze", parents=[parent], add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="rollout overlays and arrays for images, folders or lists of images",
                       description="Rollout overlays (STEM.png), maps and arrays (STEM.npz) per image, and "
                                   "summary.csv.")
    a.add_argument("--start-layer", type=int, default=setting("start_layer"),
                   help="first layer (default %(default)s)")
    a.add_argument("--end-layer", type=int, default=setting("end_layer"), help="last layer, -1 = last (default)")
    a.add_argument("--head-fusion", choices=FUSIONS, default=setting("head_fusion"), metavar="FUSION",
                   help="%(choices)s: how a layer's heads are fused (default %(default)s)")
    a.add_argument("--discard", type=float, default=setting("discard_ratio"),
                   help="discard ratio in [0, 1) (default %(default)s)")
    a.add_argument("--resume", action="store_true",
                   help="keep inputs whose outputs exist and were made with these options; do the rest")
    a.add_argument("--opacity", type=float, default=0.6, help="overlay opacity in the PNG (default %(default)s)")
    a.add_argument("--png", choices=PNG_SIZES, default="model",
                   help="the overlay PNG drawn as the app draws it (crisp patch blocks, its colour scale): at the "
                        "model's input size ('model', the default: a dataset run stays about the cost of its forward "
                        "passes), or, as the app's download, on the part of the original image the model saw at the "
                        "original's resolution ('original': seconds and megabytes an image for camera photos)")
    a.add_argument("--save-attention", action="store_true", help="also store attention (L x H x T x T) in the npz")
    a.add_argument("--method", default="none",
                   help="an explanation to store as 'map' in each npz: a method below, 'default' (the app's "
                        "default explanation) or 'none' (the default: the rollout overlay and arrays only, at about "
                        "the cost of a forward pass)")
    a.add_argument("--save-features", action="store_true",
                   help="also store every layer's tokens (L x T x D) and their norms (L x T) in the npz, and count "
                        "outlier tokens per layer in the summary")


PNG_SIZES = ("original", "model")
_NO_TARGET = "where {}'s attention flows ({} uses no target)"  # what an attention-only map explains


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
    workers: int  # DataLoader decoding processes
    run: str  # JSON of every option that shapes the outputs: what --resume compares
    method: str | None = None  # the explanation stored as ``map``; None: none
    save_features: bool = False
    prompts: object = None  # --prompt/--prompts of a CLIP model (_common.Prompts), None without
    png: str = "model"  # PNG_SIZES


def _run_options(settings, *, arch: str | None, patch: int, layers: tuple[int, int], opacity: float,
                 save_attention: bool, png: str = "model") -> str:
    return json.dumps(dict(model=str(settings.model), arch=arch, patch_size=patch, img_size=settings.img_size,
                           fit=settings.fit, start_layer=layers[0], end_layer=layers[1],
                           head_fusion=settings.head_fusion, discard_ratio=settings.discard_ratio,
                           precision=settings.precision, opacity=opacity, save_attention=save_attention, png=png),
                      sort_keys=True)


def _method_label(text: str) -> str | None:
    """``none`` -> None; ``default`` -> the app's default explanation; else the method's label."""
    if text.strip() == "none":
        return None
    if text.strip() == "default":
        from ..explain.registry import DEFAULT_METHOD

        text = DEFAULT_METHOD
    return parse_methods([text])[0].label


def _job(args: argparse.Namespace, world) -> _Job:
    """Options checked, the model opened once, the layer range checked against it: bad arguments fail here, the
    ones that need no model before it is opened."""
    from ..device import pick_device
    from ..models import get_model, native_patch_size, resolve_sizes
    from ..settings import DEFAULTS
    from .distributed import local_device

    check_common(args)
    method = _method_label(args.method)  # before any model is opened: a bad name fails here
    settings = replace(DEFAULTS, model=args.model, patch_size=args.patch_size, img_size=args.img_size, fit=args.fit,
                       start_layer=args.start_layer, end_layer=args.end_layer, head_fusion=args.head_fusion,
                       discard_ratio=args.discard, device=args.device, precision=args.precision)
    settings.check()
    if not 0.0 <= args.opacity <= 1.0:
        raise VitvizError(f"opacity must be in [0, 1], got {args.opacity}")
    device = local_device(str(pick_device(settings.device)), world)
    native = native_patch_size(settings.model, arch=args.arch)
    patch, square = resolve_sizes(native_patch_size=native, patch_size=settings.patch_size, img_size=settings.img_size)
    _, info = get_model(settings.model, arch=args.arch, patch_size=patch, img_size=square, device=device,
                        precision=settings.precision)
    layers = settings.layer_range(info.depth)  # a bad layer range is refused before any image is run
    run = _run_options(settings, arch=args.arch, patch=patch, layers=layers, opacity=args.opacity,
                       save_attention=args.save_attention, png=args.png)
    run = json.dumps({**json.loads(run), "method": method, "save_features": args.save_features,
                      **({"prompt": args.prompt, "prompts": args.prompts} if args.prompt or args.prompts else {})},
                     sort_keys=True)
    return _Job(settings, args.arch, patch, settings.precision, device, batch_size(args.batch_size, device), args.out,
                args.opacity, args.save_attention, args.quiet, workers(args.workers, device), run, method,
                args.save_features, prompts(args), args.png)


def _kept(item, *, out: Path, run: str) -> dict | None:
    """The summary row of ``item``'s outputs from an earlier run if they are whole and were made with ``run``'s
    options, else None (then the input is done again). Runs in DataLoader workers (so: module level, picklable)."""
    import zipfile

    import numpy as np
    from PIL import Image

    npz, png = out / f"{item.stem}.npz", out / f"{item.stem}.png"
    try:
        with zipfile.ZipFile(npz) as z:
            if z.testzip() is not None:  # reads every member: a CRC mismatch names it
                return None
        with np.load(npz) as d:
            if "run" not in d.files or str(d["run"]) != run or "summary" not in d.files:
                return None
            row = json.loads(str(d["summary"]))
        with Image.open(png) as im:
            im.verify()
    except Exception:  # missing, truncated, not ours: do it again
        return None
    if row.get("image") != str(item.path) or row.get("stem") != item.stem:
        return None  # these names belonged to another input (the input list changed)
    return {**row, "status": "ok", **dict.fromkeys(TIMING_FIELDS, "")}


def _analyze(job: _Job, group: list):
    from ..analysis.onepass import analyze_with_fallback, input_size_for
    from ..models import get_model

    size = input_size_for(group[0].image.image, img_size=job.settings.img_size, patch_size=job.patch_size,
                          fit=job.settings.fit)

    def load(dev: str):
        return get_model(job.settings.model, arch=job.arch, patch_size=job.patch_size, img_size=size, device=dev,
                         precision=job.precision if dev == job.device else "auto")

    return analyze_with_fallback(load, [d.image for d in group], device=job.device, fit=job.settings.fit,
                                 tokens=job.save_features)


def _same_rollout(job: _Job, depth: int) -> bool:
    """Whether ``--method`` asks for the very rollout the analysis draws (same first layer, fusion and discard, to
    the last layer): then it is that map, with no second pass (``--method default`` is this rollout)."""
    from ..explain._base import layer_index
    from ..explain.registry import Method

    if job.method is None or job.prompts is not None:
        return False
    m = Method.parse(job.method)
    if m.name != "rollout":
        return False
    start, end = job.settings.layer_range(depth)
    first = 0 if depth == 1 and m.settings.start == 1 else layer_index(m.settings.start, depth, "rollout start layer")
    return (end == depth - 1 and first == start and m.settings.fusion == job.settings.head_fusion
            and m.settings.discard == job.settings.discard_ratio)


def _explained(job: _Job, res, rollout) -> dict:
    """The npz arrays of the explanation (``map``, ``map_method``, ``map_target``) and of the tokens. ``rollout``:
    the analysis's own rollout map, which is the explanation when ``--method`` asks for that very rollout."""
    import numpy as np

    from ..analysis.readout import readout_name
    from ..analysis.tokens import find_outliers, token_norms
    from ..explain import explain
    from ..inputs.image import to_tensor
    from ..models import get_model

    info, out = res.info, {}
    if _same_rollout(job, info.depth):
        out.update(map=rollout, map_method=np.array(job.method), map_note=np.array(""),
                   map_target=np.array(_NO_TARGET.format(readout_name(info.readout, short=True), "rollout")))
    elif job.method is not None or job.prompts is not None:
        model, _ = get_model(job.settings.model, arch=job.arch, patch_size=job.patch_size, img_size=info.img_size,
                             device=res.device, precision=job.precision if res.device == job.device else "auto")
        param = next(model.parameters())
        x = to_tensor(res.pixels, mean=info.mean, std=info.std).to(device=param.device, dtype=param.dtype)
        target, predictions = image_prompt(job.prompts, model, x)
        if predictions:  # CLIP's zero-shot predictions over --prompts, as a classifier's top 5 are stored
            out.update(top5_indices=np.array([p.index for p in predictions], dtype=np.int64),
                       top5_names=np.array([p.name for p in predictions]),
                       top5_probabilities=np.array([p.probability for p in predictions], dtype=np.float32))
    if job.method is not None and "map" not in out:
        e = explain(model, x, method=job.method, target=target)
        who = readout_name(info.readout, short=True)  # the attention-only methods follow the readout too
        what = e.target_description if e.uses_target else _NO_TARGET.format(who, e.method.name)
        out.update(map=e.map, map_method=np.array(e.method.label), map_target=np.array(what),
                   map_note=np.array(" ".join(e.notes)))  # e.g. a constant map: it ranks nothing
    if res.tokens is not None:
        norms = token_norms(res.tokens)
        out.update(tokens=np.asarray(res.tokens, dtype=np.float32), token_norms=norms,
                   outliers=find_outliers(norms, num_prefix_tokens=info.num_prefix_tokens).sum(axis=1))
    return out


def _predicted(job: _Job, res) -> dict:
    """A classifier's top 5 on the image (``top5_indices``, ``top5_names``, ``top5_probabilities``) from one plain
    forward pass; nothing for a backbone, which has no classes."""
    import numpy as np

    from ..inputs.image import to_tensor
    from ..models import get_model
    from ..models.labels import has_classes, predict

    info = res.info
    model, _ = get_model(job.settings.model, arch=job.arch, patch_size=job.patch_size, img_size=info.img_size,
                         device=res.device, precision=job.precision if res.device == job.device else "auto")
    if not has_classes(model) or job.prompts is not None:  # a CLIP tower's head is no classifier: zero-shot instead
        return {}
    param = next(model.parameters())
    top = predict(model, to_tensor(res.pixels, mean=info.mean, std=info.std).to(device=param.device,
                                                                                 dtype=param.dtype))
    return dict(top5_indices=np.array([p.index for p in top], dtype=np.int64),
                top5_names=np.array([p.name or f"class {p.index}" for p in top]),
                top5_probabilities=np.array([p.probability for p in top], dtype=np.float32))


def _write(job: _Job, item, loaded, res) -> dict:
    """The PNG and npz of one result, written as one (both or neither); its summary row (also stored in the npz)."""
    import numpy as np

    from ..analysis.maps import rollout_map
    from ..export import export_arrays, npz_bytes, write_atomic_group
    from ..figures import overlay_original_png, overlay_png

    t0 = time.perf_counter()
    info = res.info
    start, end = job.settings.layer_range(info.depth)
    heat = rollout_map(res.attention, info=info, settings=job.settings, readout=res.readout)
    peak_row, peak_col = divmod(int(np.argmax(heat)), info.grid[1])
    row = dict(image=str(item.path), stem=item.stem, width=loaded.original_size[0], height=loaded.original_size[1],
               box=" ".join(f"{v:.1f}" for v in res.box), input_h=info.img_size[0], input_w=info.img_size[1],
               grid=f"{info.grid[0]}x{info.grid[1]}", peak_row=peak_row, peak_col=peak_col, device=res.device,
               notes="; ".join(loaded.notes))
    png = (overlay_original_png(loaded.image, res.box, heat, opacity=job.opacity) if job.png == "original" else
           overlay_png(res.pixels, heat, patch_size=info.patch_size, opacity=job.opacity, smooth=False))
    used = {**asdict(job.settings), "patch_size": info.patch_size, "img_size": list(info.img_size),
            "device": res.device, "start_layer": start, "end_layer": end}
    extra = {**_explained(job, res, heat), **_predicted(job, res)}
    top = extra.get("top5_names")
    row.update(top1="" if top is None else str(top[0]),
               top1_p="" if top is None else f"{float(extra['top5_probabilities'][0]):.4f}")
    row.update(map_method=job.method or "", map_note=str(extra.get("map_note", "")),
               outliers=" ".join(str(int(n)) for n in extra["outliers"]) if "outliers" in extra else "")
    extra.update(run=np.array(job.run), summary=np.array(json.dumps(row)), readout=np.array(info.readout))
    if res.readout is not None:  # a model without a CLS token: the weights over the tokens its maps follow
        extra.update(readout_weights=np.asarray(res.readout, dtype=np.float32))
    arrays = export_arrays(res, heat, settings=used, attention=job.save_attention, extra=extra)
    write_atomic_group({job.out / f"{item.stem}.png": png, job.out / f"{item.stem}.npz": npz_bytes(arrays)})
    return {**row, "status": "ok", "forward_s": f"{res.seconds:.4f}",
            "total_s": f"{res.seconds + time.perf_counter() - t0:.4f}"}


def _failed(item, reason: str) -> dict:
    return {"image": str(item.path), "stem": item.stem, "status": "failed", "error": reason}


def _write_summary(path: Path, rows: list[dict]) -> None:
    from ..export import write_atomic

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def _run_group(job: _Job, group: list, rows: dict[int, dict]) -> None:
    """One pass over decoded inputs of one input size; their rows (failed ones too) into ``rows``."""
    try:
        results, notice = _analyze(job, group)
    except VitvizError as exc:
        rows.update((d.item.index, _failed(d.item, for_terminal(exc))) for d in group)
        return
    if notice:
        print(f"vitviz: {notice}", file=sys.stderr)
    for d, res in zip(group, results, strict=True):
        rows[d.item.index] = _write(job, d.item, d.image, res)


def _run_batches(job: _Job, batches: list[list], rows: dict[int, dict], *, resume: bool, world) -> None:
    """Decode (in workers), run and write ``batches``; every input's row lands in ``rows`` under its index."""
    from ..analysis.onepass import input_size_for
    from ..inputs.folders import group_by, loader

    def size_of(d):
        return input_size_for(d.image.image, img_size=job.settings.img_size, patch_size=job.patch_size,
                              fit=job.settings.fit)

    skip = functools.partial(_kept, out=job.out, run=job.run) if resume else None
    bar = progress(sum(map(len, batches)), job.quiet, world)
    try:
        for decoded in loader(batches, workers=job.workers, skip=skip):
            for d in decoded:
                if d.kept is not None:
                    rows[d.item.index] = d.kept
                elif d.error is not None:
                    rows[d.item.index] = _failed(d.item, d.error)
            for group in group_by([d for d in decoded if d.image is not None], size_of):
                _run_group(job, group, rows)
            if bar:
                bar.update(len(decoded))
    finally:
        if bar:
            bar.close()


def _prepare_out(out: Path, world) -> None:
    """The output folder, and no summary left from an earlier run that could pass for this one's."""
    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        for old in [out / "summary.csv", *out.glob("summary.rank*-of-*.csv")]:
            if world.distributed or old.name != "summary.csv":
                old.unlink(missing_ok=True)


def _print_failures(rows: list[dict], world) -> None:
    """Each failed input in one line, by the rank that met it (so once in the whole run)."""
    prefix = f"vitviz[rank {world.rank}]" if world.distributed else "vitviz"
    for r in rows:
        if r["status"] == "failed":
            print(f"{prefix}: {r['image']}: {r['error']}", file=sys.stderr)


def _is_kept(row: dict) -> bool:
    return row["status"] == "ok" and row["forward_s"] == ""  # kept by --resume: not timed in this run


def _finish(rows: list[dict], out: Path, seconds: float) -> int:
    """The last line of a run, with its pace over the inputs it handled (not the kept ones); the failures."""
    failed, kept = sum(r["status"] == "failed" for r in rows), sum(map(_is_kept, rows))
    pace = f"{(len(rows) - kept) / seconds:.2f} images/s" if seconds > 0 else "-"
    print(f"vitviz: {len(rows) - failed} of {len(rows)} image(s) written to {out}"
          + (f" ({kept} kept from an earlier run)" if kept else "") + (f", {failed} failed" if failed else "")
          + f"; {seconds:.1f} s, {pace}", file=sys.stderr)
    return failed


def run(args: argparse.Namespace) -> int:
    from ..inputs.folders import chunks
    from .distributed import gather, merge_indexed, process_group, rank_path, shard, wait_all, world_from_env

    world = world_from_env()
    job = _job(args, world)
    with process_group(world, device=job.device, timeout_s=args.dist_timeout):
        _prepare_out(args.out, world)
        items = collect(args, world)
        t0 = time.perf_counter()  # every rank starts here together (the inputs were just shared out)
        mine = shard(chunks(items, job.batch), rank=world.rank, world=world.size)
        rows: dict[int, dict] = {}
        try:
            _run_batches(job, mine, rows, resume=args.resume, world=world)
        finally:  # also when interrupted: the summary of what finished
            ordered = [rows[i] for i in sorted(rows)]
            summary = args.out / "summary.csv"
            _write_summary(rank_path(summary, world) if world.distributed else summary, ordered)
            _print_failures(ordered, world)
        wait_all(world, timeout_s=args.dist_timeout)
        parts = gather(sorted(rows.items()), world)
        failed = 0
        if world.main:
            merged = merge_indexed(parts, total=len(items))
            if world.distributed:
                _write_summary(summary, merged)
            failed = _finish(merged, args.out, time.perf_counter() - t0)
        wait_all(world, timeout_s=args.dist_timeout)  # no rank leaves before summary.csv is written
    return 1 if failed and not world.launched else 0
