"""Benchmark: what vitviz's analysis costs next to timm's plain fused forward and next to the peers' hook-based way.

Run ``.venv/bin/python benchmarks/bench.py`` (``--help`` for the options); it prints a markdown report and with
``--out FILE`` also writes it. Every group of rows is timed side by side in one process, interleaved (one run of
each variant per round, the order rotated every round), after a warm-up; the median of ``--repeats`` rounds is
reported and divided by the plain fused forward of the same model on the same input. Peak memory is measured in a
fresh subprocess per variant (VmHWM on CPU after resetting it through ``/proc/self/clear_refs``, or
``torch.cuda.max_memory_allocated`` on CUDA), so one variant's peak never hides another's.

See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import plotly.io
import timm
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved, median_ms, min_ms, timed  # noqa: E402

from vitviz.analysis.maps import attention_distance, query_attention_maps, rollout_table  # noqa: E402
from vitviz.analysis.onepass import HALF_STORAGE_BYTES, Analysis, analyze, analyze_batch, attention_bytes  # noqa: E402
from vitviz.analysis.posembed import patch_pos_embed, pos_embed_similarity  # noqa: E402
from vitviz.figures import (  # noqa: E402
    MOSAIC_MAX_TOKENS,
    attention_distance_figure,
    head_grid_figure,
    layer_scrub_figure,
    overlay_figure,
    patch_grid_figure,
    similarity_map_figure,
    similarity_mosaic_figure,
)
from vitviz.inputs.image import fit_image, to_tensor  # noqa: E402
from vitviz.models import (  # noqa: E402
    ModelInfo,
    describe_model,
    get_model,  # noqa: E402
)
from vitviz.settings import DEFAULTS  # noqa: E402
from vitviz.walk.capture import attention_forward  # noqa: E402

__all__ = [
    "CASES",
    "Case",
    "PeerRollout",
    "resolve_device",
    "resolve_dtype",
    "sync",
    "time_interleaved",
    "peak_memory",
    "build_case",
    "forward_variants",
    "control_variants",
    "main",
]

CaseName = Literal["default-p14", "default-p8", "vit_b16-random"]
CASES: tuple[str, ...] = ("default-p14", "default-p8", "vit_b16-random")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = dict(ratio_p14=1.05, ratio_p8=1.20, control_ms=100.0, memory_ratio=1.5)
MEMORY_VARIANTS = ("plain", "analysis", "peers")


# ----------------------------------------------------------------------------------------------- device plumbing


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``; CUDA must be there (a benchmark never silently falls back to the CPU)."""
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock read after it covers them (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
        fns: dict[str, Callable[[], object]],
        *,
        device: torch.device,
        repeats: int = 7,
        warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each fn in inference mode, round-robin (:func:`_timing.interleaved`): every round runs
    each fn once, the order rotated per round, the device synchronised before and after every call."""
    with torch.inference_mode():
        return interleaved(fns, repeats=repeats, warmup=warmup, sync=lambda: sync(device))


# ----------------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1])


def peak_memory(fn: Callable[[], object], *, device: torch.device) -> tuple[int, int]:
    """(bytes in use before, peak bytes above that while ``fn`` runs and its result is alive).

    CUDA: allocated tensor memory. CPU: resident set (VmHWM reset via /proc/self/clear_refs, Linux >= 4.0).
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return before, peak - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS") * 1024
    with torch.inference_mode():
        out = fn()
    peak = _status_kb("VmHWM") * 1024
    del out
    return before, peak - before


# ------------------------------------------------------------------------------------------------ the peers' way


class PeerRollout:
    """vit-explain's way, for reference: a deep copy with unfused attention and hooks on ``attn_drop``.

    Every request runs the forward again, storing each layer's (B, H, T, T) probabilities on the CPU, then rolls out
    one layer range with full (T, T)·(T, T) products (mean over heads, (A + I) / 2, rows normalised):
    ``result = Â_l @ result`` for l = start..end, CLS row of the result.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        self.attentions: list[torch.Tensor] = []
        self.handles = []
        for blk in self.model.blocks:
            blk.attn.fused_attn = False
            self.handles.append(blk.attn.attn_drop.register_forward_hook(self._store))

    def _store(self, module, inputs, output) -> None:
        self.attentions.append(output.cpu())

    def unfused(self, x: torch.Tensor) -> torch.Tensor:
        """timm's own unfused forward (``fused_attn=False``, nothing kept), for scale: hooks detached meanwhile."""
        hooks = [blk.attn.attn_drop._forward_hooks for blk in self.model.blocks]
        saved = [dict(h) for h in hooks]
        for h in hooks:
            h.clear()
        try:
            return self.model(x)
        finally:
            for h, kept in zip(hooks, saved, strict=True):
                h.update(kept)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __call__(self, x: torch.Tensor, *, start: int = 0, end: int = -1) -> torch.Tensor:
        self.attentions = []
        self.model(x)
        attn = self.attentions[start: len(self.attentions) if end == -1 else end + 1]
        T = attn[0].shape[-1]
        eye = torch.eye(T)
        result = eye
        for a in attn:
            a = (a[0].float().mean(dim=0) + eye) / 2  # (T, T), heads fused
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result  # (T, T)·(T, T)
        return result[0]  # (T,) CLS row


# ------------------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    info: ModelInfo
    image: Image.Image
    x: torch.Tensor  # (1, 3, H, W) on the device, in the model's dtype
    device: torch.device
    dtype: torch.dtype


def sample_image(seed: int = 0, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A deterministic RGB image (gradients, two shapes, noise); no file, no network."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37 + yy / 53)], axis=-1) * 200
    img[(xx - 0.3 * w) ** 2 + (yy - 0.5 * h) ** 2 < (0.15 * h) ** 2] = (230, 40, 40)
    img[int(0.2 * h): int(0.7 * h), int(0.6 * w): int(0.8 * w)] = (30, 60, 220)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _model(name: str, *, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, ModelInfo]:
    if name == "default-p14":
        return get_model("default", img_size=(224, 224), device=str(device), precision=_PRECISION[dtype])
    if name == "default-p8":
        return get_model("default", patch_size=8, img_size=(224, 224), device=str(device),
                         precision=_PRECISION[dtype])
    if name == "vit_b16-random":
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(device=device, dtype=dtype)
        return model, describe_model(model, name="vit_base_patch16_224 (random weights)")
    raise SystemExit(f"unknown case {name!r}: choose from {', '.join(CASES)}")


def build_case(name: str, *, device: torch.device, dtype: torch.dtype, model=None) -> Case:
    """A model (or the one given), its description, the test image and its fitted input tensor."""
    model, info = (model, describe_model(model)) if model is not None else _model(name, device=device, dtype=dtype)
    image = sample_image()
    fitted = fit_image(image, input_size=info.img_size, fit="crop", crop_pct=info.crop_pct)
    x = to_tensor(fitted.pixels, mean=info.mean, std=info.std).to(device=device, dtype=dtype)
    return Case(name=name, model=model, info=info, image=image, x=x, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------- variants


def full_analysis(case: Case, *, discard_ratio: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``analyze`` + ``rollout_table`` do, minus image decode and fit: (attention, pos_sim, table).

    Mean head fusion; ``discard_ratio`` 0 is Abnar & Zuidema's plain rollout, the app's default is 0.9.
    """
    info = case.info
    need = attention_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens)
    store = torch.float16 if need > HALF_STORAGE_BYTES else torch.float32  # as analyze_batch decides
    attention = attention_forward(case.model, case.x, store_dtype=store, features=False).attention[0].numpy()
    sim = pos_embed_similarity(patch_pos_embed(case.model)).cpu().numpy().astype(np.float32)  # (N, N)
    # (L, L, gh, gw): every range the slider reaches
    table = rollout_table(attention, info=info, discard_ratio=discard_ratio)
    return attention, sim, table


def forward_variants(case: Case, peer: PeerRollout) -> dict[str, Callable[[], object]]:
    """The single-image rows; ``plain`` first (the floor every ratio divides by)."""
    return {
        "plain": lambda: case.model(case.x),
        "capture": lambda: attention_forward(case.model, case.x),
        "analysis": lambda: full_analysis(case),
        "defaults": lambda: full_analysis(case, discard_ratio=DEFAULTS.discard_ratio),
        "analyze": lambda: analyze(case.model, case.image, info=case.info),
        "peers": lambda: peer(case.x),
        "unfused": lambda: peer.unfused(case.x),
    }


def _serialised(build: Callable[[], object]) -> Callable[[], str]:
    return lambda: plotly.io.to_json(build(), validate=False)  # what st.plotly_chart sends


# app.py builds only the open tab (st.tabs on_change="rerun") and shares the cached Analysis (st.cache_resource,
# no copy): a control change costs the recompute plus the figures of one tab
APP_TABS = {
    "patch grid": ("view:patch_grid",),
    "position embeddings": ("view:pos_mosaic", "view:pos_map"),
    "rollout": ("view:layer_scrub",),
    "heads": ("view:head_grid",),
    "query patch": ("view:query_scrub", "view:query_heads"),
    "distance": ("view:distance",),
}


def control_variants(a: Analysis, table: np.ndarray) -> dict[str, Callable[[], object]]:
    """Server-side work after a control change, from the cached analysis (no new pass).

    ``data:*`` is what the app recomputes (the Analysis itself is shared through ``st.cache_resource``, no copy):
    ``rollout_table`` for a new head fusion or discard ratio, the query maps for a new query patch.
    ``view:*`` builds one figure as app.py does and serialises it as ``st.plotly_chart`` does
    (``plotly.io.to_json(fig, validate=False)``). ``view:overlay`` is not on the app page (a PNG download there).
    """
    info, p, px = a.info, a.info.patch_size, a.pixels
    L, n = info.depth, info.num_patches
    start, end = DEFAULTS.layer_range(L)
    query = (info.grid[0] // 2) * info.grid[1] + info.grid[1] // 2  # the app's default query patch

    def query_maps(q):  # app.py query_maps: (L, H, gh, gw)
        return np.stack([query_attention_maps(a.attention, info=info, layer=k, query=q) for k in range(L)])

    qmaps, cls_maps, dist = query_maps(query), query_maps(None), attention_distance(a.attention, info=info)
    labels = [f"layers {start}-{b}" for b in range(start, L)]
    views = {
        "view:patch_grid": lambda: patch_grid_figure(px, patch_size=p, grid=info.grid, highlight=query),
        "view:pos_mosaic": lambda: similarity_mosaic_figure(a.pos_sim, grid=info.grid),
        "view:pos_map": lambda: similarity_map_figure(a.pos_sim, grid=info.grid, index=query, patch_size=p, pixels=px),
        "view:layer_scrub": lambda: layer_scrub_figure(px, table[start, start:], patch_size=p, labels=labels,
                                                       active=end - start),
        "view:head_grid": lambda: head_grid_figure(cls_maps[end], patch_size=p, pixels=px),
        "view:query_scrub": lambda: layer_scrub_figure(px, qmaps.mean(axis=1), patch_size=p,
                                                       labels=[f"layer {b}" for b in range(L)], active=end),
        "view:query_heads": lambda: head_grid_figure(qmaps[end], patch_size=p, pixels=px),
        "view:distance": lambda: attention_distance_figure(dist),
        "view:overlay": lambda: overlay_figure(px, table[start, end], patch_size=p),
    }
    if n > MOSAIC_MAX_TOKENS:  # the app shows a note instead of the mosaic
        del views["view:pos_mosaic"]
    return {
        "data:rollout_table fusion=max": lambda: rollout_table(a.attention, info=info, head_fusion="max"),
        "data:rollout_table discard=0.9": lambda: rollout_table(a.attention, info=info, discard_ratio=0.9),
        "data:query maps, new patch": lambda: query_maps(query + 1),
        **{k: _serialised(v) for k, v in views.items()},
    }


# ---------------------------------------------------------------------------------------------- memory subprocess


def _memory_child(case_name: str, variant: str, device: torch.device, dtype: torch.dtype) -> dict:
    case = build_case(case_name, device=device, dtype=dtype)
    peer = PeerRollout(case.model) if variant == "peers" else None
    fn = {
        "plain": lambda: case.model(case.x),
        "analysis": lambda: full_analysis(case),
        "peers": lambda: peer(case.x),
    }[variant]
    with torch.inference_mode():
        fn()  # warm-up: lazy initialisation (kernels, thread pools) is not what we measure
    if peer is not None:
        peer.attentions = []  # what the warm-up stored would otherwise be freed inside the measured call
    before, delta = peak_memory(fn, device=device)
    return dict(before=before, delta=delta)


def measure_memory(case_name: str, variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter; large blocks are mmapped so that freed memory leaves the RSS."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_memory", case_name, variant, "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {case_name}/{variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------- report


def _machine(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, TypeError):
        cpu = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)[1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"CPU {cpu.strip()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"torch.set_num_threads({threads}){gpu}; torch {torch.__version__}, timm {timm.__version__}, "
            f"python {platform.python_version()}; load average at start {load:.2f}")


ROW_LABELS = {
    "plain": "plain `model(x)`, fused attention (floor)",
    "capture": "`attention_forward` with features (a whole forward + capture)",
    "analysis": "vitviz full analysis (capture + pos-sim + `rollout_table`)",
    "defaults": "the same at the app's defaults (discard 0.9)",
    "analyze": "`analyze(model, PIL image)` (fit + capture + pos-sim)",
    "peers": "peers: deep copy, unfused + hooks, one rollout (L full products)",
    "unfused": "timm's own unfused forward (`fused_attn=False`), for scale",
}


Check = tuple[str, bool]


def _forward_rows(case: Case, args: argparse.Namespace) -> tuple[list[str], list[Check]]:
    peer = PeerRollout(case.model)
    t = time_interleaved(forward_variants(case, peer), device=case.device, repeats=args.repeats, warmup=args.warmup)
    peer.close()
    floor, low, n = median_ms(t["plain"]), min(t["plain"]), case.info.num_tokens
    rows = [f"| {case.name} | {n} | {ROW_LABELS[k]} | {median_ms(v):.1f} | {min_ms(v):.1f} | "
            f"{median_ms(v) / floor:.2f} | {min(v) / low:.2f} |" for k, v in t.items()]
    if case.name not in ("default-p14", "default-p8"):
        return rows, []
    limit, ratio = TARGETS["ratio_p14" if case.name == "default-p14" else "ratio_p8"], median_ms(t["analysis"]) / floor
    text = f"full analysis ≤ {limit:.2f}× plain forward ({case.name}): {ratio:.2f}×"
    if _noisy(t):
        text += f" — NOISY (a median over 1.25× its minimum; ratio of minima {min(t['analysis']) / low:.2f}×)"
    return rows, [(text, ratio <= limit)]


def _noisy(times: dict[str, list[float]]) -> bool:
    """Another job took the cores during part of the rounds: medians then mix quiet and loaded rounds."""
    return any(median_ms(v) > 1.25 * min_ms(v) for v in times.values())


def _control_rows(case: Case, args: argparse.Namespace) -> tuple[list[str], list[Check]]:
    a = analyze(case.model, case.image, info=case.info)
    table = rollout_table(a.attention, info=a.info)
    t = time_interleaved(control_variants(a, table), device=torch.device("cpu"),
                         repeats=args.repeats, warmup=args.warmup)
    c = {k: median_ms(v) for k, v in t.items()}
    rows = [f"| {case.name} | {k} | {c[k]:.1f} | {min_ms(v):.1f} |" for k, v in t.items()]
    data = max(v for k, v in c.items() if k.startswith("data:"))
    tabs = {tab: sum(c.get(k, 0.0) for k in views) for tab, views in APP_TABS.items()}
    worst = max(tabs, key=tabs.get)
    one = data + tabs[worst]
    rows += [f"| {case.name} | **control change: slowest recompute + the figures of the slowest tab ({worst})** | "
             f"**{one:.1f}** | |"]
    limit, noisy = TARGETS["control_ms"], " — NOISY" if _noisy(t) else ""
    return rows, [(f"control change ≤ {limit:.0f} ms, open tab ({case.name}): {one:.1f} ms{noisy}", one <= limit)]


def _batch_row(case: Case, args: argparse.Namespace) -> str:
    n = args.batch
    xb, images = case.x.expand(n, -1, -1, -1).contiguous(), [case.image] * n
    b = time_interleaved({"plain": lambda: case.model(xb),
                          "batch": lambda: analyze_batch(case.model, images, info=case.info)},
                         device=case.device, repeats=args.repeats, warmup=args.warmup)
    tp, tb = median_ms(b["plain"]), median_ms(b["batch"])
    return f"| {case.name} | {n} | {n / tp * 1e3:.2f} | {n / tb * 1e3:.2f} | {tb / tp:.2f} |"


def _memory_rows(name: str, args: argparse.Namespace) -> tuple[list[str], list[Check]]:
    mem = {v: measure_memory(name, v, args) for v in MEMORY_VARIANTS}
    base = mem["plain"]
    rows = [f"| {name} | {v} | {m['before'] / 2**20:.0f} | {m['delta'] / 2**20:.1f} | "
            f"{m['delta'] / max(base['delta'], 1):.2f} | "
            f"{(m['before'] + m['delta']) / (base['before'] + base['delta']):.2f} |" for v, m in mem.items()]
    if name != "default-p14":
        return rows, []
    limit, r = TARGETS["memory_ratio"], mem["analysis"]["delta"] / max(base["delta"], 1)
    return rows, [(f"analysis peak memory ≤ {limit:.1f}× plain forward's ({name}, peak delta): {r:.2f}×", r <= limit)]



APP_IMAGES = ("cat.jpg", "coffee.jpg")  # two of the app's examples: the first image, then a new one


def _app_rows(args: argparse.Namespace) -> tuple[list[str], list[Check]]:
    """The app's first pass on the default model (CPU), server side, through ``streamlit.testing.v1.AppTest``.

    Each round starts with empty Streamlit caches (a server's first visitor for this model; the conversion is cached
    on disk): the page load (reads the cached weights) is timed apart, then choosing an example (builds the model,
    decodes, fits, analyses, rolls out at the app's defaults, builds the open tab's figures), then a second example
    (model in memory, new image). Beside it, in the same rounds: a plain forward of the same model and the decode of
    the first image, for the target: first pass <= 3x the plain forward + the image decode.
    """
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import vitviz.models
    from vitviz.inputs.image import load_image
    from vitviz.models import get_model

    root = Path(__file__).resolve().parents[1]
    model, info = get_model("default", img_size=(224, 224))
    x = torch.randn(1, 3, *info.img_size)
    data = (root / "assets" / APP_IMAGES[0]).read_bytes()
    times: dict[str, list[float]] = {k: [] for k in ("plain", "decode", "page", "first", "second")}

    def step(key: str, fn: Callable[[], object], *, keep: bool) -> object:
        out, seconds = timed(fn)
        if keep:
            times[key].append(seconds)
        return out

    for r in range(args.warmup + args.repeats):
        keep = r >= args.warmup
        with torch.inference_mode():
            step("plain", lambda: model(x), keep=keep)
        step("decode", lambda: load_image(data, name=APP_IMAGES[0]), keep=keep)
        st.cache_data.clear()
        st.cache_resource.clear()
        vitviz.models._NATIVE.clear()  # the architecture's geometry, cached per process by vitviz
        gc.collect()
        at = step("page", lambda: AppTest.from_file(str(root / "app.py"), default_timeout=300).run(), keep=keep)
        for key, image in zip(("first", "second"), APP_IMAGES, strict=True):
            step(key, lambda image=image, at=at: at.selectbox(key="example").set_value(image).run(), keep=keep)
            if at.exception or at.error:
                raise RuntimeError(f"the app failed on {image}: {[e.value for e in [*at.exception, *at.error]]}")
    ms = {k: median_ms(v) for k, v in times.items()}
    budget = 3 * ms["plain"] + ms["decode"]
    labels = {"plain": "plain forward (default model, 224 px)", "decode": f"decode {APP_IMAGES[0]} (`load_image`)",
              "page": "page load, empty caches (reads the cached weights)",
              "first": "first image: model build + analysis + rollout + open tab's figures",
              "second": "a new image, model in memory"}
    rows = [f"| {labels[k]} | {ms[k]:.0f} | {min_ms(v):.0f} | {ms[k] / budget:.2f} |" for k, v in times.items()]
    limit = f"first pass ≤ 3× plain forward + decode ({budget:.0f} ms)"
    return rows, [(f"{limit}, first image: {ms['first']:.0f} ms", ms["first"] <= budget),
                  (f"{limit}, new image with the model in memory: {ms['second']:.0f} ms", ms["second"] <= budget)]

def run(args: argparse.Namespace) -> tuple[str, bool]:
    """Every group for every case; returns the markdown report and whether every target passed."""
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    torch.set_num_threads(args.threads)
    head = [f"# vitviz benchmark ({args.device}, {args.dtype})", "",
            f"{_machine(device, args.threads)}. {datetime.datetime.now():%Y-%m-%d %H:%M}.", "",
            f"Median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds; "
            "ratio = median / median of the plain fused forward of the same model and input.", ""]
    fwd = ["| case | tokens | row | median ms | min ms | × plain (medians) | × plain (minima) |",
           "|---|---:|---|---:|---:|---:|---:|"]
    ctl = ["| case | step | median ms | min ms |", "|---|---|---:|---:|"]
    batch = ["| case | batch | plain img/s | `analyze_batch` img/s | × plain (time) |", "|---|---:|---:|---:|---:|"]
    unit = "allocated (CUDA)" if device.type == "cuda" else "RSS"
    mem = [f"| case | variant | {unit} before, MiB | peak delta, MiB | delta × plain | peak total × plain |",
           "|---|---|---:|---:|---:|---:|"]
    checks: list[Check] = []
    for name in args.cases:
        case = build_case(name, device=device, dtype=dtype)
        print(f"[{name}] {case.info.grid[0]}x{case.info.grid[1]} patches, {case.info.num_tokens} tokens",
              file=sys.stderr)
        for rows, table in ((_forward_rows(case, args), fwd), (_control_rows(case, args), ctl)):
            table += rows[0]
            checks += rows[1]
        if args.batch > 0:
            batch.append(_batch_row(case, args))
        del case
        gc.collect()
        if not args.no_memory:
            rows, found = _memory_rows(name, args)
            mem += rows
            checks += found

    app: list[str] = []
    if args.app and "default-p14" in args.cases and device.type == "cpu" and dtype == torch.float32:
        rows, found = _app_rows(args)
        app = ["| step (app, server side) | median ms | min ms | × (3 × plain + decode) |", "|---|---:|---:|---:|",
               *rows]
        checks += found

    out = head + ["## Single image, one pass", "", *fwd, ""]
    out += ["## After a control change (cached analysis, no new pass; CPU, server side)", "",
            "Each `view:*` builds the figure and serialises it with `plotly.io.to_json(fig, validate=False)` "
            "as `st.plotly_chart` does.", "", *ctl, ""]
    out += ["## The app's first pass (AppTest, default model, CPU)", "", *app, ""] if app else []
    out += ["## Batch (CLI style)", "", *batch, ""] if args.batch > 0 else []
    out += [f"## Peak memory ({unit}), one fresh process per variant", "", *mem, ""] if not args.no_memory else []
    scope = "" if (device.type == "cpu" and args.threads == 2) else " (the targets were set for the CPU, 2 threads)"
    out += [f"## Targets{scope}", "", *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks], ""]
    return "\n".join(out), all(ok for _, ok in checks)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model and input dtype (default fp32)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per group, median reported (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--batch", type=int, default=4, help="images for the analyze_batch row, 0 = skip (default 4)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="models/cases to run")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up, batch 2")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-app", dest="app", action="store_false", help="skip the app's first-pass rows (AppTest)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target fails")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--_memory", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch = 2, 1, min(args.batch, 2)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup and --batch >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory:
        torch.set_num_threads(args.threads)
        print(json.dumps(_memory_child(*args._memory, resolve_device(args.device), resolve_dtype(args.dtype))))
        return 0
    report, ok = run(args)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
