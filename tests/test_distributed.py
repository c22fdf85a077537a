"""Dataset-scale runs: sharding and merging by hand-made expectations, and real ``torchrun`` runs (gloo, CPU,
loopback only) of a tiny checkpoint over a folder of tiny images, compared array by array with one process.

The runs that must be stopped part way go through a small launcher script written here: it stands a gate in for
``vitviz.inputs.image.load_image`` that holds one chosen input until the test says so (or kills the rank there), so an
interruption lands at a known point instead of racing the clock.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitviz.cli import TIMING_FIELDS, main
from vitviz.cli.distributed import (
    Interrupted,
    MergeError,
    World,
    backend_for,
    interruptible,
    local_device,
    merge_indexed,
    rank_path,
    shard,
    world_from_env,
)
from vitviz.inputs.folders import chunks, collect_inputs, items_for, loader

from .helpers import encode, noise

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240  # one torchrun run of the tiny model; generous for a loaded 2-core CI machine
N_GOOD = 9
BAD = "sub/broken.jpg"

GATED = """
import os, sys, time
from pathlib import Path
import vitviz.inputs.image

gate, release = os.environ["GATE_NAME"], Path(os.environ["GATE_RELEASE"])
real = vitviz.inputs.image.load_image

def gated(source, **kw):
    if Path(source).name == gate:
        Path(os.environ["GATE_DIR"], f"held-{rank}").touch()
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real(source, **kw)

rank = os.environ.get("RANK", "single")
vitviz.inputs.image.load_image = gated
Path(os.environ["GATE_DIR"], f"pid-{rank}").write_text(str(os.getpid()))
from vitviz.cli import main
code = main(sys.argv[1:])
Path(os.environ["GATE_DIR"], f"rc-{rank}").write_text(str(code))
raise SystemExit(code)
"""


# --- pieces, by hand-made expectations ------------------------------------------------------------------------------


def test_shard_is_round_robin_disjoint_and_complete():
    items = list("abcdefg")
    parts = [shard(items, rank=r, world=3) for r in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert shard(items, rank=0, world=1) == items
    with pytest.raises(ValueError):
        shard(items, rank=3, world=3)


def test_chunks_keep_batch_companions_whatever_the_world_size():
    items = list(range(10))
    assert chunks(items, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for world in (1, 2, 3):  # the same chunks, only dealt out differently
        dealt = [c for r in range(world) for c in shard(chunks(items, 4), rank=r, world=world)]
        assert sorted(dealt) == chunks(items, 4)


def test_merge_restores_input_order_and_refuses_gaps_and_repeats():
    assert merge_indexed([[(0, "a"), (2, "c")], [(1, "b")]], total=3) == ["a", "b", "c"]
    with pytest.raises(MergeError, match="reported by no rank"):
        merge_indexed([[(0, "a")], [(2, "c")]], total=3)
    with pytest.raises(MergeError, match="twice"):
        merge_indexed([[(0, "a"), (1, "b")], [(1, "b")]], total=2)
    with pytest.raises(MergeError, match="outside"):
        merge_indexed([[(5, "x")]], total=2)


def test_world_and_devices_from_torchrun_variables():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.distributed, w.main, w.launched) == (3, 4, 1, True, False, True)
    with pytest.raises(RuntimeError):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert backend_for("cpu") == "gloo" and "cuda:nccl" in backend_for("cuda:1") and "cpu:gloo" in backend_for("cuda")
    assert local_device("cuda", w) == "cuda:1" and local_device("cpu", w) == "cpu"
    assert local_device("cuda", World()) == "cuda"
    assert rank_path(Path("o/summary.csv"), w) == Path("o/summary.rank3-of-4.csv")


def test_sigterm_becomes_interrupted_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err, interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first
    assert err.value.signum == signal.SIGTERM and 128 + err.value.signum == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_inputs_recursive_lists_dedup_and_the_output_folder_left_out(tmp_path):
    (tmp_path / "d" / "deep" / "out").mkdir(parents=True)
    for name in ("d/b.png", "d/a.jpg", "d/deep/c.png", "d/deep/out/old.png", "d/notes.txt", "e.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# a comment\n\ne.png\nd/deep\n")
    found = collect_inputs([tmp_path / "d", tmp_path / "list.txt", tmp_path / "d" / ".." / "e.png",
                            tmp_path / "missing.jpg"], exclude=tmp_path / "d" / "deep" / "out")
    rel = [os.path.relpath(p, tmp_path) for p in found]
    # folder files before its subfolders, sorted; the list's entries relative to the list; e.png once; missing kept
    assert rel == ["d/a.jpg", "d/b.png", "d/deep/c.png", "e.png", "missing.jpg"]


def test_a_bad_file_is_reported_by_the_worker_that_decodes_it_and_the_worker_goes_on(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(encode(noise(20, 10), "PNG"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = items_for([bad, good, tmp_path / "missing.png"])
    got = [d for batch in loader(chunks(items, 1), workers=1) for d in batch]
    assert [d.item.index for d in got] == [0, 1, 2]  # in order, each once
    assert got[0].error and got[0].image is None and "bad.png" in got[0].error
    assert got[1].image is not None and got[1].image.original_size == (20, 10) and got[1].error is None
    assert got[2].error and "missing.png" in got[2].error
    assert list(loader([], workers=2)) == []  # a rank whose share is empty
    assert [d.item.index for b in loader([items], workers=2) for d in b] == [0, 1, 2]  # one batch: decoded here


# --- torchrun runs ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra: str) -> dict[str, str]:
    loop = next((n for _i, n in socket.if_nameindex() if n.startswith("lo")), "lo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": loop, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": "", **extra}
    env.pop("TORCHELASTIC_ERROR_FILE")
    return env


def torchrun(*launcher: str, program: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1", *launcher, *program, *args]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Tiny images in a folder with a subfolder and a bad file, listed with a list file too; the argument list."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i in range(N_GOOD):
        where = root / ("sub" if i % 3 == 0 else "") / f"img{i}.png"
        where.write_bytes(encode(noise(40 + 3 * i, 48 - i, seed=i), "PNG"))
    (root / BAD).write_bytes(b"<html>not an image</html>")
    return root


def analyze_args(photos: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    # one torch thread in every process (the ranks' and the reference's): greedy deletion's ranking turns the last
    # bits of a different thread split into a different order, so "bit for bit" holds at equal thread counts
    return ["analyze", str(photos), "--out", str(out), "--model", str(ckpt), "--img-size", "32", "--quiet",
            "--start-layer", "0", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def reference(photos, ckpt, tmp_path_factory):
    """One process, in this process, decoding in the main process: what every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        assert main(analyze_args(photos, out, ckpt, "--workers", "0", "--batch-size", "2")) == 1  # the bad file
    finally:
        torch.set_num_threads(threads)  # the CLI set this process's threads: give the suite its own back
    return out


