"""The analysis pipeline shared by the app and the CLI: one forward pass, then everything the views need.

``analyze`` runs the model once on a fitted image and keeps every layer's attention; everything else (rollout
for any layer range, raw attention of one layer or head, a query patch's attention, attention distances) is cheap
arithmetic on that capture, so moving a control never re-runs the model.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .attention import attention_forward
from .errors import OutOfMemoryError, ParameterError, ResourceError
from .image import FittedImage, LoadedImage, fit_image, to_tensor, whole_image_size
from .models import MAX_IMG_SIZE, ModelInfo, build_model, describe_model, load_source
from .posembed import patch_pos_embed, pos_embed_similarity
from .rollout import (
    FUSIONS,
    HeadFusion,
    check_layer_range,
    cls_attention,
    rollout_all,
    rollout_matrices,
    rollout_row,
    tokens_to_grid,
)

__all__ = [
    "DEFAULTS",
    "Settings",
    "Analysis",
    "FitMode",
    "attention_bytes",
    "get_model",
    "native_patch_size",
    "input_size_for",
    "analyze",
    "analyze_batch",
    "analyze_with_fallback",
    "rollout_table",
    "rollout_map",
    "raw_attention_maps",
    "query_attention_maps",
    "attention_distance",
    "export_arrays",
]

FitMode = Literal["crop", "whole"]


def _silence_read_only_warning() -> None:
    """Analysis arrays are read-only and the rollout reads them through ``torch.from_numpy`` without writing.

    torch warns about that once per process; trigger the warning here, at import (single-threaded), and drop it.
    """
    probe = np.zeros(1)
    probe.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(probe)


_silence_read_only_warning()
MAX_ATTENTION_BYTES = int(float(os.environ.get("VITVIZ_MAX_ATTENTION_MB", "3072")) * 2**20)
# Above this the capture is kept in fp16 (softmax still in fp32): at patch 8 / 224 px (785 tokens, 177 MB in fp32)
# that takes the default model's capture from 1.49x to 1.37x the plain forward on 2 CPU cores (fewer bytes to
# write and fault in); probabilities keep ~3 significant digits, plenty for maps.
HALF_STORAGE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Settings:
    """The knobs of one analysis; the app's and the CLI's defaults both come from ``DEFAULTS``.

    The start layer defaults to 1: the default DINOv2 model's layer 0 sends most CLS attention to one or two
    'spike' patches, and a rollout that includes it shows those instead of the objects. Discarding the weakest 90%
    of each layer's attention (never the CLS column) sharpens the map onto the objects: on a textured object pasted
    on a flat background (14% of the image) the default model's rollout puts 90% of its mass on the object with
    discard 0.9, 54% without (tests/test_analysis.py).
    """

    model: str = "default"
    patch_size: int | None = None  # None: the model's own
    img_size: int = 224
    fit: FitMode = "crop"
    start_layer: int = 1
    end_layer: int = -1  # -1: the last layer
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.9
    device: str = "auto"
    precision: str = "auto"

    def layer_range(self, depth: int) -> tuple[int, int]:
        start = self.start_layer if self.start_layer >= 0 else depth + self.start_layer
        end = self.end_layer if self.end_layer >= 0 else depth + self.end_layer
        if depth <= start and self.start_layer == DEFAULTS.start_layer:  # a one-layer model has no layer 1
            start = 0
        check_layer_range(start, end, depth)
        return start, end

    def check(self) -> None:
        if self.head_fusion not in FUSIONS:
            raise ParameterError(f"unknown head fusion {self.head_fusion!r}: choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ParameterError(f"discard ratio must be in [0, 1), got {self.discard_ratio}")
        if self.fit not in ("crop", "whole"):
            raise ParameterError(f"unknown fit {self.fit!r}: choose crop or whole")


DEFAULTS = Settings()


@dataclass(frozen=True)
class Analysis:
    """One image through one model: the fitted input, every layer's attention and the position similarity.

    Immutable: the dataclass is frozen and its arrays are read-only.
    """

    info: ModelInfo
    pixels: np.ndarray  # (H, W, 3) uint8, exactly what the model saw
    box: tuple[float, float, float, float]  # the part of the original image the model saw (left, top, right, bottom)
    fit_description: str
    attention: np.ndarray  # (L, H, T, T) rows sum to 1
    pos_sim: np.ndarray  # (N, N) cosine similarity of the patch position embeddings
    seconds: float  # the forward pass
    device: str
    dtype: str = "float32"  # the model's weights (the capture is kept in fp32, or fp16 when large)
    notes: tuple[str, ...] = field(default=())

    @property
    def grid(self) -> tuple[int, int]:
        return self.info.grid


def attention_bytes(*, depth: int, heads: int, tokens: int, itemsize: int = 4) -> int:
    return depth * heads * tokens * tokens * itemsize


def input_size_for(image: Image.Image, *, img_size: int, patch_size: int, fit: FitMode) -> tuple[int, int]:
    """The model input (H, W): a square for centre crop, the image's aspect ratio for the whole image."""
    if fit == "whole":
        return whole_image_size(image.size, target=img_size, patch_size=patch_size, max_side=MAX_IMG_SIZE)
    return img_size, img_size


