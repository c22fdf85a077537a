"""Bounded load test of vitviz on loopback only: the library from threads and processes, the app over HTTP.

    python scripts/loadtest.py                       # starts the app on a free 127.0.0.1 port, stops it at the end
    python scripts/loadtest.py --url http://127.0.0.1:8501 --threads 4 --procs 2 --requests 8 --seconds 30

(a) The library: ``analyze`` + ``rollout_map`` with the default model at 224 px on the example images, from
``--threads`` threads sharing one model, then from ``--procs`` processes with a model each; throughput (analyses/s),
p50/p95 latency and errors. (b) The app: ``/`` and ``/_stcore/health`` from ``--http-threads`` threads,
``--http-requests`` requests in all; status errors. (c) Optional, ``--apptest N``: N Streamlit ``AppTest`` sessions
on app.py at once, each on a different example image, each checked for no exception and its own result.

Every phase stops at ``--requests`` per worker or ``--seconds``, whichever comes first. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "assets"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

__all__ = ["main"]


# ---------------------------------------------------------------------------------------------------------- report


def summary(name: str, latencies: list[float], errors: list[str], wall: float) -> dict:
    lat = sorted(latencies)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # nearest rank, no interpolation

    out = dict(phase=name, ok=len(lat), errors=len(errors), wall_s=round(wall, 2),
               per_s=round(len(lat) / wall, 3) if wall > 0 else None,
               p50_s=round(pct(0.50), 3) if lat else None, p95_s=round(pct(0.95), 3) if lat else None,
               mean_s=round(statistics.fmean(lat), 3) if lat else None, first_errors=errors[:3])
    print(json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------------------------------------------- (a) library


_MODEL = None


def _setup(img_size: int, torch_threads: int | None) -> None:
    """Load the default model and the example images once per process."""
    global _MODEL
    import torch

    from vitviz.inputs.image import load_image
    from vitviz.models import get_model

    if torch_threads:
        torch.set_num_threads(torch_threads)
    model, info = get_model("default", img_size=(img_size, img_size))
    images = [load_image(p) for p in sorted(ASSETS.glob("*.jpg"))]
    _MODEL = (model, info, images)


def _one(i: int) -> float:
    from vitviz.analysis.maps import rollout_map
    from vitviz.analysis.onepass import analyze
    from vitviz.settings import DEFAULTS

    model, info, images = _MODEL
    t0 = time.perf_counter()
    res = analyze(model, images[i % len(images)], info=info)
    heat = rollout_map(res.attention, info=info, settings=DEFAULTS)
    assert heat.shape == info.grid
    return time.perf_counter() - t0


def _worker_loop(worker: int, requests: int, deadline: float) -> tuple[list[float], list[str]]:
    lat, errs = [], []
    for k in range(requests):
        if time.time() >= deadline:
            break
        try:
            lat.append(_one(worker + k))
        except Exception as e:  # noqa: BLE001 - counted, not raised
            errs.append(f"{type(e).__name__}: {e}")
    return lat, errs


def _proc_worker(args: tuple[int, int, float, int, int | None]) -> tuple[list[float], list[str], float]:
    worker, requests, deadline, img_size, torch_threads = args
    t0 = time.perf_counter()
    if _MODEL is None:
        _setup(img_size, torch_threads)
        _one(worker)  # first-call warm-up, not counted
    setup = time.perf_counter() - t0
    lat, errs = _worker_loop(worker, requests, deadline)
    return lat, errs, setup


def library_threads(n: int, requests: int, seconds: float, img_size: int) -> dict:
    if _MODEL is None:
        _setup(img_size, None)
        _one(0)  # warm-up, not counted
    deadline = time.time() + seconds
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(lambda w: _worker_loop(w, requests, deadline), range(n)))
    wall = time.perf_counter() - t0
    return summary(f"library, {n} threads, one shared model", [x for p in parts for x in p[0]],
                   [x for p in parts for x in p[1]], wall)


def library_procs(n: int, requests: int, seconds: float, img_size: int) -> dict:
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")  # no forked torch state
    with cf.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        # model loading is not timed: every process loads and warms up before the clock starts
        warm = [pool.submit(_proc_worker, (w, 0, time.time() + 600, img_size, threads)) for w in range(n)]
        cf.wait(warm)
        deadline = time.time() + seconds
        t0 = time.perf_counter()
        parts = list(pool.map(_proc_worker, [(w, requests, deadline, img_size, threads) for w in range(n)]))
        wall = time.perf_counter() - t0
    return summary(f"library, {n} processes x {threads} torch threads", [x for p in parts for x in p[0]],
                   [x for p in parts for x in p[1]], wall)


# ----------------------------------------------------------------------------------------------------- (b) HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only, checked in main
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"streamlit exited with code {proc.returncode} before it was healthy")
        try:
            status, body = get(url + "/_stcore/health", timeout=2)
            if status == 200 and body.strip() == b"ok":
                return time.perf_counter() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url}/_stcore/health did not answer 'ok' within {timeout:.0f} s")


def http_load(url: str, threads: int, requests: int, seconds: float) -> dict:
    paths = ["/", "/_stcore/health"]
    deadline = time.time() + seconds
    counter = iter(range(requests))
    lock = threading.Lock()
    lat, errs = [], []

    def worker() -> None:
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            path = paths[i % len(paths)]
            t0 = time.perf_counter()
            try:
                status, body = get(url + path)
                ok = status == 200 and (body.strip() == b"ok" if "health" in path else b"<html" in body.lower())
            except (urllib.error.URLError, OSError) as e:
                ok, status = False, f"{type(e).__name__}: {e}"
            with lock:
                (lat.append(time.perf_counter() - t0) if ok else errs.append(f"{path}: {status}"))

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return summary(f"http GET / and /_stcore/health, {threads} threads", lat, errs, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------- (c) AppTest


def apptests(n: int, seconds: float) -> dict:
    """N AppTest sessions at once, each on its own example image: no exception, and its own image on the page."""
    from streamlit.testing.v1 import AppTest

    examples = sorted(p.name for p in ASSETS.glob("*.jpg"))
    lat, errs = [], []
    lock = threading.Lock()

    def session(i: int) -> None:
        example = examples[i % len(examples)]
        t0 = time.perf_counter()
        try:
            at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=seconds).run()
            at.selectbox(key="example").set_value(example).run()
            problems = [e.value for e in at.exception] + [e.value for e in at.error]
            if problems:
                raise RuntimeError(f"{example}: {problems[0]}")
            if at.selectbox(key="example").value != example:
                raise RuntimeError(f"{example}: the session shows {at.selectbox(key='example').value}")
            with lock:
                lat.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - counted
            with lock:
                errs.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    pool = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return summary(f"AppTest, {n} sessions at once", lat, errs, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running app on loopback (default: start one on a free port)")
    p.add_argument("--threads", type=int, default=4, help="library threads sharing one model")
    p.add_argument("--procs", type=int, default=2, help="library processes, one model each (0: skip)")
    p.add_argument("--requests", type=int, default=6, help="analyses per library worker at most")
    p.add_argument("--seconds", type=float, default=30, help="time cap per phase")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--http-threads", type=int, default=4)
    p.add_argument("--http-requests", type=int, default=200, help="HTTP requests in all")
    p.add_argument("--apptest", type=int, default=0, help="AppTest sessions at once (0: skip)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("threads", "requests", "http_threads", "http_requests"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.procs < 0 or args.apptest < 0 or not 0 < args.seconds <= 600:
        raise SystemExit("--procs and --apptest must be >= 0, --seconds in (0, 600]")
    proc = None
    if args.url:
        url = args.url.rstrip("/")
        if urllib.parse.urlsplit(url).hostname not in LOOPBACK:
            raise SystemExit(f"--url must be on loopback ({', '.join(sorted(LOOPBACK))}), got {url}")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    results = []
    try:
        started = wait_healthy(url, 60, proc)
        print(json.dumps(dict(app=url, healthy_after_s=round(started, 2), cpus=os.cpu_count())), flush=True)
        results.append(library_threads(1, args.requests, args.seconds, args.img_size))  # baseline
        results.append(library_threads(args.threads, args.requests, args.seconds, args.img_size))
        if args.procs:
            results.append(library_procs(args.procs, args.requests, args.seconds, args.img_size))
        results.append(http_load(url, args.http_threads, args.http_requests, args.seconds))
        if args.apptest:
            results.append(apptests(args.apptest, args.seconds * 4))
        status, body = get(url + "/_stcore/health")
        results.append(dict(phase="health after the load", status=status, body=body.decode(errors="replace")))
        print(json.dumps(results[-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r.get("errors") for r in results) or results[-1].get("status") != 200 else 0


if __name__ == "__main__":
    raise SystemExit(main())
