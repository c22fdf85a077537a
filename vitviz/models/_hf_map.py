"""The key mapping of :mod:`.hf`: transformers' config fields and weight names -> a timm ViT's kwargs and names.

Pure functions of data: the checked fields of a config.json and a dict of tensors (meta tensors too, to check shapes
before anything is read) in, a timm architecture, its create_model kwargs and the renamed tensors out. The table of
families, names and fields is in :mod:`.hf`'s docstring.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import LayerNorm

from ..errors import CheckpointError
from .checkpoints import (
    MAX_DEPTH,
    MAX_EMBED_DIM,
    MAX_NATIVE_PATCH_SIZE,
    MAX_NUM_CLASSES,
    MAX_NUM_HEADS,
    MAX_REG_TOKENS,
    _flag,
    _img_size,
    _number,
    _one_of,
    _whole,
)

__all__: list[str] = []  # internals of .hf

MAX_LABEL_CHARS = 100  # as checkpoints' class_names metadata
_TIMM_EPS = 1e-6  # timm's ViT LayerNorm eps; another one is passed as norm_layer
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
         "silu": "silu", "swish": "silu", "relu": "relu"}  # transformers' hidden_act -> timm's act_layer
# weights a checkpoint may hold that the image model never reads: the text tower of CLIPModel/SiglipModel, poolers,
# the mask token of masked-image pretraining, position-id buffers of older files
_UNUSED = re.compile(r"(text_model\.|text_projection\.|pooler\.).*|logit_scale|logit_bias|.*position_ids|"
                     r"embeddings\.mask_token")


@dataclass(frozen=True)
class _Family:
    """How one transformers model_type becomes a timm model."""

    arch: str  # timm architecture; its pretrained cfg gives the family's preprocessing (mean, std, crop)
    layout: str  # "vit" (ViT, DeiT), "dinov2", "clip", "siglip": the names of the file's weights
    base: str  # prefix of the backbone's weights in a task model or a two-tower model
    defaults: tuple[tuple[str, Any], ...]  # the fields read, with transformers' defaults where config.json omits them


_COMMON = (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12), ("image_size", 224),
           ("num_channels", 3))
_VIT = (*_COMMON, ("intermediate_size", 3072), ("patch_size", 16), ("hidden_act", "gelu"),
        ("layer_norm_eps", 1e-12), ("qkv_bias", True))
_DINOV2 = (*_COMMON, ("mlp_ratio", 4), ("patch_size", 14), ("hidden_act", "gelu"), ("layer_norm_eps", 1e-6),
           ("qkv_bias", True), ("layerscale_value", 1.0), ("use_swiglu_ffn", False))
_FAMILIES = {
    "vit": _Family("vit_base_patch16_224", "vit", "vit.", _VIT),
    "deit": _Family("deit_base_distilled_patch16_224", "vit", "deit.", _VIT),
    "dinov2": _Family("vit_small_patch14_dinov2", "dinov2", "dinov2.", _DINOV2),
    "dinov2_with_registers": _Family("vit_small_patch14_reg4_dinov2", "dinov2", "dinov2_with_registers.",
                                     (*_DINOV2, ("num_register_tokens", 4))),
    "clip_vision_model": _Family("vit_base_patch16_clip_224", "clip", "vision_model.",
                                 (*_COMMON, ("intermediate_size", 3072), ("patch_size", 32),
                                  ("hidden_act", "quick_gelu"), ("layer_norm_eps", 1e-5))),
    "siglip_vision_model": _Family("vit_base_patch16_siglip_224", "siglip", "vision_model.",
                                   (*_COMMON, ("intermediate_size", 3072), ("patch_size", 16),
                                    ("hidden_act", "gelu_pytorch_tanh"), ("layer_norm_eps", 1e-6),
                                    ("vision_use_head", True))),
}
_TWO_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # model_type -> its vision tower's
_CHECKS = {
    "hidden_size": _whole(1, MAX_EMBED_DIM),
    "num_hidden_layers": _whole(1, MAX_DEPTH),
    "num_attention_heads": _whole(1, MAX_NUM_HEADS),
    "intermediate_size": _whole(1, 16 * MAX_EMBED_DIM),
    "mlp_ratio": _number(0, 16, lo_open=True),
    "image_size": _img_size,
    "patch_size": _whole(1, MAX_NATIVE_PATCH_SIZE),
    "num_channels": _one_of(3),  # images are RGB
    "layer_norm_eps": _number(0, 0.1, lo_open=True),
    "hidden_act": _one_of(*_ACTS),
    "qkv_bias": _flag(),
    "layerscale_value": _number(0, 10, lo_open=True),
    "use_swiglu_ffn": _flag(),
    "num_register_tokens": _whole(1, MAX_REG_TOKENS),
    "vision_use_head": _flag(),
}




def _family(config: dict[str, Any], *, what: str) -> tuple[str, dict[str, Any]]:
    """(model_type of the image model, the config fields that describe it): a two-tower model's vision_config."""
    model_type = config.get("model_type")
    if model_type in _TWO_TOWERS:
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError(f"{what}: its config.json is a {model_type} model without a vision_config object")
        return _TWO_TOWERS[model_type], vision
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        shown = str(model_type)[:60] if model_type is not None else "none"
        raise CheckpointError(f"{what}: its config.json names model_type {shown!r}; vitviz reads transformers "
                              f"checkpoints of model_type {', '.join([*_FAMILIES, *_TWO_TOWERS])}")
    return model_type, config


