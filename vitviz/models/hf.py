"""Checkpoints saved by Hugging Face ``transformers``, loaded as the equivalent timm Vision Transformer.

A folder that ``save_pretrained`` wrote (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), or a Hub
id, ``hf:facebook/dinov2-small``, becomes a timm model through vitviz's own renaming of the weights. Nothing of
``transformers`` runs: ``config.json`` is read as data (only the fields below, each checked for type and range,
transformers' defaults where a field is left out; never code, never ``trust_remote_code``), and the tensors with the
safe readers of :mod:`.checkpoints`, every size checked from the safetensors header or the archive's directory before
anything is read. The file's names are those ``save_pretrained`` writes (transformers 4 and 5 alike).

==============================  ===================================  ==================================================
transformers model_type         timm architecture (preprocessing)    weights (transformers -> timm)
==============================  ===================================  ==================================================
vit: ViTModel,                  vit_base_patch16_224                 query, key, value -> attn.qkv; classifier -> head;
ViTForImageClassification                                            the pooler (tanh dense, unused by the classifier)
                                                                     is left out
deit: DeiTModel, DeiT...        deit_base_distilled_patch16_224      distillation_token -> dist_token; cls_classifier,
WithTeacher                                                          distillation_classifier -> head, head_dist (their
                                                                     mean in eval, as transformers)
deit: DeiTForImage-             deit_base_patch16_224, reg_tokens=1  distillation_token -> reg_token (with its position
Classification                                                       row); classifier -> head, read off the CLS token
dinov2: Dinov2Model             vit_small_patch14_dinov2             layer_scale{1,2}.lambda1 -> ls{1,2}.gamma; SwiGLU
                                (SwiGLU: vit_giant_patch14_dinov2)   weights_in, weights_out -> SwiGLUPacked fc1, fc2
dinov2_with_registers:          vit_small_patch14_reg4_dinov2        register_tokens -> reg_token; the CLS row of the
Dinov2WithRegistersModel        (SwiGLU: vit_giant_..._reg4_dinov2)  positions added to cls_token (no_embed_class)
clip_vision_model / clip:       vit_base_patch16_clip_224            class_embedding -> cls_token; pre_layrnorm ->
CLIPVisionModel(WithProjection),                                     norm_pre; post_layernorm -> norm (timm norms every
CLIPModel (its vision tower)                                         token, transformers the pooled one); q/k/v_proj ->
                                                                     attn.qkv; visual_projection -> head (bias 0)
siglip_vision_model / siglip:   vit_base_patch16_siglip_224          no CLS token; head.probe -> attn_pool.latent;
SiglipVisionModel, SiglipModel  (global_pool "map"; "avg" without    head.attention in_proj -> attn_pool.q, kv;
(its vision tower)              vision_use_head)                     out_proj, layernorm, mlp -> proj, norm, mlp
==============================  ===================================  ==================================================

The architecture column names the base model of each family; a checkpoint of another width, patch or image size gets
timm's registered name for that size where timm has one (``vit_large_patch14_clip_336``, ``vit_base_patch14_dinov2``),
whose pretrained cfg gives the family's preprocessing (mean, std, crop); the kwargs set every size either way.

Fields read from ``config.json`` (of ``vision_config`` for CLIPModel / SiglipModel): hidden_size, num_hidden_layers,
num_attention_heads, intermediate_size (mlp_ratio for DINOv2), image_size, patch_size, num_channels (3), layer_norm_eps,
hidden_act (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, silu, swish, relu), qkv_bias, layerscale_value,
use_swiglu_ffn, num_register_tokens, vision_use_head, and id2label (the class names of a classifier; transformers'
``LABEL_i`` placeholders are no names). Every other field is ignored. Dinov2ForImageClassification is refused: its
head reads the CLS token and the mean patch token side by side, which no timm ViT head does.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ModelError
from ._arch import ModelSource, Status, _create
from ._hf_map import _FAMILIES, _UNUSED, _convert, _family, _label_names, _settings
from .checkpoints import (
    MAX_CHECKPOINT_BYTES,
    _check_params,
    _check_state_size,
    _check_stored_bytes,
    _checked_file,
    _gigabytes,
    _safetensors_header,
    _state_bytes,
    _torch_state,
    check_dense,
)
from .hub import _hub_reachable, _unavailable

__all__ = ["HF_PREFIX", "CONFIG_FILE", "WEIGHT_FILES", "HFSource", "is_hf_folder", "hf_source"]

HF_PREFIX = "hf:"  # "hf:owner/name": a transformers checkpoint on the Hugging Face Hub
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one present is read
MAX_CONFIG_BYTES = 16 * 10**6  # an ImageNet-21k id2label holds ~22k names (~1 MB)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


@dataclass(frozen=True)
class HFSource(ModelSource):
    """A transformers checkpoint's source; ``label_names`` are its config's id2label (None: no head, or no names)."""

    model_type: str = ""  # transformers' name of the family (of the vision tower of a CLIPModel or SiglipModel)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a ``save_pretrained`` folder)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _read_config(path: Path, *, what: str) -> dict[str, Any]:
    """config.json as a JSON object, its size checked before it is read."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{what}: its config.json cannot be read ({exc.strerror or exc})") from exc
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{what}: its config.json is {_gigabytes(size)}; vitviz reads at most "
                              f"{_gigabytes(MAX_CONFIG_BYTES)}")
    try:
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{what}: its config.json cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a number too long to convert
        raise CheckpointError(f"{what}: its config.json is not JSON ({str(exc)[:200]})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{what}: its config.json must hold a JSON object, not {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------------------- sources


def _probe_check(probe: torch.nn.Module, shapes: dict[str, tuple[int, ...]], model_type: str, *, what: str) -> None:
    """The renamed weights must be exactly the architecture's, name for name and shape for shape."""
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    parts = [f"{label}: {', '.join(keys[:5])}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
             for label, keys in (("missing", sorted(set(want) - set(shapes))),
                                 ("not expected", sorted(set(shapes) - set(want))),
                                 ("wrong shape", [f"{k} {list(shapes[k])}, not {list(want[k])}" for k in sorted(want)
                                                  if k in shapes and shapes[k] != want[k]]))
             if keys]
    if parts:
        raise CheckpointError(f"{what}: its weights do not fit the {model_type} model its config.json describes "
                              f"({'; '.join(parts)})")


def _read_safetensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of a safetensors file (a two-tower file's text tower is never read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name!r} is not a readable safetensors file: {exc}") from exc


def _load(config_path: Path, weights: Path, *, name: str, kind: str, max_params: int | None,
          ) -> tuple[HFSource, dict[str, torch.Tensor]]:
    """A transformers checkpoint as a timm source and weights; every size is checked before the tensors are read
    (safetensors: from its header, renamed as meta tensors; a torch zip: from its directory, before torch.load)."""
    what = repr(name)
    config = _read_config(config_path, what=what)
    model_type, fields = _family(config, what=what)
    s = _settings(fields, _FAMILIES[model_type], model_type, what=what)
    size = _checked_file(weights, MAX_CHECKPOINT_BYTES)
    if weights.suffix == ".safetensors":
        header = _safetensors_header(weights)
        shapes, nbytes = header.shapes, header.nbytes
        state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    else:
        state = _torch_state(weights, size, MAX_CHECKPOINT_BYTES)
        check_dense(state, what=what)
        _check_stored_bytes(state, what=what)
        shapes, nbytes = {k: tuple(v.shape) for k, v in state.items()}, _state_bytes(state)
    arch, kwargs, renamed = _convert(state, model_type, s, what=what)
    probe = _create(arch, kwargs, what=what)
    _probe_check(probe, {k: tuple(v.shape) for k, v in renamed.items()}, model_type, what=what)
    rows = int(probe.pos_embed.shape[1])
    _check_params(probe, rows, max_params, what=what)
    used = [k for k in shapes if not _UNUSED.fullmatch(k.removeprefix(_FAMILIES[model_type].base))]
    total = sum(math.prod(v) for v in shapes.values()) or 1
    # the image model's share of the bytes: a CLIPModel's or SiglipModel's text tower is no part of it
    _check_state_size(nbytes * sum(math.prod(shapes[k]) for k in used) // total, probe, rows, what=what)
    if weights.suffix == ".safetensors":
        renamed = _convert(_read_safetensors(weights, used), model_type, s, what=what)[2]
    source = HFSource(name=name, arch=arch, kind=kind, kwargs=kwargs, model_type=model_type,
                      label_names=_label_names(config, kwargs["num_classes"]),
                      projection_head=_FAMILIES[model_type].layout in ("clip", "siglip"))
    return source, renamed


def _folder_files(folder: Path, *, what: str) -> tuple[Path, Path]:
    """config.json and the first weight file of a save_pretrained folder."""
    for file in WEIGHT_FILES:
        if (folder / file).is_file():
            return folder / CONFIG_FILE, folder / file
    sharded = any((folder / f"{file}.index.json").is_file() for file in WEIGHT_FILES)
    why = ("its weights are sharded over several files, which vitviz does not read; save it again with "
           "save_pretrained(folder, max_shard_size='20GB')") if sharded else "it has no weights"
    raise CheckpointError(f"{what} holds a config.json but {why} ({' or '.join(WEIGHT_FILES)})")


def _hub_files(repo: str, progress: Status | None) -> tuple[Path, Path]:
    """config.json and weights of a Hub repository, from the local cache or downloaded (size checked first)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    cached = [try_to_load_from_cache(repo, f) for f in (CONFIG_FILE, *WEIGHT_FILES)]
    if isinstance(cached[0], str) and any(isinstance(p, str) for p in cached[1:]):
        return Path(cached[0]), Path(next(p for p in cached[1:] if isinstance(p, str)))
    name = HF_PREFIX + repo
    if not _hub_reachable():
        raise _unavailable(name)
    if progress:
        progress(f"Loading {repo} from the Hugging Face Hub...")
    try:
        config = Path(hf_hub_download(repo, CONFIG_FILE))
        for file in WEIGHT_FILES:
            try:
                size = get_hf_file_metadata(hf_hub_url(repo, file)).size or 0
            except EntryNotFoundError:
                continue
            if size > MAX_CHECKPOINT_BYTES:
                raise CheckpointError(f"{name}: its {file} is {_gigabytes(size)}; vitviz reads checkpoints of at most "
                                      f"{_gigabytes(MAX_CHECKPOINT_BYTES)}")
            return config, Path(hf_hub_download(repo, file))
    except (OSError, ValueError, RuntimeError, HfHubHTTPError, EntryNotFoundError) as exc:  # 404, gated, offline
        if isinstance(exc, CheckpointError):
            raise
        raise _unavailable(name, f" ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") \
            from exc
    raise CheckpointError(f"{name} has no {' or '.join(WEIGHT_FILES)} (sharded weights are not read)")


def hf_source(
        name_or_path: str | os.PathLike,
        *,
        progress: Status | None = None,
        max_params: int | None = None,
        name: str | None = None,
) -> tuple[HFSource, dict[str, torch.Tensor]]:
    """A transformers checkpoint, a save_pretrained folder or ``hf:owner/name``, as a timm source and its weights.

    The architecture comes from config.json (a timm ``arch`` is never needed); the model may have at most
    ``max_params`` parameters (None: no cap); ``name`` names it in messages (default: the folder's name or the id).
    """
    text = str(name_or_path).strip()
    if text.startswith(HF_PREFIX):
        repo = text.removeprefix(HF_PREFIX)
        if not _REPO_ID.fullmatch(repo) or ".." in repo:
            raise ModelError(f"{text[:120]!r} is not a Hugging Face Hub id: write hf:owner/name, for example "
                             "hf:facebook/dinov2-small")
        config, weights = _hub_files(repo, progress)
        return _load(config, weights, name=name or text, kind="hub", max_params=max_params)
    folder = Path(text).expanduser()
    if not is_hf_folder(folder):
        raise CheckpointError(f"{folder.name!r} is not a folder saved by transformers (no {CONFIG_FILE} in it)")
    config, weights = _folder_files(folder, what=repr(name or folder.name))
    return _load(config, weights, name=name or folder.name, kind="file", max_params=max_params)
