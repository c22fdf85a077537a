"""Builders and independent references shared by the tests (no test module imports another test module).

Everything here is built in memory: tiny random timm ViTs (``pretrained=False``), images and files made by hand,
and naive references (timm's own unfused path, loops and full matrix products) to check vitviz against.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import importlib
import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import ResPostBlock


def require_extra(module: str, extra: str):
    """Import an optional extra's ``module`` for a test (``pip install vitviz[extra]``): skipped where it is not
    installed on purpose (the lower-bound venv sets VITVIZ_WITHOUT_EXTRAS), a failure in CI where it should be."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") in ("true", "1") and not os.environ.get("VITVIZ_WITHOUT_EXTRAS"):
            pytest.fail(f"{module} is missing: CI installs every extra (requirements-dev.txt, vitviz[{extra}])")
        pytest.skip(f"needs the optional extra vitviz[{extra}] ({module})", allow_module_level=True)


TINY = dict(pretrained=False, embed_dim=32, depth=3, num_heads=4, num_classes=0)

# The token layouts every explanation and faithfulness test runs on (tests/test_explain.py, test_deletion.py,
# test_faithfulness.py, test_methods.py): timm kwargs, "arch" picks another timm architecture.
LAYOUTS = {
    "cls": dict(),  # a CLS token only
    "registers": dict(reg_tokens=2, no_embed_class=True),  # CLS + 2 registers, positions on the patches only (DINOv2)
    "distilled": dict(arch="deit_tiny_distilled_patch16_224"),  # CLS + distillation token, both with positions
    "non_square": dict(img_size=(24, 40)),  # a 3 x 5 patch grid
    "post_norm": dict(block_fn=ResPostBlock, qk_norm=True),  # x + norm(attn(x)) blocks, q/k LayerNorms
    "avg_pool": dict(global_pool="avg"),  # the head averages the patches' own streams (fc_norm, no final norm)
}
# layouts that some methods refuse with a sentence (tests/test_methods.py lists which)
REFUSED_LAYOUTS = {
    "attn_pool": dict(global_pool="map"),  # an attention-pool head (timm's MAP, as SigLIP's)
}


