"""Checks of the benchmark's plumbing (device, dtype, clocks, memory, the peers' reference), on the CPU with a tiny
random ViT. Part of the suite (pyproject testpaths); alone: ``.venv/bin/pytest benchmarks/test_bench.py``.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from vitviz.walk.capture import attention_forward  # noqa: E402


def tiny_vit(dtype=torch.float32):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=0)
    return model.eval().to(dtype)


def test_dtype_and_device_names():
    assert bench.resolve_dtype("fp32") is torch.float32
    assert bench.resolve_dtype("bf16") is torch.bfloat16
    assert bench.resolve_dtype("fp16") is torch.float16
    assert bench.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="cpu or cuda"):
        bench.resolve_device("mps")
    with pytest.raises(SystemExit, match="fp32"):
        bench.resolve_dtype("int8")
    args = bench.parse_args(["--device", "cpu", "--dtype", "bf16", "--quick", "--batch", "8"])
    assert (args.dtype, args.repeats, args.warmup, args.batch) == ("bf16", 2, 1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_refused_when_absent():
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.resolve_device("cuda")


def test_clocks_sync_cuda_around_every_call_and_rounds_rotate(monkeypatch):
    syncs, log = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    times = bench.time_interleaved(fns, device=torch.device("cuda"), repeats=3, warmup=1)
    assert log == list("abc" "bca" "cab" "abc")  # round-robin, order rotated per round, warm-up round first
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert len(syncs) == 2 * len(log)  # before and after every call
    syncs.clear()
    bench.time_interleaved(fns, device=torch.device("cpu"), repeats=1, warmup=0)
    assert syncs == []


def test_peak_memory_cuda_reads_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350)
    assert bench.peak_memory(lambda: None, device=torch.device("cuda")) == (100, 250)
    assert calls == ["reset"]


def test_peak_memory_cpu_sees_a_transient_allocation():
    def transient():
        # 16 MiB of fresh pages straight from mmap, touched, freed before return: malloc's reuse of memory that
        # earlier tests left resident (its mmap threshold grows after frees) cannot hide it
        size = 16 * 2**20
        with mmap.mmap(-1, size) as m:
            for i in range(0, size, mmap.PAGESIZE):
                m[i] = 1
            return m[0]

    bench.peak_memory(transient, device=torch.device("cpu"))  # first call: malloc arenas settle
    _, small = bench.peak_memory(lambda: None, device=torch.device("cpu"))
    _, big = bench.peak_memory(transient, device=torch.device("cpu"))
    assert small < 4 * 2**20
    assert big >= 15 * 2**20  # the peak was reset before the call, so this peak is the call's own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_case_and_variants_keep_device_and_dtype(dtype):
    case = bench.build_case("tiny", device=torch.device("cpu"), dtype=dtype, model=tiny_vit(dtype))
    assert case.x.shape == (1, 3, 64, 64) and case.x.dtype == dtype
    peer = bench.PeerRollout(case.model)
    with torch.inference_mode():
        out = {k: fn() for k, fn in bench.forward_variants(case, peer).items()}
    assert out["plain"].dtype == dtype
    attention, sim, table = out["analysis"]
    assert attention.shape == (3, 3, 17, 17) and np.allclose(attention.sum(-1), 1, atol=1e-3)
    assert sim.shape == (16, 16) and table.shape == (3, 3, 4, 4)
    assert out["peers"].shape == (17,) and abs(out["peers"].sum().item() - 1) < 1e-3
    a = out["analyze"]
    views = bench.control_variants(a, table)
    assert all(isinstance(views[k](), str) for k in views if k.startswith("view:"))
    assert views["data:rollout_table fusion=max"]().shape == (3, 3, 4, 4)


def test_peers_reference_matches_an_independent_rollout_and_leaves_the_model_alone():
    model = tiny_vit()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    peer = bench.PeerRollout(model)
    with torch.inference_mode():
        got = peer(x, start=0, end=-1)
        attn = attention_forward(model, x).attention[0].double()  # (L, H, T, T), walked without hooks
    assert len(peer.attentions) == 3
    np.testing.assert_allclose(torch.stack([a[0] for a in peer.attentions]).numpy(), attn.numpy(), atol=1e-5)
    # Abnar & Zuidema: the CLS row of Â_L ··· Â_1, with Â = rows-normalised (mean over heads + I), by loops
    L, H, T, _ = attn.shape
    result = np.eye(T)
    for layer in range(L):
        m = attn[layer].numpy().mean(axis=0) + np.eye(T)
        m = np.array([row / row.sum() for row in m])
        result = m @ result
    np.testing.assert_allclose(got.numpy(), result[0], atol=1e-5)
    peer.close()
    assert all(blk.attn.fused_attn == model.blocks[0].attn.fused_attn for blk in model.blocks)
    assert all(not blk.attn.attn_drop._forward_hooks for blk in model.blocks)
    assert all(not blk.attn.attn_drop._forward_hooks for blk in peer.model.blocks)
