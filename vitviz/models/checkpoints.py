"""Checkpoint files: read safely, checked against the architecture they claim to be for.

A checkpoint file is untrusted input (the app takes uploads). Three rules keep it from doing more than hold weights:
its metadata only ever selects an architecture from a whitelist of settings with checked types and ranges (never a
path, a loader, a callable or a pretrained config: timm's create_model loads files from those); nothing is read into
memory before its size is known and within budget; and the tensors must be about the size of the architecture.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError
from ..walk.capture import check_capturable
from ._arch import _LOADS_FILES, CHECKPOINT_SUFFIXES, ModelSource, _create, patch_rows
from .hub import _suggest, is_model_name, list_vit_models

__all__ = ["ARCH_KWARGS", "MAX_CHECKPOINT_BYTES", "MAX_CHECKPOINT_EXPANSION", "MAX_DEPTH", "MAX_STATE_PER_MODEL",
           "MAX_CHECKPOINT_UPLOAD_BYTES", "CLASS_NAMES_KEY", "read_checkpoint", "check_dense", "checked_class_names",
           "upload_param_cap"]

MAX_CHECKPOINT_BYTES = 8 * 10**9  # tensors read into memory at most: timm's largest ViT, ViT-gigantic/14, fits in fp32
MAX_CHECKPOINT_EXPANSION = 4  # a torch zip may hold this many times its file size (torch.save does not compress)
MAX_CHECKPOINT_ENTRIES = 100_000  # files in a torch zip (one per tensor storage, plus a few)
MAX_STATE_PER_MODEL = 2  # a state dict may hold at most twice the float32 bytes of its architecture's own tensors
MAX_METADATA_KWARGS_CHARS = 4096
MAX_CLASS_NAME_CHARS = 100  # one class name in a checkpoint's 'class_names' metadata
MAX_CLASS_NAMES_CHARS = 4_000_000  # the whole list (ImageNet-21k's 21,843 WordNet names fit in ~1 MB)
CLASS_NAMES_KEY = "class_names"  # metadata: a JSON list of the head's class names, in index order
_SMALL_FILE_SLACK = 10**6  # bytes of expansion or extra tensors that are never worth refusing

MAX_DEPTH = 48  # timm's deepest ViTs (ViT-gigantic/14) have 48 blocks
MAX_EMBED_DIM = 4096
MAX_NUM_HEADS = 128
MAX_NATIVE_PATCH_SIZE = 64
MAX_NATIVE_IMG_SIZE = 2048  # px per side of the grid a checkpoint was trained at
MAX_REG_TOKENS = 16
MAX_NUM_CLASSES = 100_000
DEFAULT_MAX_PARAMS = 350_000_000  # uploads: ViT-L/14 (304 M) fits; ViT-H and ViT-g do not
# the largest file the app's uploader takes (a checkpoint; images stay under their own, smaller limit): every upload
# sits in the server's memory until it is read, and fp32 ViT-S/B/L files are 88 MB / 350 MB / 1.2 GB
MAX_CHECKPOINT_UPLOAD_BYTES = 400 * 10**6

_ARCH_NAME = re.compile(r"[a-z0-9_]{1,100}(\.[a-z0-9_]{1,100})?")  # a registered name and tag, never hf-hub:/local-dir:
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


def _bad_name(name: Any) -> bool:
    return (not isinstance(name, str) or not name.strip() or len(name) > MAX_CLASS_NAME_CHARS
            or any(unicodedata.category(ch)[0] == "C" for ch in name))


def checked_class_names(text: str | None, *, num_classes: int, what: str) -> tuple[str, ...] | None:
    """The class names in a checkpoint's 'class_names' metadata (a JSON list of short strings, one per class of its
    head, in index order); None where it has none. Anything else is refused: names are shown to every user."""
    if text is None:
        return None
    prefix = f"{what}: its 'class_names' metadata"
    if len(text) > MAX_CLASS_NAMES_CHARS:
        raise CheckpointError(f"{prefix} is {len(text):,} characters long; at most {MAX_CLASS_NAMES_CHARS:,} are read")
    try:
        names = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{prefix} is not JSON ({exc})") from exc
    if not isinstance(names, list) or len(names) != num_classes:
        got = f"{len(names)} names" if isinstance(names, list) else f"a {type(names).__name__}"
        raise CheckpointError(f"{prefix} must be a list of one name per class of its head ({num_classes}), got {got}")
    bad = [i for i, n in enumerate(names) if _bad_name(n)]
    if bad:
        raise CheckpointError(f"{prefix}: name {bad[0]} ({str(names[bad[0]])[:40]!r}) is not a name of 1 to "
                              f"{MAX_CLASS_NAME_CHARS} printable characters")
    return tuple(names)


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
                              "(vitviz builds timm's vision_transformer, deit, eva and beit families, e.g. "
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
    if "patch_embed.proj.weight" not in shapes:
        raise CheckpointError(f"{what} has no 'patch_embed.proj.weight': not a ViT checkpoint")
    w, pos = shapes["patch_embed.proj.weight"], shapes.get("pos_embed", (1, 0, 0))  # none: see patch_rows
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
    rows = patch_rows(shapes, probe, what=what)  # None: RoPE only, the architecture's own grid
    if "img_size" not in extra and rows is not None:  # square grid from the positions' patch rows
        kwargs["img_size"] = _grid_img_size(rows, 0, p, what=what)
    names = checked_class_names(metadata.get(CLASS_NAMES_KEY), num_classes=kwargs["num_classes"], what=what)
    return ModelSource(name=name, arch=arch, kind="file", kwargs=kwargs, label_names=names), probe


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` owns one value of its storage per element: no stride-0 (broadcast) or overlapping dimensions,
    and the storage holds every element it addresses (transposed or permuted layouts are dense too)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    need = (t.storage_offset() + t.numel()) * t.element_size()
    return t.untyped_storage().nbytes() >= need


def check_dense(state: dict[str, torch.Tensor], *, what: str) -> None:
    """Refuse tensors that are views of less memory than their shape (``torch.full((1,), v).expand(*shape)``
    survives ``torch.save`` and ``torch.load(weights_only=True)``: a tiny file can then claim a huge model)."""
    bad = [k for k, t in state.items() if t.numel() > 1 and not _dense(t)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{what} was refused: its tensors {', '.join(bad[:3])}{more} are not stored whole (a "
                              "few values repeated to fill their shape); a checkpoint stores every weight")


def _check_stored_bytes(state: dict[str, torch.Tensor], *, what: str) -> None:
    """The storages must hold every value the tensors claim (a tensor shared whole by two names counts once): dense
    tensors can still overlap each other, all slices of one small storage."""
    claims = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel() * t.element_size()
              for t in state.values()}
    need, have = sum(claims.values()), _state_bytes(state)
    if have < need:
        raise CheckpointError(f"{what} was refused: its tensors claim {_gigabytes(need)} but it stores only "
                              f"{_gigabytes(have)} (tensors overlapping in memory): a checkpoint stores every weight")


def upload_param_cap() -> int | None:
    """The most parameters a model loaded from an uploaded checkpoint may have: ``VITVIZ_MAX_PARAMS`` (0: no cap),
    by default ViT-L's size, what a small shared CPU server still answers within its job time limit."""
    text = os.environ.get("VITVIZ_MAX_PARAMS", "").strip()
    try:
        value = int(float(text)) if text else DEFAULT_MAX_PARAMS
    except ValueError:
        raise CheckpointError(f"VITVIZ_MAX_PARAMS={text!r} is not a number of parameters") from None
    return value if value > 0 else None