def _settings(config: dict[str, Any], family: _Family, model_type: str, *, what: str) -> dict[str, Any]:
    """The family's fields of ``config``, each checked (transformers' default where one is left out)."""
    problems, out = [], {}
    for key, default in family.defaults:
        value = config.get(key, default)
        try:
            out[key] = _CHECKS[key](value)
        except ValueError as exc:
            problems.append(f"{key} = {json.dumps(value)[:60]} {exc}")
    if not problems and out["hidden_size"] % out["num_attention_heads"]:
        problems.append(f"hidden_size {out['hidden_size']} is not a multiple of num_attention_heads "
                        f"{out['num_attention_heads']}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{what}: its config.json does not describe a {model_type} model vitviz can build: "
                              f"{shown}")
    return out


def _label_names(config: dict[str, Any], num_classes: int) -> tuple[str, ...] | None:
    """id2label as one name per class, or None: no head, no or partial id2label, transformers' ``LABEL_i``
    placeholders, or a name that is not printable text (names are shown to every user; long ones are cut)."""
    raw = config.get("id2label")
    if num_classes == 0 or not isinstance(raw, dict) or len(raw) != num_classes:
        return None
    names = [raw.get(str(i)) for i in range(num_classes)]
    if not all(isinstance(n, str) and n.strip() for n in names):
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)) or any(_unprintable(n) for n in names):
        return None
    return tuple(n if len(n) <= MAX_LABEL_CHARS else n[:MAX_LABEL_CHARS - 1] + "…" for n in names)


def _unprintable(name: str) -> bool:
    return any(unicodedata.category(ch)[0] == "C" for ch in name)


# ---------------------------------------------------------------------------------------------------------- weights


class _Renamer:
    """Moves tensors from the file's names to timm's; what is left over is checked to be unused by the image model."""

    def __init__(self, state: dict[str, torch.Tensor], *, what: str) -> None:
        self.left, self.out, self.what = dict(state), {}, what

    def has(self, name: str) -> bool:
        return name in self.left

    def take(self, name: str) -> torch.Tensor:
        if name not in self.left:
            raise CheckpointError(f"{self.what} lacks the weight {name!r} that its config.json implies")
        return self.left.pop(name)

    def move(self, old: str, new: str) -> None:
        """``old.weight`` (and ``old.bias`` where the file has one) to ``new.weight``, ``new.bias``."""
        self.out[f"{new}.weight"] = self.take(f"{old}.weight")
        if self.has(f"{old}.bias"):
            self.out[f"{new}.bias"] = self.take(f"{old}.bias")

    def leftover(self) -> list[str]:
        return sorted(k for k in self.left if not _UNUSED.fullmatch(k))