def summary(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in csv.DictReader(path.open())]


def assert_same_outputs(out: Path, ref: Path) -> None:
    def outputs(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.suffix in (".npz", ".png"))

    names = outputs(ref)
    assert outputs(out) == names and len(names) == 2 * N_GOOD
    for name in names:
        if name.endswith(".npz"):
            a, b = np.load(out / name), np.load(ref / name)
            assert a.files == b.files
            for k in a.files:  # bit for bit, dtype included
                assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (name, k)
        else:
            assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(ref / name)))
    assert summary(out / "summary.csv") == summary(ref / "summary.csv")
    assert not list(out.glob(".*.tmp"))


def expected_rank_stems(ref: Path, *, world: int, batch: int) -> list[set[str]]:
    """Which rank does which input: chunks of ``batch`` consecutive inputs dealt out round-robin (by hand)."""
    stems = [r["stem"] for r in csv.DictReader((ref / "summary.csv").open())]
    return [{s for i, s in enumerate(stems) if (i // batch) % world == r} for r in range(world)]


def test_two_ranks_match_one_process_bit_for_bit(photos, ckpt, reference, tmp_path):
    out = tmp_path / "out"
    cmd = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), program=["-m", "vitviz"],
                   args=analyze_args(photos, out, ckpt, "--workers", "1", "--batch-size", "2"))
    proc = subprocess.run(cmd, cwd=ROOT, env=loopback_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a finished torchrun run exits 0, failures in the summary
    assert_same_outputs(out, reference)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len({r["image"] for r in rows}) == len(rows) == N_GOOD + 1  # every input exactly once
    bad = [r for r in rows if r["status"] == "failed"]
    assert [r["stem"] for r in bad] == ["broken"] and "HTML" in bad[0]["error"]
    assert sum("broken.jpg" in line for line in proc.stderr.splitlines()) == 1  # printed once, by its rank
    # each rank did its own share (and wrote its own summary of it)
    for rank, stems in enumerate(expected_rank_stems(reference, world=2, batch=2)):
        part = csv.DictReader((out / f"summary.rank{rank}-of-2.csv").open())
        assert {r["stem"] for r in part} == stems


def test_two_nodes_on_loopback_give_the_same_result(photos, ckpt, reference, tmp_path):
    out, port = tmp_path / "out", free_port()
    procs = [subprocess.Popen(torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                       "--master-port", str(port), program=["-m", "vitviz"],
                                       args=analyze_args(photos, out, ckpt, "--batch-size", "2")),
                              cwd=ROOT, env=loopback_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert_same_outputs(out, reference)


def gate_env(tmp_path: Path, gate: str) -> dict[str, str]:
    (tmp_path / "gate").mkdir()
    return loopback_env(GATE_NAME=gate, GATE_RELEASE=str(tmp_path / "gate" / "release"),
                        GATE_DIR=str(tmp_path / "gate"))


def wait_for(paths: list[Path], proc: subprocess.Popen, timeout_s: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"never appeared: {[p for p in paths if not p.exists()]}"
        time.sleep(0.1)


def finished_outputs_are_whole(out: Path) -> set[str]:
    """No temp file left, every npz under its final name reads back whole; the stems written."""
    assert not list(out.glob(".*.tmp"))
    for npz in out.glob("*.npz"):
        with np.load(npz) as d:
            for k in d.files:
                d[k]
    return {p.stem for p in out.glob("*.npz")}


def gated_run(photos, ckpt, out, tmp_path, *, gate_stem: str):
    """A 2-rank run (batch 1) held at ``gate_stem``: returns it once everything else that can finish has."""
    script = tmp_path / "gated.py"
    script.write_text(GATED)
    cmd = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), program=[str(script)],
                   args=analyze_args(photos, out, ckpt, "--workers", "0", "--batch-size", "1"))
    return subprocess.Popen(cmd, cwd=ROOT, env=gate_env(tmp_path, f"{gate_stem}.png"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def order(reference: Path) -> list[str]:
    return [r["stem"] for r in csv.DictReader((reference / "summary.csv").open())]


def test_killed_rank_fails_the_launcher_loudly_and_resume_does_the_rest(photos, ckpt, reference, tmp_path):
    stems = order(reference)
    gate = stems.index("img4")  # the rank that meets it stops there; the other finishes its share
    held, other = gate % 2, 1 - gate % 2
    before = [s for i, s in enumerate(stems) if s != "broken" and (i % 2 == other or i < gate)]
    out = tmp_path / "out"
    proc = gated_run(photos, ckpt, out, tmp_path, gate_stem="img4")
    try:
        wait_for([tmp_path / "gate" / f"held-{held}", out / f"summary.rank{other}-of-2.csv"], proc)
        os.kill(int((tmp_path / "gate" / f"pid-{held}").read_text()), signal.SIGKILL)
        log = proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "SIGKILL" in log  # the launcher says which rank died and how
    assert not (out / "summary.csv").exists()  # never a merged summary that looks complete
    done = finished_outputs_are_whole(out)
    assert done == set(before)
    inodes = {s: (out / f"{s}.npz").stat().st_ino for s in done}
    # resume, plain vitviz: only the rest is done, the finished outputs stay as they are
    cmd = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), program=["-m", "vitviz"],
                   args=analyze_args(photos, out, ckpt, "--batch-size", "1", "--resume"))
    res = subprocess.run(cmd, cwd=ROOT, env=loopback_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {s: (out / f"{s}.npz").stat().st_ino for s in done} == inodes
    assert f"({len(done)} kept from an earlier run)" in res.stderr
    assert_same_outputs(out, reference)  # batch 1 here, batch 2 there: each image alone in a pass either way
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["stem"] for r in rows if r["status"] == "ok" and r["forward_s"] == ""} == done  # kept: not timed


def test_sigint_leaves_whole_files_clean_exits_and_the_summary_of_what_finished(photos, ckpt, reference, tmp_path):
    stems = order(reference)
    gate = stems.index("img4")
    held, other = gate % 2, 1 - gate % 2
    before = [s for i, s in enumerate(stems) if s != "broken" and (i % 2 == other or i < gate)]
    out = tmp_path / "out"
    proc = gated_run(photos, ckpt, out, tmp_path, gate_stem="img4")
    try:
        wait_for([tmp_path / "gate" / f"held-{held}", out / f"summary.rank{other}-of-2.csv"], proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the launcher and both ranks
        log = proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    gate = tmp_path / "gate"
    assert [(gate / f"rc-{r}").read_text() for r in (0, 1)] == ["130", "130"], log[-3000:]
    assert finished_outputs_are_whole(out) == set(before)
    assert not (out / "summary.csv").exists()
    finished: set[str] = set()
    for rank in (0, 1):
        part = list(csv.DictReader((out / f"summary.rank{rank}-of-2.csv").open()))
        finished |= {r["stem"] for r in part if r["status"] == "ok"}
        assert all(r["status"] in ("ok", "failed") for r in part)
    assert finished == set(before)


def test_one_process_sigterm_exits_143_with_the_summary_of_what_finished(photos, ckpt, reference, tmp_path):
    stems = [s for s in order(reference) if s != "broken"]
    out = tmp_path / "out"
    script = tmp_path / "gated.py"
    script.write_text(GATED)
    proc = subprocess.Popen([sys.executable, str(script), *analyze_args(photos, out, ckpt, "--workers", "1")],
                            cwd=ROOT, env=gate_env(tmp_path, "img4.png"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    before = stems[: stems.index("img4")]
    try:
        wait_for([out / f"{s}.npz" for s in before], proc)
        time.sleep(0.3)  # its row is in too: it is waiting for the held image now (decoded ahead by the worker)
        proc.send_signal(signal.SIGTERM)
        (tmp_path / "gate" / "release").touch()  # the worker may finish; the run is stopped already
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, log[-3000:]
    assert finished_outputs_are_whole(out) == set(before)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["stem"] for r in rows if r["status"] == "ok"} == set(before)
    assert json.loads(str(np.load(out / f"{before[0]}.npz")["summary"]))["stem"] == before[0]