@functools.lru_cache(maxsize=4)
def _source(model: str, arch: str | None):
    return load_source(model, arch=arch)


def native_patch_size(model: str = "default", *, arch: str | None = None) -> int:
    """The patch size a model was trained with (loads its weights once; cached)."""
    _source_, state = _source(model, arch)
    return int(state["patch_embed.proj.weight"].shape[-1])


@functools.lru_cache(maxsize=8)
def get_model(
        model: str = "default",
        *,
        patch_size: int | None = None,
        img_size: tuple[int, int] = (224, 224),
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        arch: str | None = None,
):
    """A built model and its description, cached by everything that shapes it (for the CLI and library use)."""
    source, state = _source(model, arch)
    built = build_model(source, state, patch_size=patch_size, img_size=img_size, device=device, dtype=dtype)
    return built, describe_model(built, source=source)


def analyze(
        model: torch.nn.Module,
        image: LoadedImage | Image.Image,
        *,
        info: ModelInfo | None = None,
        fit: FitMode = "crop",
        max_attention_bytes: int = MAX_ATTENTION_BYTES,
) -> Analysis:
    """Fit ``image`` to ``model``'s input, run one pass capturing every layer's attention, and describe the result."""
    return analyze_batch(model, [image], info=info, fit=fit, max_attention_bytes=max_attention_bytes)[0]


def analyze_batch(
        model: torch.nn.Module,
        images: list[LoadedImage | Image.Image],
        *,
        info: ModelInfo | None = None,
        fit: FitMode = "crop",
        max_attention_bytes: int = MAX_ATTENTION_BYTES,
) -> list[Analysis]:
    """``analyze`` for several images in one forward pass (all are fitted to the model's one input size)."""
    info = info or describe_model(model)
    need = attention_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens) * len(images)
    if need > max_attention_bytes:
        raise ResourceError(
            f"capturing attention at {info.grid[0]}x{info.grid[1]} patches ({info.num_tokens} tokens, "
            f"{info.depth} layers x {info.num_heads} heads, {len(images)} image(s)) needs {need / 2**20:,.0f} MB, "
            f"over the budget of {max_attention_bytes / 2**20:,.0f} MB: choose a larger patch size or a smaller "
            "image size (or raise VITVIZ_MAX_ATTENTION_MB)"
        )
    fitted: list[FittedImage] = [
        fit_image(
            im.image if isinstance(im, LoadedImage) else im,
            input_size=info.img_size,
            fit=fit,
            crop_pct=info.crop_pct,
            interpolation=_interp(info.interpolation),
        )
        for im in images
    ]
    param = next(model.parameters())
    x = torch.cat([to_tensor(f.pixels, mean=info.mean, std=info.std) for f in fitted])
    x = x.to(device=param.device, dtype=param.dtype)
    store = torch.float16 if need > HALF_STORAGE_BYTES else torch.float32
    t0 = time.perf_counter()
    try:
        cap = attention_forward(model, x, store_dtype=store, features=False)  # the maps need no features
    except torch.OutOfMemoryError as exc:  # CUDA (and MPS) allocation failure: free what we can, say so
        del x
        _empty_cache(param.device)
        raise OutOfMemoryError(
            f"the {param.device.type.upper()} ran out of memory for {len(images)} image(s) at "
            f"{info.grid[0]}x{info.grid[1]} patches ({need / 2**20:,.0f} MB of attention)"
        ) from exc
    seconds = (time.perf_counter() - t0) / len(images)
    sim = _pos_similarity(model)
    return [
        Analysis(
            info=info,
            pixels=_frozen(f.pixels),
            box=tuple(float(v) for v in f.box),
            fit_description=f.description,
            attention=_frozen(cap.attention[i].numpy()),
            pos_sim=sim,
            seconds=seconds,
            device=str(param.device),
            dtype=str(param.dtype).removeprefix("torch."),
            notes=tuple(im.notes) if isinstance(im, LoadedImage) else (),
        )
        for i, (im, f) in enumerate(zip(images, fitted, strict=True))
    ]


_POS_SIM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POS_SIM_LOCK = threading.Lock()


