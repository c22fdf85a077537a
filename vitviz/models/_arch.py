"""Architectures: how a model's weights are rebuilt (:class:`ModelSource`), built on the meta device (no memory, no
weights), and the geometry its weights were trained at."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError

__all__ = ["CHECKPOINT_SUFFIXES", "DEFAULT_MODEL", "ModelSource", "Status", "materialize_buffers", "patch_rows",
           "resample_rel_pos_tables"]

Status = Callable[[str], None]  # a line for a person while weights load ("Loading ... from the Hugging Face Hub")
DEFAULT_MODEL = "default"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_LOADS_FILES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
                "cache_dir", "pretrained_model_args")  # create_model kwargs that read weights, files or the network


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights came from and how to rebuild its architecture (at its native sizes)."""

    name: str  # what the user sees
    arch: str  # timm architecture name
    kind: Literal["default", "hub", "file"]
    kwargs: dict[str, Any] = field(default_factory=dict)  # create_model kwargs for the native architecture
    pos_antialias: bool = True  # how the position embedding is resampled to other grids
    label_names: tuple[str, ...] | None = None  # the head's class names a checkpoint's metadata gives, in index order
    projection_head: bool = False  # the head projects into an image-text space (CLIP, SigLIP): it has no classes

    @property
    def native_patch_size(self) -> int:
        """The patch size the weights were trained with, from the architecture's own description."""
        return _native(self).patch_size

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(depth, heads, prefix tokens, embed dim) of the architecture, from its description: what sizes a budget."""
        n = _native(self)
        return n.depth, n.num_heads, n.num_prefix_tokens, n.embed_dim



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
        pos_prefix=0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens),  # Beit: none
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
        num_prefix_tokens=int(model.num_prefix_tokens),
        embed_dim=int(model.embed_dim),
    )
    if key is not None:
        _NATIVE[key] = native  # a few dozen bytes per architecture a server has seen
    return native


def resample_rel_pos_tables(state: dict[str, torch.Tensor], *, old_grid: tuple[int, int],
                            new_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """BEiT's relative position bias tables ((2gh-1)(2gw-1) + 3, H), each block's and the shared one, resampled
    from the ``old_grid`` their weights were trained at to ``new_grid`` (timm's own interpolation of the offsets;
    the 3 rows of the CLS token's biases are kept). A state without such tables is returned as it is."""
    keys = [k for k in state if k.endswith("relative_position_bias_table")]
    if not keys or tuple(old_grid) == tuple(new_grid):
        return state
    from timm.layers import resize_rel_pos_bias_table

    rows = (2 * new_grid[0] - 1) * (2 * new_grid[1] - 1) + 3
    out = dict(state)
    for k in keys:
        table = state[k]
        out[k] = resize_rel_pos_bias_table(table.float(), new_window_size=tuple(new_grid),
                                           new_bias_shape=(rows, table.shape[1]),
                                           old_window_size=tuple(old_grid)).to(table.dtype)
    return out


def materialize_buffers(model: torch.nn.Module) -> None:
    """Allocate and compute the buffers a checkpoint does not hold, left on the meta device by :func:`_create`:
    the non-persistent ones (Eva's RoPE frequencies and zero k-biases, Beit's relative position indices), recomputed
    from the module's configuration by timm's own ``init_non_persistent_buffers``. A ViT has none."""
    found = False
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
                found = True
    if not found:
        return
    from timm.models._manipulate import reinit_non_persistent_buffers

    reinit_non_persistent_buffers(model)


def patch_rows(shapes: dict[str, tuple[int, ...]], probe: torch.nn.Module, *, what: str) -> int | None:
    """How many patches a checkpoint's positions span (``shapes``: its tensors' shapes; ``probe``: its architecture
    on the meta device): the position embedding's patch rows, or for a Beit without one the grid its relative bias
    table ((2g-1)² + 3 rows) spans; None for RoPE alone (the grid is then the architecture's own)."""
    if "pos_embed" in shapes:
        prefix = 0 if getattr(probe, "no_embed_class", False) else int(probe.num_prefix_tokens)
        return int(shapes["pos_embed"][1]) - prefix
    if getattr(probe, "pos_embed", None) is not None:
        raise CheckpointError(f"{what} has no 'pos_embed': not a ViT checkpoint with absolute position embeddings")
    table = next((s for k, s in shapes.items() if k.endswith("relative_position_bias_table")), None)
    if table is None:
        return None
    side = (math.isqrt(max(int(table[0]) - 3, 0)) + 1) // 2
    return side * side
