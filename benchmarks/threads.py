"""Torch threads on a shared CPU: torch's default (one per core) against vitviz's share (cores ÷ concurrent jobs).

``.venv/bin/python benchmarks/threads.py [--rounds 3] [--out benchmarks/results-threads.md]``

What the app does at once, measured: ``K`` Python threads in one process (the page's pass and the explanation jobs
beside it), each running an explanation of a ViT-S/14-sized random model at 224 px. Each configuration runs in a
fresh process (torch's thread count is a process setting), with and without added load: ``cores`` spinning Python
processes started beside it (each keeps one core busy, as other users' jobs do on a shared box). Reported: the
median wall time of all ``K`` explanations together, over ``--rounds`` rounds, and the ratio default ÷ shared.
The load average at the start is printed: "no added load" on a machine others use is not idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, statistics, sys, threading, time
import timm, torch
from vitviz.explain import explain
threads, k, method, rounds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
x = torch.randn(1, 3, 224, 224)
explain(model, x, method=method)  # warm-up
walls, cpus = [], []
for _ in range(rounds):
    jobs = [threading.Thread(target=explain, args=(model, x), kwargs=dict(method=method)) for _ in range(k)]
    t0, c0 = time.perf_counter(), time.process_time()
    for j in jobs: j.start()
    for j in jobs: j.join()
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
print(json.dumps(dict(wall=statistics.median(walls), cpu=statistics.median(cpus))))
"""

_SPIN = "while True: pass"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run(threads: int, k: int, method: str, rounds: int, *, loaded: bool) -> tuple[float, float]:
    """Median wall and CPU seconds (all of the process's threads) of ``k`` explanations at once."""
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(_cores() if loaded else 0)]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", _WORKER, str(threads), str(k), method, str(rounds)],
                             capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        return float(got["wall"]), float(got["cpu"])
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default="1,3", help="concurrent explanations, a list (the app: up to 2 jobs + the "
                    "page: 3; the CLI and a lone visitor: 1)")
    ap.add_argument("--methods", default="rollout:start=1,discard=0.9,chefer")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-threads.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from vitviz.device import cpu_threads

    cores, counts = _cores(), [int(k) for k in args.jobs.split(",")]
    methods = ["rollout:start=1,discard=0.9", "chefer"] if args.methods == ap.get_default("methods") else \
        args.methods.split(";")
    load = os.getloadavg()[0]
    lines = [f"# Threads on a shared CPU ({platform.processor() or platform.machine()}, {cores} cores)", "",
             f"`benchmarks/threads.py --rounds {args.rounds} --jobs {args.jobs}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load:.1f} at the start. "
             "K explanations at once in one process (Python threads; ViT-S/14 size, 224 px, random weights); median "
             f"wall time of the K together over {args.rounds} rounds. Loaded: {cores} spinning processes beside it. "
             f"Torch's default is {cores} threads; vitviz's share is cores ÷ K. Wall and CPU seconds (CPU: all the "
             "process's threads; spinning OpenMP threads count, and on a busy machine a process with more threads "
             "takes a larger share of the cores from the others, so its wall time alone flatters it).", "",
             "| method | K | load | default: wall s / CPU s | share: wall s / CPU s (threads) | wall ratio |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        for k in counts:
            for loaded in (False, True):
                shared = cpu_threads(k)
                (dw, dc), (sw, sc) = (_run(n, k, method, args.rounds, loaded=loaded) for n in (cores, shared))
                row = (f"| `{method}` | {k} | {'loaded' if loaded else 'no added load'} | {dw:.2f} / {dc:.2f} | "
                       f"{sw:.2f} / {sc:.2f} ({shared}) | {dw / sw:.2f} |")
                print(row, flush=True)
                lines.append(row)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
