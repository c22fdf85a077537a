"""``vitviz app`` binds 127.0.0.1 unless the operator exposes it (VITVIZ_HOST, or the ``host`` keyword of launch).

The argv tests check what is passed to ``streamlit run``; the server test starts the real launcher in a subprocess
and checks where it listens: every listening socket of its port on a loopback address (/proc/net/tcp, tcp6), a
connection to 127.0.0.1 accepted, and one to this machine's non-loopback address refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vitviz.app.launch import streamlit_argv

ROOT = Path(__file__).resolve().parents[1]
START_S = 60  # the server imports streamlit only (no model until a page is opened); generous on a busy 2-core box


def _option(argv: list[str], name: str) -> str:
    """The value streamlit will use for ``--name``: the last one given wins."""
    values = [argv[i + 1] for i, a in enumerate(argv) if a == name]
    assert values, f"{name} not passed: {argv}"
    return values[-1]


def test_the_app_binds_loopback_by_default(monkeypatch):
    monkeypatch.delenv("VITVIZ_HOST", raising=False)
    assert _option(streamlit_argv(port=8501, streamlit_args=[]), "--server.address") == "127.0.0.1"
    monkeypatch.setenv("VITVIZ_HOST", "")  # set but empty: still the default
    assert _option(streamlit_argv(port=8501, streamlit_args=[]), "--server.address") == "127.0.0.1"


def test_vitviz_host_and_the_host_keyword_expose_it(monkeypatch):
    monkeypatch.setenv("VITVIZ_HOST", "0.0.0.0")
    assert _option(streamlit_argv(port=8501, streamlit_args=[]), "--server.address") == "0.0.0.0"
    # the keyword (a CLI --host) beats the environment; None means "not given"
    assert _option(streamlit_argv(port=8501, streamlit_args=[], host="::1"), "--server.address") == "::1"
    assert _option(streamlit_argv(port=8501, streamlit_args=[], host=None), "--server.address") == "0.0.0.0"
    # streamlit options given by the user still come last and win
    argv = streamlit_argv(port=8501, streamlit_args=["--server.address", "10.0.0.1"], host="::1")
    assert _option(argv, "--server.address") == "10.0.0.1"
    assert _option(argv, "--server.port") == "8501"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_addresses() -> list[str]:
    """This machine's own IPv4/IPv6 addresses that are not loopback (nothing is sent to find them)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))  # UDP connect only picks the route's source address; no packet leaves
            found.add(s.getsockname()[0])
    good = []
    for text in found:
        addr = ipaddress.ip_address(text.split("%")[0])
        if not (addr.is_loopback or addr.is_unspecified or addr.is_link_local):
            good.append(str(addr))
    return sorted(good)


def _listening(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """Local addresses of the TCP sockets listening on ``port`` (Linux /proc), or None where /proc has none."""
    files = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(f.exists() for f in files):
        return None
    found = []
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            found.append(addr)
    return found


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def test_the_launched_server_listens_on_loopback_only(tmp_path):
    """The real launcher (what ``vitviz app`` and ``make app`` run), VITVIZ_HOST unset, in a subprocess."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VITVIZ_HOST" and not k.startswith("STREAMLIT_")}
    # a missing model: the warm-up is skipped at once (this test is about the socket, not the page)
    env.update(VITVIZ_APP_MODEL=str(tmp_path / "missing.pth"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    code = f"import sys; from vitviz.app.launch import launch; sys.exit(launch(port={port}, streamlit_args=[]))"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}"
            url = f"http://127.0.0.1:{port}/_stcore/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.read() == b"ok":
                    break
            assert time.monotonic() < deadline, f"no health after {START_S} s: {log.read_text()[-2000:]}"
            time.sleep(0.3)
        assert _connects("127.0.0.1", port)
        listening = _listening(port)
        if listening is not None:
            assert listening, "nothing listens on the port in /proc/net/tcp*"
            assert all(a.is_loopback for a in listening), f"listening on {listening}, not on loopback only"
        others = _non_loopback_addresses()
        if not others:
            pytest.skip("the server listens on loopback only (/proc); this machine has no non-loopback address "
                        "to try a connection from")
        reached = [a for a in others if _connects(a, port)]
        assert not reached, f"the app is reachable at {reached} (should listen on 127.0.0.1 only)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


_WARM_SCRIPT = """
import threading
import streamlit as st
from vitviz.app import launch
for name in ("vitviz-warm-up", "some-other-thread"):
    st.cache_data.clear(); st.cache_resource.clear()  # each thread fills cold caches (a hit warns of nothing)
    t = threading.Thread(target=launch.warm, name=name)
    t.start(); t.join()
print("warmed")
"""


def test_the_warm_up_prints_no_streamlit_bare_thread_warnings(tmp_path):
    """Start-up output has nothing that reads like an error: the warm-up fills Streamlit's caches outside any page
    run by design, and Streamlit's 'missing ScriptRunContext' / 'No runtime found' are silenced for that thread only
    (the same work in another bare thread still gets them: the control that this test can fail)."""
    import timm
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).state_dict(),
               ckpt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(VITVIZ_APP_MODEL=str(ckpt), VITVIZ_APP_ARCH="vit_tiny_patch16_224", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _WARM_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "warmed" in out.stdout, out.stderr[-2000:]
    assert "warm-up skipped" not in out.stderr, out.stderr[-2000:]
    assert "Thread 'vitviz-warm-up': missing ScriptRunContext" not in out.stderr, out.stderr[-2000:]
    assert "Thread 'some-other-thread': missing ScriptRunContext" in out.stderr, out.stderr[-2000:]
