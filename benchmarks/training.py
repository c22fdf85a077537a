"""The tutorial's experiment, measured: a tiny ViT trained from scratch on scikit-learn's digits (32 px) at patch
sizes 2/4/8 and embedding dimensions 32/64/128 -> validation accuracy and seconds; optionally the probe's fit time
on the embedded DINOv2 for a labelled folder.

``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/training.py [--threads 2] [--rows full|reduced] [--probe FOLDER]
[--out benchmarks/results-training.md]``

Every row runs :func:`vitviz.experiments.train.train_vit` with the default recipe (TrainConfig: AdamW, warm-up then
cosine, batches of 32, depth 4, 4 heads) and the same seed. Reported per row: the validation accuracy (the fixed 20%
split), the wall time of training, the process's CPU time (on a shared machine the wall time also counts the
others' load; CPU time / threads is what an idle machine would take, roughly), the epochs that ran and the first
epoch at which the validation accuracy reached 95%, with its wall time. The load average is written beside each
row. The file is rewritten after each row, so a long run leaves what it finished.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = [(4, 64), *((p, d) for p in (2, 4, 8) for d in (32, 64, 128) if (p, d) != (4, 64))]  # the target row first
REDUCED = [(4, 64), (2, 64), (8, 64), (4, 32), (4, 128)]  # the target row first, then one axis at a time


def _row(patch: int, dim: int, threads: int, epochs: int, max_seconds: float | None) -> dict:
    from vitviz.experiments.train import TrainConfig, train_vit, training_data

    config = replace(TrainConfig(), patch_size=patch, embed_dim=dim, epochs=epochs, max_seconds=max_seconds)
    data = training_data("digits", config)
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    done = train_vit(data, config, threads=threads)
    cpu = time.process_time() - cpu0
    reached = next((s for s in done.history if s.val_accuracy is not None and s.val_accuracy >= 0.95), None)
    return dict(patch=patch, dim=dim, tokens=(32 // patch) ** 2, acc=done.val_accuracy, wall=done.seconds, cpu=cpu,
                epochs=max(s.epoch for s in done.history), stopped=done.stopped or "",
                reached=f"epoch {reached.epoch}, {reached.seconds:.0f} s" if reached else "not reached",
                load=f"{load0:.1f} / {os.getloadavg()[0]:.1f}")


def _probe(folder: Path, threads: int) -> list[str]:
    """The probe on the embedded DINOv2 at 224 px: embeddings (first time, then cached) and the head's fit."""
    from vitviz.experiments.data import labelled_images
    from vitviz.experiments.probe import fit_probe
    from vitviz.models import get_model

    model, info = get_model("default", img_size=224, device="cpu")
    t0 = time.perf_counter()
    data = labelled_images(folder, img_size=224, crop_pct=info.crop_pct, interpolation=info.interpolation)
    read = time.perf_counter() - t0
    lines = []
    for what in ("first fit (embeddings computed)", "second fit (embeddings cached)"):
        load0 = os.getloadavg()[0]
        probe = fit_probe(model, data, mean=info.mean, std=info.std, key=("default", 224))
        lines.append(f"| {what} | {len(data.labels)} | {len(data.class_names)} | {probe.accuracy:.3f} | "
                     f"{probe.seconds:.1f} | {read:.1f} | {load0:.1f} |")
    return lines


def _write(out: Path, rows: list[dict], probe: list[str], args) -> None:
    import torch

    text = [f"# Training a tiny ViT on digits (32 px), {args.threads} torch threads", "",
            f"`benchmarks/training.py --threads {args.threads} --rows {args.rows} --epochs {args.epochs}"
            + (f" --max-seconds {args.max_seconds:g}" if args.max_seconds else "") + "`; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
            "Depth 4, 4 heads, batches of 32, AdamW lr 1e-3 (warm-up one epoch, cosine to 0), seed 0, the fixed "
            "20% validation split of 1,797 digits. Wall time on a machine shared with other jobs (load average at "
            "the row's start / end); CPU time / threads estimates an idle machine.", "",
            "| patch | dim | tokens | val. accuracy | wall s | CPU s | epochs | 95% reached | load | note |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    text += [f"| {r['patch']} | {r['dim']} | {r['tokens']} | {r['acc']:.3f} | {r['wall']:.0f} | {r['cpu']:.0f} | "
             f"{r['epochs']} | {r['reached']} | {r['load']} | {r['stopped']} |" for r in rows]
    if probe:
        text += ["", "## Probe: a linear head on the embedded DINOv2 ViT-S/14 (224 px, logistic, L-BFGS)", "",
                 "| run | images | classes | held-out accuracy | fit s | reading the images s | load |",
                 "|---|---:|---:|---:|---:|---:|---:|", *probe]
    out.write_text("\n".join(text) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", choices=("full", "reduced"), default="full")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=None, help="bound each row's training (default: none)")
    p.add_argument("--probe", type=Path, default=None, help="a labelled folder to time the probe on")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-training.md")
    args = p.parse_args()
    rows: list[dict] = []
    probe = _probe(args.probe, args.threads) if args.probe else []
    for patch, dim in FULL if args.rows == "full" else REDUCED:
        rows.append(_row(patch, dim, args.threads, args.epochs, args.max_seconds))
        _write(args.out, rows, probe, args)
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