_LAYER_NAMES = {  # per layer: the file's module -> timm's Block module (q, k, v are joined apart)
    "vit": {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"},
    "dinov2": {"norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2"},
    "clip": {"layer_norm1": "norm1", "self_attn.out_proj": "attn.proj", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"},
}
_LAYER_NAMES["siglip"] = _LAYER_NAMES["clip"]
_QKV = {"vit": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "clip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
_QKV["dinov2"], _QKV["siglip"] = _QKV["vit"], _QKV["clip"]


def _blocks(r: _Renamer, layout: str, depth: int, *, swiglu: bool) -> None:
    root = "encoder.layers" if layout in ("clip", "siglip") else "encoder.layer"
    names = dict(_LAYER_NAMES[layout])
    if layout == "dinov2":  # SwiGLU packs gate and value into one weights_in, as timm's SwiGLUPacked fc1
        names.update({"mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2"} if swiglu else
                     {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for i in range(depth):
        src, dst = f"{root}.{i}.", f"blocks.{i}."
        qkv = [src + n for n in _QKV[layout]]
        r.out[dst + "attn.qkv.weight"] = torch.cat([r.take(f"{n}.weight") for n in qkv])
        if r.has(f"{qkv[0]}.bias"):
            r.out[dst + "attn.qkv.bias"] = torch.cat([r.take(f"{n}.bias") for n in qkv])
        for old, new in names.items():
            r.move(src + old, dst + new)
        if layout == "dinov2":
            r.out[dst + "ls1.gamma"] = r.take(src + "layer_scale1.lambda1")
            r.out[dst + "ls2.gamma"] = r.take(src + "layer_scale2.lambda1")


def _vit_embeddings(r: _Renamer, *, second_token: str | None, registers: bool) -> None:
    """ViT, DeiT, DINOv2: CLS (+ distillation token or registers), positions, final norm."""
    e = "embeddings."
    r.move(e + "patch_embeddings.projection", "patch_embed.proj")
    cls, pos = r.take(e + "cls_token"), r.take(e + "position_embeddings")
    if registers:  # transformers adds the positions' CLS row to the CLS token and none to the registers
        cls, pos = cls + pos[:, :1], pos[:, 1:]
        r.out["reg_token"] = r.take(e + "register_tokens")
    if second_token:
        r.out[second_token] = r.take(e + "distillation_token")
    r.out["cls_token"], r.out["pos_embed"] = cls, pos
    r.move("layernorm", "norm")


def _clip_embeddings(r: _Renamer, *, cls: bool) -> None:
    """CLIP, SigLIP: (class embedding,) positions as an embedding table, pre- and post-norm."""
    e = "embeddings."
    r.move(e + "patch_embedding", "patch_embed.proj")
    if cls:
        r.out["cls_token"] = r.take(e + "class_embedding").reshape(1, 1, -1)
        r.move("pre_layrnorm", "norm_pre")  # sic: transformers' name
    r.out["pos_embed"] = r.take(e + "position_embedding.weight").unsqueeze(0)
    r.move("post_layernorm", "norm")


def _siglip_head(r: _Renamer, dim: int) -> None:
    """The attention-pool head: nn.MultiheadAttention's packed in_proj split into timm's q and kv."""
    w, b = r.take("head.attention.in_proj_weight"), r.take("head.attention.in_proj_bias")
    r.out.update({"attn_pool.latent": r.take("head.probe"), "attn_pool.q.weight": w[:dim], "attn_pool.q.bias": b[:dim],
                  "attn_pool.kv.weight": w[dim:], "attn_pool.kv.bias": b[dim:]})
    for old, new in (("attention.out_proj", "proj"), ("layernorm", "norm"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2")):
        r.move(f"head.{old}", f"attn_pool.{new}")


def _mlp_width(s: dict[str, Any], layout: str) -> int:
    """The hidden width of a block's MLP as transformers builds it (SwiGLU: the packed fc1's, gate and value)."""
    if layout != "dinov2":
        return s["intermediate_size"]
    width = int(s["hidden_size"] * s["mlp_ratio"])
    return 2 * ((int(width * 2 / 3) + 7) // 8 * 8) if s["use_swiglu_ffn"] else width


def _kwargs(s: dict[str, Any], layout: str) -> dict[str, Any]:
    """timm create_model kwargs of the backbone, from the checked config fields; every structural setting is
    given, whatever the registered architecture's own defaults (the layouts change some of them)."""
    dim, width = s["hidden_size"], _mlp_width(s, layout)
    ratio = width / dim if int(dim * (width / dim)) == width else (width + 0.5) / dim  # int(dim * ratio) == width
    kwargs = dict(embed_dim=dim, depth=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                  patch_size=s["patch_size"], img_size=s["image_size"], mlp_ratio=ratio, num_classes=0,
                  qkv_bias=s.get("qkv_bias", True), class_token=True, global_pool="token", reg_tokens=0,
                  no_embed_class=False, pre_norm=layout == "clip", init_values=None)
    if not s.get("use_swiglu_ffn"):  # SwiGLU's SiLU comes with the architecture
        kwargs["act_layer"] = _ACTS[s["hidden_act"]]
    if s["layer_norm_eps"] != _TIMM_EPS or layout == "clip":  # timm's CLIP towers bring their own eps
        kwargs["norm_layer"] = functools.partial(LayerNorm, eps=s["layer_norm_eps"])
    if layout == "dinov2":
        kwargs["init_values"] = s["layerscale_value"]
    return kwargs


def _dinov2(r: _Renamer, model_type: str, s: dict[str, Any], kwargs: dict[str, Any], *, what: str) -> str:
    if r.has("classifier.weight"):
        raise CheckpointError(f"{what} is a Dinov2ForImageClassification: its head reads the CLS token and the "
                              "mean patch token side by side, which no timm ViT head does; save its dinov2 backbone")
    registers = model_type == "dinov2_with_registers"
    if registers:
        kwargs.update(reg_tokens=s["num_register_tokens"], no_embed_class=True)
    _vit_embeddings(r, second_token=None, registers=registers)
    if s["use_swiglu_ffn"]:  # timm's DINOv2 giants are the ones built with SwiGLUPacked
        return "vit_giant_patch14_reg4_dinov2" if registers else "vit_giant_patch14_dinov2"
    return _FAMILIES[model_type].arch


def _vit(r: _Renamer, model_type: str, s: dict[str, Any], kwargs: dict[str, Any], *, what: str) -> str:
    arch, second = _FAMILIES[model_type].arch, None
    if model_type == "deit" and r.has("classifier.weight"):  # one head on CLS: the second token as a register
        arch, second = "deit_base_patch16_224", "reg_token"
        kwargs["reg_tokens"] = 1
    elif model_type == "deit":
        second = "dist_token"
    _vit_embeddings(r, second_token=second, registers=False)
    for old, new in (("classifier", "head"), ("cls_classifier", "head"), ("distillation_classifier", "head_dist")):
        if r.has(f"{old}.weight"):
            r.move(old, new)
    return arch


def _clip(r: _Renamer, model_type: str, s: dict[str, Any], kwargs: dict[str, Any], *, what: str) -> str:
    _clip_embeddings(r, cls=True)
    if r.has("visual_projection.weight"):  # the image embedding: a linear map without bias, timm's head
        r.out["head.weight"] = w = r.take("visual_projection.weight")
        r.out["head.bias"] = w.new_zeros(w.shape[0])
    return _FAMILIES[model_type].arch


def _siglip(r: _Renamer, model_type: str, s: dict[str, Any], kwargs: dict[str, Any], *, what: str) -> str:
    _clip_embeddings(r, cls=False)
    kwargs.update(class_token=False, global_pool="map" if s["vision_use_head"] else "avg", fc_norm=False)
    if s["vision_use_head"]:
        _siglip_head(r, s["hidden_size"])
    return _FAMILIES[model_type].arch


_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1152: "so400m", 1280: "huge", 1536: "giant"}


def _sized(arch: str, s: dict[str, Any]) -> str:
    """timm's registered name for the family's model of this width, patch and image size where it has one
    (vit_base_patch16_224 -> vit_large_patch32_384), so the name shown says what the model is; else the family's.
    The kwargs set every size either way; the name also picks the pretrained cfg (the family's preprocessing)."""
    size, img = _SIZES.get(s["hidden_size"]), s["image_size"]
    if size is None:
        return arch
    name = re.sub(r"patch\d+", f"patch{s['patch_size']}", re.sub(r"^(vit|deit)_[a-z0-9]+_", rf"\1_{size}_", arch))
    name = re.sub(r"_\d+$", f"_{img}", name) if isinstance(img, int) else name
    return name if timm.is_model(name) else arch


_LAYOUTS = {"vit": _vit, "dinov2": _dinov2, "clip": _clip, "siglip": _siglip}


def _convert(
        state: dict[str, torch.Tensor],
        model_type: str,
        s: dict[str, Any],
        *,
        what: str,
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(timm architecture, its kwargs, the weights under timm's names) of a checkpoint's tensors (meta ones too)."""
    family = _FAMILIES[model_type]
    kwargs = _kwargs(s, family.layout)
    r = _Renamer({k.removeprefix(family.base): v for k, v in state.items()}, what=what)
    _blocks(r, family.layout, s["num_hidden_layers"], swiglu=bool(s.get("use_swiglu_ffn")))
    arch = _LAYOUTS[family.layout](r, model_type, s, kwargs, what=what)
    arch = arch if s.get("use_swiglu_ffn") else _sized(arch, s)  # timm's SwiGLU DINOv2 is the giant only
    if "head.weight" in r.out:
        kwargs["num_classes"] = int(r.out["head.weight"].shape[0])
    if kwargs["num_classes"] > MAX_NUM_CLASSES:
        raise CheckpointError(f"{what}: its head has {kwargs['num_classes']:,} classes; at most {MAX_NUM_CLASSES:,}")
    left = r.leftover()
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise CheckpointError(f"{what} holds weights that a {model_type} model of its config.json does not have: "
                              f"{', '.join(left[:5])}{more}")
    return arch, kwargs, r.out