def _pos_similarity(model: torch.nn.Module) -> np.ndarray:
    """The (N, N) position similarity depends on the model only: computed once per model (and pos_embed state)."""
    pos = model.pos_embed
    stamp = (pos.data_ptr(), pos._version, tuple(pos.shape))
    with _POS_SIM_LOCK:
        hit = _POS_SIM.get(model)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    sim = _frozen(pos_embed_similarity(patch_pos_embed(model)).cpu().numpy().astype(np.float32))
    with _POS_SIM_LOCK:
        _POS_SIM[model] = (stamp, sim)
    return sim


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def analyze_with_fallback(
        load: Callable[[str], tuple[torch.nn.Module, ModelInfo]],
        images: list[LoadedImage | Image.Image],
        *,
        device: str,
        fit: FitMode = "crop",
) -> tuple[list[Analysis], str | None]:
    """``analyze_batch`` on ``load(device)``'s model; if the GPU runs out of memory, again on ``load("cpu")``.

    Returns the results and a notice for the user when the fallback happened (else None).
    """
    model, info = load(device)
    try:
        return analyze_batch(model, images, info=info, fit=fit), None
    except OutOfMemoryError as exc:
        if device == "cpu":
            raise
        model, info = load("cpu")
        return analyze_batch(model, images, info=info, fit=fit), f"{exc}; this analysis ran on the CPU instead."


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only, so one Analysis can be shared (e.g. by several app sessions) without anyone changing it."""
    a.flags.writeable = False
    return a


def _interp(name: str) -> str:
    return name if name in ("bicubic", "bilinear", "nearest") else "bicubic"


# ------------------------------------------------------------------------------------------------- derived views


def rollout_table(
        attention: np.ndarray,
        *,
        info: ModelInfo,
        head_fusion: HeadFusion | int = "mean",
        discard_ratio: float = 0.0,
) -> np.ndarray:
    """Rollout maps for every layer range: (L, L, gh, gw), [a, b] over layers a..b (NaN where a > b)."""
    mats = rollout_matrices(torch.from_numpy(attention), head_fusion=head_fusion, discard_ratio=discard_ratio)
    table = rollout_all(mats, source=0)
    return tokens_to_grid(table, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy().astype(np.float32)


def rollout_map(attention: np.ndarray, *, info: ModelInfo, settings: Settings = DEFAULTS) -> np.ndarray:
    """The rollout map for ``settings``' layer range, head fusion and discard ratio: (gh, gw)."""
    settings.check()
    start, end = settings.layer_range(info.depth)
    mats = rollout_matrices(
        torch.from_numpy(attention[start : end + 1]),
        head_fusion=settings.head_fusion,
        discard_ratio=settings.discard_ratio,
    )
    row = rollout_row(mats, start=0, end=end - start, source=0)
    return tokens_to_grid(row, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy().astype(np.float32)


def raw_attention_maps(attention: np.ndarray, *, info: ModelInfo, head_fusion: HeadFusion | int = "mean") -> np.ndarray:
    """Each layer's own CLS attention to the patches (no rollout): (L, gh, gw)."""
    rows = cls_attention(torch.from_numpy(attention), head_fusion=head_fusion, source=0)
    return tokens_to_grid(rows, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy().astype(np.float32)


def query_attention_maps(attention: np.ndarray, *, info: ModelInfo, layer: int, query: int | None = None) -> np.ndarray:
    """Per-head attention of one query token in one layer: (H, gh, gw). ``query`` is a patch index, None = CLS."""
    check_layer_range(layer, layer, info.depth)
    if query is not None and not 0 <= query < info.num_patches:
        raise ParameterError(f"patch {query} does not exist: choose 0 to {info.num_patches - 1}")
    token = 0 if query is None else info.num_prefix_tokens + query
    rows = torch.from_numpy(attention[layer, :, token, :].astype(np.float32))  # (H, T)
    return tokens_to_grid(rows, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid).numpy()


def attention_distance(attention: np.ndarray, *, info: ModelInfo) -> np.ndarray:
    """Mean attention distance in input pixels per layer and head (ViT paper, Fig. 7 right): (L, H).

    For each patch query, the distance to each patch key weighted by the attention (renormalised over patch keys,
    since prefix tokens have no position), averaged over the query patches.
    """
    gh, gw = info.grid
    p = info.num_prefix_tokens
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    d = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]) * info.patch_size  # (N, N)
    a = attention[:, :, p:, p:].astype(np.float32)  # (L, H, N, N)
    a = a / np.maximum(a.sum(-1, keepdims=True), 1e-12)
    return np.einsum("lhqk,qk->lh", a, d.astype(np.float32)) / (gh * gw)


def export_arrays(res: Analysis, heat: np.ndarray, *, settings: dict, attention: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one result as saved in ``.npz`` files by the CLI and the app's download (one format for both).

    ``settings`` holds what produced ``heat`` (at least start_layer, end_layer, head_fusion, discard_ratio); it is
    stored as JSON under ``settings`` and its layer range, fusion and discard also as arrays of their own.
    """
    info = res.info
    arrays = dict(
        rollout=heat.astype(np.float32),
        pos_sim=res.pos_sim.astype(np.float32),
        grid=np.array(info.grid, dtype=np.int32),
        patch_size=np.int32(info.patch_size),
        img_size=np.array(info.img_size, dtype=np.int32),
        num_prefix_tokens=np.int32(info.num_prefix_tokens),
        box=np.array(res.box, dtype=np.float64),
        pixels=res.pixels,
        start_layer=np.int32(settings["start_layer"]),
        end_layer=np.int32(settings["end_layer"]),
        head_fusion=np.array(str(settings["head_fusion"])),
        discard_ratio=np.float32(settings["discard_ratio"]),
        model=np.array(info.name),
        settings=np.array(json.dumps(settings)),
    )
    if attention:
        arrays["attention"] = res.attention
    return arrays
