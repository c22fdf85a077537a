"""The analysis pass shared by the app and the CLI: one forward pass and its result.

``analyze`` fits an image to the model's input, runs the model once and keeps every layer's attention (and the
position-embedding similarity, which depends on the model only). Everything the views draw from it lives in
:mod:`vitviz.maps`; the file format in :mod:`vitviz.export`.

Memory is budgeted for the whole analysis, not only the capture: the kept attention, the softmax scratch and the
largest derived computation (the rollout over every layer range). A request over the budget is refused before any
work, with the numbers in plain words.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import OutOfMemoryError, ResourceError
from ..inputs.fit import Fit, FittedImage, fit_image, to_tensor, whole_image_size
from ..inputs.image import LoadedImage
from ..models import MAX_IMG_SIZE, ModelInfo, describe_model
from ..walk.capture import attention_forward, check_capturable
from .posembed import patch_pos_embed, pos_embed_similarity, position_embedding_note
from .readout import readout_weights

__all__ = [
    "Analysis",
    "MAX_ANALYSIS_BYTES",
    "attention_bytes",
    "analysis_bytes",
    "max_square_size",
    "input_size_for",
    "analyze",
    "analyze_batch",
    "analyze_with_fallback",
]


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
MAX_ANALYSIS_BYTES = int(float(os.environ.get("VITVIZ_MAX_ANALYSIS_MB", "3072")) * 2**20)
# Above this the capture is kept in fp16 (softmax still in fp32): fewer bytes to write and fault in, and
# probabilities keep ~3 significant digits, plenty for maps (tests/test_analysis.py bounds the difference).
HALF_STORAGE_BYTES = 64 * 2**20


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
    pos_sim: np.ndarray | None  # (N, N) cosine similarity of the patch position embeddings; None without them
    seconds: float  # the forward pass
    device: str
    dtype: str = "float32"  # the model's weights (the capture is kept in fp32, or fp16 when large)
    notes: tuple[str, ...] = field(default=())
    tokens: np.ndarray | None = None  # (L, T, D) every block's output, prefix tokens first; when asked for
    pos_note: str | None = None  # why there is no pos_sim (RoPE, a relative position bias), as a sentence
    # (T,) the readout's weights over the final tokens for a model without a CLS token (the mean-pooled patches, or
    # an attention pool's attention on this image), whose rows the maps read; None: the CLS token's row
    readout: np.ndarray | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return self.info.grid


def attention_bytes(*, depth: int, heads: int, tokens: int, itemsize: int = 4) -> int:
    """Bytes of an (L, H, T, T) capture."""
    return depth * heads * tokens * tokens * itemsize


def analysis_bytes(*, depth: int, heads: int, tokens: int, images: int = 1, embed_dim: int = 0) -> int:
    """Peak memory of analysing ``images`` images and deriving the views of one: an upper estimate.

    The kept capture (fp16 above ``HALF_STORAGE_BYTES``) and, then, its fp32 softmax scratch for one layer; plus the
    rollout over every layer range, the largest derived map: fused (L, T, T) layers, the discard's selection copies
    (about three more of that size) and the (L, L, T) rows. With ``embed_dim`` the kept (L, T, D) tokens too.
    """
    fp32 = attention_bytes(depth=depth, heads=heads, tokens=tokens) * images
    half = fp32 > HALF_STORAGE_BYTES
    capture = fp32 // 2 if half else fp32
    scratch = heads * tokens * tokens * 4 * images if half else 0
    rollout = 4 * depth * tokens * tokens * 4 + 2 * depth * depth * tokens * 4
    kept = depth * tokens * embed_dim * 4 * images * (1 if half else 2)  # stored like the attention, then fp32
    return capture + scratch + rollout + kept


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{max(n / 2**10, 1):,.0f} kB"


def _budget_error(info: ModelInfo, need: int, budget: int, images: int) -> ResourceError:
    what = f"{images} images" if images > 1 else "this image"
    return ResourceError(
        f"analysing {what} at {info.grid[0]}x{info.grid[1]} patches ({info.num_tokens} tokens, {info.depth} layers x "
        f"{info.num_heads} heads) needs about {_size(need)} of memory, more than the {_size(budget)} this server "
        "allows for one analysis: choose a larger patch size or a smaller image size"
    )


def max_square_size(*, depth: int, heads: int, patch_size: int, num_prefix_tokens: int, embed_dim: int = 0,
                    budget: int | None = None, max_side: int = MAX_IMG_SIZE) -> int:
    """The largest square input side (a multiple of ``patch_size``) whose analysis fits ``budget``, at least one patch.

    The estimate grows with the side, so the answer is the last side that fits. ``budget`` defaults to the server's.
    """
    budget = MAX_ANALYSIS_BYTES if budget is None else budget
    best = patch_size
    for side in range(patch_size, max_side + 1, patch_size):
        tokens = (side // patch_size) ** 2 + num_prefix_tokens
        if analysis_bytes(depth=depth, heads=heads, tokens=tokens, embed_dim=embed_dim) > budget:
            break
        best = side
    return best


def input_size_for(image: Image.Image, *, img_size: int, patch_size: int, fit: Fit) -> tuple[int, int]:
    """The model input (H, W): a square for centre crop, the image's aspect ratio for the whole image."""
    if fit == "whole":
        return whole_image_size(image.size, target=img_size, patch_size=patch_size, max_side=MAX_IMG_SIZE)
    return img_size, img_size