def tiny_vit(arch: str = "vit_tiny_patch16_224", *, img_size=32, patch_size=8, seed: int = 0, **kwargs):
    """A tiny random ViT in eval mode; extra kwargs go to timm.create_model."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**TINY, "img_size": img_size, "patch_size": patch_size, **kwargs})
    # random init leaves LayerScale tiny and attention near uniform: spread the weights so the tests see structure
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif "qkv.weight" in name:
                p.normal_(0, 0.5)
            elif "pos_embed" in name or "cls_token" in name or "reg_token" in name or "dist_token" in name:
                p.normal_(0, 1.0)
    return model.eval()


def layout_model(layout: str = "cls", *, num_classes: int = 0, dtype=torch.float32, seed: int = 0):
    """A tiny random ViT (32 px or 24 x 40, P = 8, 3 layers x 4 heads, width 32) with one of :data:`LAYOUTS` (or
    :data:`REFUSED_LAYOUTS`).

    The final LayerNorm (the average pool's fc_norm) gets a spread weight and bias: with weight 1 and bias 0, |f|² is
    constant, so ⟨f(x), f(x̃)⟩ has no gradient at x̃ = x; trained norms (like the default model's) have neither.
    """
    kwargs = dict({**LAYOUTS, **REFUSED_LAYOUTS}[layout])
    arch = kwargs.pop("arch", "vit_tiny_patch16_224")
    model = tiny_vit(arch, num_classes=num_classes, seed=seed, **kwargs)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for norm in (model.norm, model.fc_norm):
            if getattr(norm, "weight", None) is not None:
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.5)
    return model.to(dtype)


def layout_image(model, *, seed: int = 0):
    """One random image (1, 3, H, W) at the model's input size, in its parameters' dtype."""
    h, w = model.patch_embed.img_size
    dtype = next(model.parameters()).dtype
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


def eager_reference(model, x):
    """timm's own unfused path on a private copy: fused_attn off, probabilities read at attn_drop."""
    ref = copy.deepcopy(model)
    probs = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: probs.append(out.detach()))
    with torch.no_grad():
        feats = ref.forward_features(x)
    return torch.stack(probs, dim=1), feats


def in_threads(work, *, workers: int, rounds: int) -> dict[tuple[int, int], object]:
    """``work(worker, round)`` from ``workers`` threads at once, ``rounds`` calls each: the results by (worker,
    round). The first exception of any thread is raised here."""
    got: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []

    def run(worker):
        try:
            for r in range(rounds):
                got[(worker, r)] = work(worker, r)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got


def hook_state(model: torch.nn.Module) -> tuple:
    """Everything a capture could leave behind on a shared model: hooks, fused-attention flags, modes, attributes."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())
    flags = tuple(bool(blk.attn.fused_attn) for blk in model.blocks)
    modes = tuple(m.training for m in model.modules())
    grads = tuple(p.requires_grad for p in model.parameters())
    return hooks, flags, modes, grads, sorted(vars(model).keys())


def random_attention(L=4, H=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, T, T, generator=g, dtype=torch.float64).mul(2).softmax(-1)


def naive_rollout(attn, *, start, end, fusion, ratio, source=0):
    """Abnar & Zuidema by the book: fuse, discard the lowest non-CLS-column entries, +I, row-normalise, and
    Ã(l) = Â(l) · Ã(l-1) with full matrix products (vit-explain: ``result = a @ result``); row ``source`` of Ã."""
    A = attn.numpy()
    L, H, T, _ = A.shape
    result = np.eye(T)
    for layer in range(start, end + 1):
        if isinstance(fusion, int):
            m = A[layer, fusion].copy()
        else:
            m = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](A[layer], axis=0)
        cand = sorted((m[i, j], i, j) for i in range(T) for j in range(T) if j != 0)
        for _v, i, j in cand[: int(ratio * T * (T - 1))]:
            m[i, j] = 0.0
        m = m + np.eye(T)
        for i in range(T):
            m[i] = m[i] / m[i].sum()
        result = m @ result  # full matrix product, the newer layer on the left
    return result[source]


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))


def png_header_only(w: int, h: int) -> bytes:
    """A well-formed (valid CRCs) PNG declaring w x h RGB pixels with almost no pixel data: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + png_chunk(b"IEND", b""))


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bad_crc_png() -> bytes:
    data = bytearray(encode(noise(20, 20), "PNG"))
    data[-20] ^= 0xFF  # a byte inside the IDAT payload: its CRC no longer matches
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(noise(64, 48), "JPEG")
    return data[: len(data) // 2]


def run_cli(paths, out: Path, ckpt: Path, *extra: str) -> int:
    from vitviz.cli import main

    return main(["analyze", *map(str, paths), "--out", str(out), "--model", str(ckpt), "--img-size", "32", "--quiet",
                 *extra])


def peak_rss_growth(fn) -> tuple[int, object]:
    """(peak RSS above the start while ``fn`` ran, what it returned or raised), from /proc (Linux)."""
    gc.collect()
    with contextlib.suppress(OSError):  # freed heap back to the system: growth then needs fresh pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current one
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    with open("/proc/self/statm") as f:
        start = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - the caller checks what it was
        out = exc
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return peak - start, out


def app_serves(monkeypatch, model: torch.nn.Module, path: Path, *, arch: str, kwargs: dict) -> Path:
    """Save ``model`` at ``path`` as a safetensors checkpoint naming ``arch`` and ``kwargs``, and make it the app's
    model for this test (fresh Streamlit caches, the Hub offline, no checkpoint folder): the AppTests' set-up."""
    import json

    import huggingface_hub
    import streamlit as st
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": arch, "kwargs": json.dumps(kwargs)})
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("VITVIZ_APP_MODEL", str(path))
    monkeypatch.delenv("VITVIZ_APP_ARCH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("VITVIZ_CHECKPOINT_DIR", raising=False)
    return path
