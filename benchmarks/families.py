"""Benchmark: the one-pass capture next to timm's plain fused forward for each ViT family vitviz walks.

Run ``.venv/bin/python benchmarks/families.py`` (``--help`` for the options); it prints a markdown report and with
``--out FILE`` also writes it (benchmarks/results-families.md). ViT-S-sized models with random weights (no download)
at 224 px: a plain ViT-S/16, a DINOv3-like Eva (RoPE on q and k, 4 registers, layer scale), an EVA-02-S (RoPE,
SwiGLU with its norm, a learned position embedding besides) and a BEiT at ViT-S width (a relative position bias in
every block, layer scale). All variants of all models run side by side in one process, interleaved (one call of each
per round, the order rotated every round) after warm-up rounds; the ratio is the capture's median over the plain
forward's median of the same model on the same input (and the same for the minima).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved, median_ms, min_ms  # noqa: E402

from vitviz.walk.capture import attention_forward  # noqa: E402

# name -> (timm architecture, kwargs): ViT-S-sized (width 384, 6 heads, 12 blocks) members of each family
MODELS = {
    "vit_s16": ("vit_small_patch16_224", {}),
    "eva_rope (DINOv3-S/16)": ("vit_small_patch16_dinov3", {}),
    "eva02_s14 (RoPE, SwiGLU)": ("eva02_small_patch14_224", {}),
    "beit_s16 (relative bias)": ("beit_base_patch16_224", dict(embed_dim=384, num_heads=6)),
}


def _model(arch: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, img_size=224, num_classes=1000, **kwargs).eval()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds, all threads


def run(*, repeats: int, warmup: int, threads: int, clock: str = "wall") -> str:
    torch.set_num_threads(threads)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models = {name: _model(arch, kw) for name, (arch, kw) in MODELS.items()}
    fns = {}
    for name, m in models.items():
        fns[f"{name}|plain"] = lambda m=m: m(x)
        fns[f"{name}|capture"] = lambda m=m: attention_forward(m, x)
    with torch.inference_mode():
        times = interleaved(fns, repeats=repeats, warmup=warmup, clock=CLOCKS[clock])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    now = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    what = ("wall-clock" if clock == "wall"
            else "CPU time of this process (all its threads; waiting for a core not counted)")
    lines = [
        f"## {what.split(' (')[0]} (CPU, fp32, 224 px, random weights)",
        "",
        f"{now}, {platform.processor() or platform.machine()}, torch {torch.__version__}, timm {timm.__version__},"
        f" {threads} threads, load average {load:.2f} at the end;"
        f" {repeats} interleaved rounds after {warmup} warm-up rounds, all rows in one process; ms of {what}.",
        "`plain`: `model(x)`, timm's fused attention (SDPA). `capture`: `attention_forward(model, x)`: the blocks"
        " walked with explicit softmax into one (L, B, H, T, T) buffer, every layer's attention kept, plus the"
        " features.",
        "",
        "| model | tokens | plain ms (median / min) | capture ms (median / min) | × plain (medians) "
        "| × plain (minima) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        p, c = times[f"{name}|plain"], times[f"{name}|capture"]
        tokens = int(m.patch_embed.num_patches) + int(m.num_prefix_tokens)
        lines.append(f"| {name} | {tokens} | {median_ms(p):.1f} / {min_ms(p):.1f} | {median_ms(c):.1f} / "
                     f"{min_ms(c):.1f} | {median_ms(c) / median_ms(p):.2f} | {min_ms(c) / min_ms(p):.2f} |")
    return "\n".join(lines) + "\n"


_READING = (
    "On a machine shared with other jobs (see the load average) the rows at 2 threads wait for cores (and their"
    " OpenMP workers spin, which counts as CPU time too), so they swing by several times between rounds; the CPU"
    " time at 1 thread counts only the work done and is the table to read. RoPE (Eva) and the relative bias (BEiT)"
    " add a rotation of q and k or a gathered (H, T, T) bias per block to the capture, as they do to timm's own"
    " forward.\n"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tables", default="wall:2,cpu:1",
                    help="clock:threads per table, comma-separated; clock wall or cpu (this process's CPU seconds)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    specs = [t.strip().partition(":") for t in args.tables.split(",")]
    tables = [run(repeats=args.repeats, warmup=args.warmup, threads=int(n or 1), clock=c) for c, _, n in specs]
    report = "# The capture per ViT family\n\n" + _READING + "\n" + "\n".join(tables)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