def _check_params(probe: VisionTransformer, pos_rows: int, max_params: int | None, *, what: str) -> None:
    if max_params is None:
        return
    numel = sum(math.prod(v.shape) for k, v in probe.state_dict().items() if k != "pos_embed")
    numel += pos_rows * int(probe.embed_dim)
    if numel > max_params:
        raise CheckpointError(f"{what} was refused: its architecture has {numel / 1e6:,.0f} million parameters; this "
                              f"server takes models of at most {max_params / 1e6:,.0f} million")


def _file_source(
        path: Path,
        arch: str | None,
        *,
        max_bytes: int = MAX_CHECKPOINT_BYTES,
        max_params: int | None = None,
        name: str | None = None,
) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """A checkpoint file's source and weights; every size is checked before the tensors are read (safetensors) or
    before they are expanded (torch zip), the tensors must be stored whole and fit the architecture's size, and the
    architecture must have at most ``max_params`` parameters. ``name``: the file's name as the user knows it."""
    name = name or path.name
    size, what = _checked_file(path, max_bytes), repr(name)
    if path.suffix.lower() == ".safetensors":  # safetensors stores every tensor whole (the format checks offsets)
        header = _safetensors_header(path)
        source, probe = _file_spec(header.shapes, header.metadata, arch=arch, name=name)
        _check_params(probe, header.shapes.get("pos_embed", (1, 0))[1], max_params, what=what)
        _check_state_size(header.nbytes, probe, header.shapes.get("pos_embed", (1, 0))[1], what=what)
        return source, _safetensors_state(path)
    state = _torch_state(path, size, max_bytes)
    check_dense(state, what=what)
    _check_stored_bytes(state, what=what)
    source, probe = _file_spec({k: tuple(v.shape) for k, v in state.items()}, {}, arch=arch, name=name)
    _check_params(probe, state.get("pos_embed", torch.empty(1, 0)).shape[1], max_params, what=what)
    _check_state_size(_state_bytes(state), probe, state.get("pos_embed", torch.empty(1, 0)).shape[1], what=what)
    return source, state
