"""Benchmark: ``vitviz analyze`` images/s with one and two processes (torchrun), and on a GPU against a plain forward.

CPU (the default)::

    nice -n 10 .venv/bin/python benchmarks/distributed.py --out benchmarks/results-distributed.md

runs ``vitviz analyze`` over the photos (``--photos``, default ``../shared/data/photos`` beside the checkout) with the
default model as one process (``--workers`` 0, 1 and 2 decoding processes) and as two torchrun ranks (gloo on
127.0.0.1), and checks that the two-rank run's ``summary.csv`` equals the one-process run's apart from the timing
columns (and compares their npz arrays). GPU (one per rank; run it where one is lent)::

    .venv/bin/python benchmarks/distributed.py --device cuda --out benchmarks/results-distributed-gpu.md

times ``analyze`` at fp32 and bf16, batch 1 and 64, decoding in DataLoader workers, against a forward-only loop over
the same files through the same DataLoader (fit, normalise, timm's fused ``forward_features``, nothing kept), and
with ``--procs 1,2,...`` also one rank per GPU. The photos are repeated (``--copies``, default 8 on CUDA) as
symlinks under other names so that batch 64 has something to fill.

images/s is what the CLI's last line reports: the inputs a run handled over the time from the moment the ranks
have their shares (model loaded, process group up) to the merged summary written, so interpreter start-up, imports
and model loading are left out; the forward-only loop is timed the same way (after a warm-up pass over 4 batches).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import timed  # noqa: E402

from vitviz.cli import TIMING_FIELDS  # noqa: E402

DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "photos"
_PACE = re.compile(r"; ([0-9.]+) s, ([0-9.]+) images/s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    loop = next((n for _i, n in socket.if_nameindex() if n.startswith("lo")), "lo")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "GLOO_SOCKET_IFNAME": loop}


def run_analyze(photos: Path, out: Path, *, procs: int, args: list[str], threads: int = 0) -> tuple[float, float]:
    """One ``vitviz analyze`` run (``procs`` torchrun ranks when > 1; ``threads`` torch threads per process, 0:
    torch's default, which torchrun sets to 1): its seconds and images/s as it reports them."""
    analyze = ["analyze", str(photos), "--out", str(out), "--quiet", *args]
    if procs == 1:
        cmd = [sys.executable, "-m", "vitviz", *analyze]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "vitviz", *analyze]
    env = {**_env(), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    found = _PACE.findall(proc.stderr)
    if proc.returncode not in (0, 1) or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds, pace = found[-1]
    return float(seconds), float(pace)


def forward_only(photos: Path, *, device: str, precision: str, batch: int, workers: int, threads: int = 0) -> float:
    """images/s of the same files through the same DataLoader, fitted and normalised, then timm's fused forward."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from vitviz.inputs.folders import chunks, collect_inputs, items_for, loader
    from vitviz.inputs.image import fit_image, to_tensor
    from vitviz.models import get_model

    model, info = get_model("default", img_size=224, device=device, precision=precision)
    param = next(model.parameters())
    batches = chunks(items_for(collect_inputs([photos])), batch)
    interp = info.interpolation if info.interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"

    def pixels(im):
        return fit_image(im.image, input_size=info.img_size, fit="crop", crop_pct=info.crop_pct,
                         interpolation=interp).pixels

    def run(these) -> int:
        n = 0
        with torch.inference_mode():
            for decoded in loader(these, workers=workers):
                ims = [d.image for d in decoded if d.image is not None]
                x = torch.cat([to_tensor(pixels(im), mean=info.mean, std=info.std) for im in ims])
                model.forward_features(x.to(device=param.device, dtype=param.dtype))
                n += len(ims)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n

    run(batches[:4])  # warm-up: kernels chosen, caches filled
    n, seconds = timed(lambda: run(batches))
    return n / seconds


def untimed(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in csv.DictReader(path.open())]


def compare(a: Path, b: Path) -> str:
    """Whether two runs' summaries match apart from timings, and how their npz arrays compare."""
    import numpy as np

    same_summary = untimed(a / "summary.csv") == untimed(b / "summary.csv")
    files = sorted(p.name for p in a.glob("*.npz"))
    bitwise, worst = 0, 0.0
    for name in files:
        with np.load(a / name) as x, np.load(b / name) as y:
            equal = x.files == y.files and all(x[k].tobytes() == y[k].tobytes() for k in x.files)
            bitwise += equal
            for k in x.files:
                if x[k].dtype.kind == "f":
                    worst = max(worst, float(np.max(np.abs(x[k].astype(np.float64) - y[k]), initial=0.0)))
    return (f"summary.csv {'identical' if same_summary else 'DIFFERENT'} apart from {', '.join(TIMING_FIELDS)} "
            f"({len(untimed(a / 'summary.csv'))} rows); npz arrays bit-identical in {bitwise} of {len(files)} files, "
            f"largest float difference {worst:.3g}")


def copies_of(photos: Path, copies: int, into: Path) -> Path:
    """``photos`` repeated ``copies`` times as symlinks with distinct names (so no two share an output stem)."""
    if copies <= 1:
        return photos
    for k in range(copies):
        for p in sorted(photos.iterdir()):
            (into / f"c{k}_{p.name}").symlink_to(p.resolve())
    return into


def cpu_report(photos: Path, tmp: Path, workers: list[int], procs: list[int], threads: list[int]) -> list[str]:
    lines = ["| processes | torch threads each | `--workers` | seconds | images/s |", "|---|---|---|---|---|"]
    outs: dict[int, Path] = {}
    for n in procs:
        for t in threads if n == 1 else [0]:
            for w in workers if n == 1 else workers[:2]:
                out = tmp / f"cpu-{n}-{t}-{w}"
                seconds, pace = run_analyze(photos, out, procs=n, threads=t,
                                            args=["--device", "cpu", "--workers", str(w)])
                shown = t or ("1 (torchrun's)" if n > 1 else f"{os.cpu_count()} (torch's)")
                lines.append(f"| {n} | {shown} | {w} | {seconds:.1f} | {pace:.2f} |")
                outs.setdefault(n, out)
                print(lines[-1], file=sys.stderr)
    fwd = forward_only(photos, device="cpu", precision="fp32", batch=1, workers=0, threads=1)
    lines.append(f"| 1, forward only (same files, same DataLoader) | 1 | 0 | | {fwd:.2f} |")
    if 1 in outs:
        lines += ["", *(f"- {n} processes vs 1: {compare(outs[1], outs[n])}" for n in outs if n != 1)]
    return lines


def gpu_report(photos: Path, tmp: Path, workers: int, procs: list[int], precisions: list[str],
               batches: list[int]) -> list[str]:
    import torch

    lines = [f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}", "",
             "| precision | batch | ranks | analyze images/s (per rank) | forward only images/s | analyze / forward |",
             "|---|---|---|---|---|---|"]
    for precision in precisions:
        for batch in batches:
            fwd = forward_only(photos, device="cuda", precision=precision, batch=batch, workers=workers)
            for n in procs:
                args = ["--device", "cuda", "--precision", precision, "--batch-size", str(batch), "--workers",
                        str(workers)]
                _s, pace = run_analyze(photos, tmp / f"gpu-{precision}-{batch}-{n}", procs=n, args=args)
                lines.append(f"| {precision} | {batch} | {n} | {pace:.1f} ({pace / n:.1f}) | {fwd:.1f} | "
                             f"{pace / n / fwd:.2f} |")
                print(lines[-1], file=sys.stderr)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", default=None, help="comma list on CPU (default 0,1,2); one number on CUDA (default 4)")
    p.add_argument("--procs", default=None, help="comma list of process counts (default 1,2 on CPU, 1 on CUDA)")
    p.add_argument("--threads", default="0,1", help="CPU, one process: torch threads to try (0: torch's default)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--copies", type=int, default=None, help="repeat the photos (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    a = p.parse_args()
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    cuda = a.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="vitviz-dist-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "copies").mkdir()
        photos = copies_of(a.photos, a.copies if a.copies is not None else 8 if cuda else 1, tmp / "copies")
        n = len(list(photos.iterdir()))
        head = [f"`benchmarks/distributed.py --device {a.device}` on {platform.node()} ({os.cpu_count()} CPUs, load "
                f"average {os.getloadavg()[0]:.2f} at start), {datetime.date.today()}: {n} photos from {a.photos.name}"
                f"/, default model (DINOv2 ViT-S/14, 224 px, centre crop), outputs PNG + npz.", ""]
        if cuda:
            body = gpu_report(photos, tmp, ints(a.workers or "4")[0], ints(a.procs or "1"), a.precisions.split(","),
                              ints(a.batches))
        else:
            body = cpu_report(photos, tmp, ints(a.workers or "0,1,2"), ints(a.procs or "1,2"), ints(a.threads))
    report = "\n".join(head + body) + "\n"
    print(report)
    if a.out:
        a.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