def analyze(
        model: torch.nn.Module,
        image: LoadedImage | Image.Image,
        *,
        info: ModelInfo | None = None,
        fit: Fit = "crop",
        max_bytes: int | None = None,
        tokens: bool = False,
) -> Analysis:
    """Fit ``image`` to ``model``'s input, run one pass capturing every layer's attention (and with ``tokens`` every
    layer's output tokens), and describe the result."""
    return analyze_batch(model, [image], info=info, fit=fit, max_bytes=max_bytes, tokens=tokens)[0]


def analyze_batch(
        model: torch.nn.Module,
        images: list[LoadedImage | Image.Image],
        *,
        info: ModelInfo | None = None,
        fit: Fit = "crop",
        max_bytes: int | None = None,
        tokens: bool = False,
) -> list[Analysis]:
    """``analyze`` for several images in one forward pass (all are fitted to the model's one input size).

    ``max_bytes`` (default: the server's ``MAX_ANALYSIS_BYTES``) bounds :func:`analysis_bytes`; over it, nothing runs.
    """
    info = info or describe_model(model)
    max_bytes = MAX_ANALYSIS_BYTES if max_bytes is None else max_bytes
    need = analysis_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens, images=len(images),
                          embed_dim=info.embed_dim if tokens else 0)
    if need > max_bytes:
        raise _budget_error(info, need, max_bytes, len(images))
    fitted = [_fit(im, info, fit) for im in images]
    param = next(model.parameters())
    x = torch.cat([to_tensor(f.pixels, mean=info.mean, std=info.std) for f in fitted])
    x = x.to(device=param.device, dtype=param.dtype)
    fp32 = attention_bytes(depth=info.depth, heads=info.num_heads, tokens=info.num_tokens) * len(images)
    store = torch.float16 if fp32 > HALF_STORAGE_BYTES else torch.float32
    pooled = check_capturable(model) != "cls"  # the readout's weights come from the final tokens
    t0 = time.perf_counter()
    try:
        cap = attention_forward(model, x, store_dtype=store, features=pooled, tokens=tokens)
    except torch.OutOfMemoryError as exc:  # CUDA (and MPS) allocation failure: free what we can, say so
        del x
        _empty_cache(param.device)
        raise OutOfMemoryError(
            f"the {param.device.type.upper()} ran out of memory for {len(images)} image(s) at "
            f"{info.grid[0]}x{info.grid[1]} patches"
        ) from exc
    seconds = (time.perf_counter() - t0) / len(images)
    sim = _pos_similarity(model)
    kept = cap.tokens.float() if cap.tokens is not None else None  # (B, L, T, D), small beside the attention
    note = position_embedding_note(model)  # a RoPE or relative-bias model has no position vectors to compare
    w = readout_weights(model, cap.features).cpu() if pooled else None  # (B, T)
    return [_result(info, im, f, cap.attention[i], sim, seconds, param, None if kept is None else kept[i], note,
                    None if w is None else w[i])
            for i, (im, f) in enumerate(zip(images, fitted, strict=True))]


def _fit(image: LoadedImage | Image.Image, info: ModelInfo, fit: Fit) -> FittedImage:
    return fit_image(image.image if isinstance(image, LoadedImage) else image, input_size=info.img_size, fit=fit,
                     crop_pct=info.crop_pct, interpolation=_interp(info.interpolation))


def _result(info: ModelInfo, image, fitted: FittedImage, attention: torch.Tensor, sim: np.ndarray | None,
            seconds: float, param: torch.Tensor, tokens: torch.Tensor | None, pos_note: str | None = None,
            readout: torch.Tensor | None = None) -> Analysis:
    return Analysis(
        info=info,
        pixels=_frozen(fitted.pixels),
        box=tuple(float(v) for v in fitted.box),
        fit_description=fitted.description,
        attention=_frozen(attention.numpy()),
        pos_sim=sim,
        seconds=seconds,
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        notes=tuple(image.notes) if isinstance(image, LoadedImage) else (),
        tokens=None if tokens is None else _frozen(tokens.numpy()),
        pos_note=pos_note,
        readout=None if readout is None else _frozen(readout.numpy()),
    )


_POS_SIM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POS_SIM_LOCK = threading.Lock()


def _pos_similarity(model: torch.nn.Module) -> np.ndarray | None:
    """The (N, N) position similarity depends on the model only: computed once per model (and pos_embed state)."""
    pos = getattr(model, "pos_embed", None)
    if pos is None:  # positions inside attention (Eva's RoPE, Beit's relative bias): position_embedding_note says so
        return None
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
        fit: Fit = "crop",
        tokens: bool = False,
) -> tuple[list[Analysis], str | None]:
    """``analyze_batch`` on ``load(device)``'s model; if the GPU runs out of memory, again on ``load("cpu")``.

    Returns the results and a notice for the user when the fallback happened (else None).
    """
    model, info = load(device)
    try:
        return analyze_batch(model, images, info=info, fit=fit, tokens=tokens), None
    except OutOfMemoryError as exc:
        if device == "cpu":
            raise
        model, info = load("cpu")
        return analyze_batch(model, images, info=info, fit=fit, tokens=tokens), \
            f"{exc}; this analysis ran on the CPU instead."


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only, so one Analysis can be shared (e.g. by several app sessions) without anyone changing it."""
    a.flags.writeable = False
    return a


def _interp(name: str) -> str:
    return name if name in ("bicubic", "bilinear", "nearest") else "bicubic"
