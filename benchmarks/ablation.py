"""Head ablation's cost: the batched table's time per head relative to one plain forward, measured side by side.

Run ``nice -n 10 .venv/bin/python benchmarks/ablation.py --out benchmarks/results-ablation.md`` (2 CPU threads;
it took 25 minutes on a busy shared machine). A ViT-S/14-sized random model (``vit_small_patch14_dinov2``, 12 layers
x 6 heads, width 384, pretrained=False) at 224 px (16 x 16 patches + CLS), one random image. Timed in interleaved rounds
(:func:`_timing.interleaved`: each round runs every variant once, the order rotated), medians of wall time and of
this process's CPU time (all threads; time spent waiting for a core on a shared machine is not counted):

- ``forward``: the plain fused ``model.forward_features(x)`` (timm's own forward, SDPA attention);
- ``walk``: the same pass through vitviz's one walk of the blocks (unfused attention), what an ablation runs;
- ``table zero`` / ``table mean``: :func:`vitviz.experiments.ablation.head_table`, every one of the L·H heads
  ablated on its own, in batches of ``--batch-size`` copies of the image (the intact reference given, not timed).

The row: (table time / (L·H)) / forward time, the cost of one head's ablation in plain forwards.
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

from _timing import interleaved, median_ms  # noqa: E402

from vitviz.experiments.ablation import head_table, reference  # noqa: E402
from vitviz.walk.blocks import embed, softmax_probs, walk  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).eval()


def _measure(args) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    model = _model()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    heads = len(model.blocks) * model.blocks[0].attn.num_heads
    ref = reference(model, x)
    fns = {
        "forward": lambda: model.forward_features(x),
        "walk": lambda: walk(model, embed(model, x), probs=softmax_probs),
        "table zero": lambda: head_table(model, x, mode="zero", ref=ref, batch_size=args.batch_size),
        "table mean": lambda: head_table(model, x, mode="mean", ref=ref, batch_size=args.batch_size),
    }
    with torch.inference_mode():
        wall = interleaved(fns, repeats=args.repeats, warmup=1)
        cpu = interleaved(fns, repeats=args.repeats, warmup=0, clock=time.process_time)
    return wall, cpu, heads


def _report(wall, cpu, heads: int, args, load: float) -> str:
    fwd_w, fwd_c = median_ms(wall["forward"]), median_ms(cpu["forward"])
    lines = ["# Head ablation: the table's time per head relative to a forward", "",
             "`nice -n 10 .venv/bin/python benchmarks/ablation.py` (issue 21 item 4). A ViT-S/14-sized random model "
             f"(`vit_small_patch14_dinov2`, pretrained=False: 12 layers x 6 heads = {heads} heads, width 384) at "
             f"224 px (257 tokens), one image, {args.threads} torch threads, batches of {args.batch_size} copies of "
             f"the image (one head ablated in each), {args.repeats} interleaved rounds; medians.", "",
             "| what | wall ms | CPU ms (all threads) | per head / forward (wall) | per head / forward (CPU) |",
             "|---|---:|---:|---:|---:|"]
    for name in wall:
        w, c = median_ms(wall[name]), median_ms(cpu[name])
        n = heads if name.startswith("table") else 1
        lines.append(f"| {name} | {w:.0f} | {c:.0f} | {w / n / fwd_w:.2f} | {c / n / fwd_c:.2f} |")
    lines += ["", "**Row: ablation time per head relative to a forward** = (table time / (L·H)) / forward time: "
              f"**{median_ms(wall['table zero']) / heads / fwd_w:.2f}** (zero), "
              f"**{median_ms(wall['table mean']) / heads / fwd_w:.2f}** (mean) by wall time; "
              f"{median_ms(cpu['table zero']) / heads / fwd_c:.2f} and "
              f"{median_ms(cpu['table mean']) / heads / fwd_c:.2f} by CPU time.", "",
             "Every ablated head runs a whole pass: the layers before the ablated one are recomputed (the same "
             "for every sample), and the walk's attention is unfused (the `walk` row against `forward`).", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, timm {timm.__version__}, python {platform.python_version()}; load average at "
             f"start {load:.2f} (a shared machine: wall times are inflated, the CPU-time ratios are the steadier). "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the report here (Markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    wall, cpu, heads = _measure(args)
    text = _report(wall, cpu, heads, args, load)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
