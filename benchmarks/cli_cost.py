"""Benchmark: ``vitviz analyze`` at its defaults against a forward-only script over the same photos (issue 20's
"the CLI's default costs ≤ 1.5× a forward-only script"), in interleaved rounds.

``.venv/bin/python benchmarks/cli_cost.py [--photos DIR] [--every 3] [--limit 30] [--rounds 5]``

Each round runs ``vitviz analyze DIR --threads 1`` (its defaults otherwise: rollout from layer 1, PNG and npz per
image, no explanation method) in a subprocess, then :func:`distributed.forward_only` (the same files through the
same DataLoader, fitted and normalised, timm's fused ``forward_features``, nothing kept) at one thread in this
process; images/s as ``analyze`` reports it (model loading and start-up left out) and as the loop times itself.
Also one ``analyze`` round at its default threads (the machine's cores) for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed as bench  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, default=bench.DEFAULT_PHOTOS)
    p.add_argument("--every", type=int, default=3, help="every k-th photo by name")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "photos"
        subset.mkdir()
        chosen = sorted(args.photos.iterdir())[:: args.every][: args.limit]
        for f in chosen:
            (subset / f.name).symlink_to(f.resolve())
        cli, fwd = [], []
        for r in range(args.rounds):
            cli.append(bench.run_analyze(subset, Path(tmp) / f"out{r}", procs=1, threads=1,
                                         args=["--device", "cpu", "--threads", "1"])[1])
            fwd.append(bench.forward_only(subset, device="cpu", precision="fp32", batch=1, workers=0, threads=1))
        default = bench.run_analyze(subset, Path(tmp) / "out-default", procs=1, args=["--device", "cpu"])[1]
    print(f"{len(chosen)} photos, {args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"analyze --threads 1: {cli} images/s; forward-only, 1 thread: {[round(v, 2) for v in fwd]} images/s")
    print(f"cost of analyze's default against the forward-only script (ratio of medians): "
          f"{statistics.median(fwd) / statistics.median(cli):.2f}x; analyze at its default threads: {default} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
