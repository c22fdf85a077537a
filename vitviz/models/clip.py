"""CLIP-style models through ``open_clip`` (the optional extra ``vitviz[clip]``): the image tower as a timm
``VisionTransformer`` that vitviz walks like any other, and the text tower kept beside it, for text prompts as targets.

A model is named ``clip:NAME/TAG``: open_clip's model name and pretrained tag (``open_clip.list_pretrained()``), e.g.
``clip:ViT-B-32/laion2b_s34b_b79k`` or ``clip:ViT-B-16/openai``; ``clip:hf-hub:ORG/REPO`` reads an open_clip folder
on the Hugging Face Hub. Weights come from the Hub (or its local cache): offline and not cached, loading fails at once
with :class:`~vitviz.errors.ModelUnavailableError`, as a timm hub name does. A name without a tag whose model has no
pretrained tags (a config registered with ``open_clip.add_model_config``) builds with random weights.

The image tower (open_clip's ``VisionTransformer`` of ``ResidualAttentionBlock``\\ s) maps onto timm's
``VisionTransformer`` with ``pre_norm=True``, key by key (:func:`tower_source`):

    conv1 -> patch_embed.proj (no bias)      class_embedding -> cls_token     positional_embedding -> pos_embed
    ln_pre -> norm_pre    ln_1/ln_2 -> norm1/norm2    attn.in_proj -> attn.qkv    attn.out_proj -> attn.proj
    ls_1/ls_2 -> ls1/ls2  mlp.c_fc/c_proj -> mlp.fc1/fc2    ln_post -> norm    proj (width, D) -> head (D classes)

so the head's output is open_clip's ``encode_image`` (unnormalised), D = the joint embedding's size. timm's head is a
``Linear`` with a bias; it is zero, so the head is the bias-free projection. QuickGELU towers (OpenAI's) use timm's
``act_layer="quick_gelu"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ModelError, ModelUnavailableError, ParameterError
from ._arch import ModelSource, Status, _create
from .labels import PROJECTION_KEY, Prediction

__all__ = ["CLIP_PREFIX", "DEFAULT_TEMPLATE", "ClipModel", "TextEncoder", "is_clip_name", "tower_source",
           "clip_model", "load_clip", "clip_source", "imagenet_classes", "zero_shot"]

CLIP_PREFIX = "clip:"
DEFAULT_TEMPLATE = "a photo of a {}."  # CLIP's own zero-shot prompt (Radford et al. 2021)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
# timm CLIP towers whose default pretrained config is open_clip's preprocessing (OpenAI mean and std, bicubic, the
# whole centre square): every size is set by the kwargs, so the name only picks the preprocessing
_ARCH = {True: "vit_base_patch16_clip_quickgelu_224", False: "vit_base_patch32_clip_256"}


def is_clip_name(name: object) -> bool:
    """Whether ``name`` names an open_clip model (``clip:...``)."""
    return str(name).strip().startswith(CLIP_PREFIX)


@dataclass(frozen=True, eq=False)
class TextEncoder:
    """open_clip's text tower: prompts -> unit embeddings (N, D). Shared and never changed, like the image tower."""

    model: torch.nn.Module  # the open_clip model, read through its own ``encode_text``
    tokenizer: Callable[[list[str]], torch.Tensor]

    def __call__(self, texts: Sequence[str], *, batch: int = 256) -> torch.Tensor:
        """(N, D) float32 on the CPU, each row of unit length."""
        texts = [str(t) for t in texts]
        if not texts or not all(t.strip() for t in texts):
            raise ParameterError("a prompt must be some text, not an empty string")
        param = next(self.model.parameters())
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                tokens = self.tokenizer(texts[i : i + batch]).to(param.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out)


@dataclass(frozen=True, eq=False)
class ClipModel:
    """An open_clip model read by vitviz: the image tower as a timm ViT, the text tower beside it.

    ``source`` and ``image.state_dict()`` rebuild the tower at other sizes (:func:`vitviz.models.build_model`).
    """

    name: str
    image: torch.nn.Module  # timm VisionTransformer in eval mode; its head's output is encode_image's
    text: TextEncoder
    logit_scale: float  # exp of open_clip's learnt log scale (100 for OpenAI's CLIP)
    source: ModelSource


def _check_tower(visual: torch.nn.Module) -> None:
    """Refuse the towers the mapping does not cover, with the reason."""
    kind = type(visual).__name__
    if kind != "VisionTransformer" or not hasattr(visual, "transformer"):
        raise ModelError(f"the open_clip image tower is a {kind}: vitviz reads open_clip's own VisionTransformer only")
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
        raise ModelError("the open_clip image tower pools its tokens by attention or averaging: vitviz reads the "
                         "CLS-token pool only")
    for i, blk in enumerate(visual.transformer.resblocks):
        if type(blk).__name__ != "ResidualAttentionBlock":
            raise ModelError(f"block {i} of the open_clip image tower is a {type(blk).__name__}: vitviz reads "
                             "ResidualAttentionBlock only")
    eps = {float(m.eps) for m in visual.modules() if isinstance(m, torch.nn.LayerNorm)}
    if eps != {1e-5}:
        raise ModelError(f"the open_clip image tower's LayerNorms use eps {sorted(eps)}, not 1e-5")
    mean = (getattr(visual, "preprocess_cfg", None) or {}).get("mean", _OPENAI_MEAN)
    if not torch.allclose(torch.tensor(mean, dtype=torch.float64), torch.tensor(_OPENAI_MEAN, dtype=torch.float64)):
        raise ModelError(f"the open_clip model normalises images with mean {tuple(mean)}: vitviz reads CLIP towers "
                         "with OpenAI's mean and std only")


def _activation(visual: torch.nn.Module) -> str:
    act = visual.transformer.resblocks[0].mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ModelError(f"the open_clip image tower's MLP activation {act!r} is neither GELU nor QuickGELU")


_BLOCK_KEYS = (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.out_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
               ("mlp.c_proj", "mlp.fc2"))


def _tower_state(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's image tower weights under timm's names (our own copies, float32)."""
    proj = visual.proj.detach()  # (width, D): x @ proj, so timm's head weight is its transpose
    state = {"patch_embed.proj.weight": visual.conv1.weight, "cls_token": visual.class_embedding[None, None],
             "pos_embed": visual.positional_embedding[None], "norm.weight": visual.ln_post.weight,
             "norm.bias": visual.ln_post.bias, "head.weight": proj.T, "head.bias": proj.new_zeros(proj.shape[1])}
    if not isinstance(visual.ln_pre, torch.nn.Identity):
        state.update({"norm_pre.weight": visual.ln_pre.weight, "norm_pre.bias": visual.ln_pre.bias})
    for i, blk in enumerate(visual.transformer.resblocks):
        p, own = f"blocks.{i}.", dict(blk.named_parameters())
        state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"] = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        for ours, theirs in _BLOCK_KEYS:
            state[p + theirs + ".weight"], state[p + theirs + ".bias"] = own[ours + ".weight"], own[ours + ".bias"]
        for ours, theirs in (("ls_1", "ls1"), ("ls_2", "ls2")):
            if ours + ".gamma" in own:
                state[p + theirs + ".gamma"] = own[ours + ".gamma"]
    return {k: v.detach().float().clone().contiguous() for k, v in state.items()}


def tower_source(visual: torch.nn.Module, *, name: str) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """open_clip's image tower -> how vitviz builds it as a timm ViT (:class:`ModelSource`) and its weights."""
    _check_tower(visual)
    blocks = visual.transformer.resblocks
    width = int(visual.conv1.out_channels)
    ls = getattr(blocks[0].ls_1, "gamma", None)
    kwargs = dict(
        img_size=tuple(int(v) for v in visual.image_size), patch_size=int(visual.conv1.kernel_size[0]),
        embed_dim=width, depth=len(blocks), num_heads=int(blocks[0].attn.num_heads),
        mlp_ratio=blocks[0].mlp.c_fc.out_features / width, num_classes=int(visual.proj.shape[1]),
        pre_norm=not isinstance(visual.ln_pre, torch.nn.Identity), class_token=True, global_pool="token",
        act_layer=_activation(visual), init_values=None if ls is None else 1.0,
    )
    state = _tower_state(visual)
    if not kwargs["pre_norm"]:  # timm's patch embedding has a bias without the pre-norm; open_clip's never does
        state["patch_embed.proj.bias"] = torch.zeros(width)
    quick = kwargs["act_layer"] == "quick_gelu"
    return ModelSource(name=name, arch=_ARCH[quick], kind="hub", kwargs=kwargs, projection_head=True), state


def _build_tower(source: ModelSource, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _create(source.arch, source.kwargs, what=repr(source.name))
    model.load_state_dict(state, strict=True, assign=True)
    model.pretrained_cfg = {**model.pretrained_cfg, PROJECTION_KEY: True}  # its head is no classifier (has_classes)
    return model.eval().requires_grad_(False)


def clip_model(model: torch.nn.Module, *, tokenizer: Callable | None = None,
               name: str = "open_clip model") -> ClipModel:
    """An open_clip ``CLIP`` model in eval mode (e.g. from ``open_clip.create_model``) as a :class:`ClipModel`;
    ``model`` is only read. ``tokenizer``: open_clip's tokenizer for it (default: the bundled BPE at the model's
    context length)."""
    if not hasattr(model, "visual") or not hasattr(model, "encode_text"):
        raise ModelError(f"{type(model).__name__} is not an open_clip CLIP model (no image and text towers)")
    if model.training:
        raise ModelError("the open_clip model is in training mode: call model.eval() first")
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.SimpleTokenizer(context_length=int(model.context_length))
    source, state = tower_source(model.visual, name=name)
    return ClipModel(name=name, image=_build_tower(source, state), text=TextEncoder(model, tokenizer),
                     logit_scale=float(model.logit_scale.detach().exp().reshape(-1)[0]), source=source)


def _split(name: str) -> tuple[str, str | None]:
    """``clip:NAME/TAG`` -> (NAME, TAG); ``clip:hf-hub:ORG/REPO`` -> (the hub name, None)."""
    text = str(name).strip().removeprefix(CLIP_PREFIX).strip()
    if text.startswith("hf-hub:"):
        return text, None
    model, _, tag = text.partition("/")
    if not model:
        raise ParameterError(f"{name!r}: name an open_clip model as clip:NAME/TAG, e.g. clip:ViT-B-32/openai")
    return model, tag or None


def _check_weights(open_clip, name: str, model: str, tag: str | None) -> None:
    """Fail fast, before open_clip retries a download for minutes: an unknown model or tag, or offline."""
    from .hub import _hub_reachable, _unavailable

    if model.startswith("hf-hub:"):
        if not _hub_reachable():
            raise _unavailable(name)
        return
    if model not in open_clip.list_models():
        raise ModelError(f"{model!r} is not an open_clip model name (see open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag is None and tags:
        raise ParameterError(f"{name!r}: name its pretrained weights as clip:{model}/TAG, TAG one of {', '.join(tags)}")
    if tag is not None and tag not in tags:
        raise ParameterError(f"{tag!r} is not a pretrained tag of {model}: choose one of {', '.join(tags) or 'none'}")
    if tag is not None and not _cached(open_clip.get_pretrained_cfg(model, tag)) and not _hub_reachable():
        raise _unavailable(name)


def _cached(cfg: dict) -> bool:
    """Whether a tag's weights are in the local Hugging Face cache already (no network)."""
    from huggingface_hub import try_to_load_from_cache

    hub = str(cfg.get("hf_hub", ""))  # "org/repo/" or "org/repo/filename"
    if not hub:
        return False
    repo, _, filename = hub.rpartition("/")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in names)


def load_clip(name: str, progress: Status | None = None) -> ClipModel:
    """The open_clip model ``clip:NAME/TAG`` (see the module docstring), cached by its name (one model however it is
    asked for: the tower and the text encoder of one load); its tokenizer is open_clip's own."""
    if progress:
        progress(f"Loading {name} from the Hugging Face Hub (or its local cache)...")
    return _load_clip(str(name).strip())


@functools.lru_cache(maxsize=2)
def _load_clip(name: str) -> ClipModel:
    try:
        import open_clip
    except ImportError as exc:
        raise ModelUnavailableError("CLIP models need the optional extra: pip install 'vitviz[clip]'") from exc
    model_name, tag = _split(name)
    _check_weights(open_clip, name, model_name, tag)
    try:
        model = open_clip.create_model(model_name, pretrained=tag, device="cpu").eval().requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as exc:  # 404, gated, a lost connection, a bad cache
        from .hub import _unavailable

        raise _unavailable(name, f" ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") \
            from exc
    return clip_model(model, tokenizer=tokenizer, name=f"{CLIP_PREFIX}{model_name}" + (f"/{tag}" if tag else ""))


def clip_source(name: str, progress: Status | None = None) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """The image tower of ``clip:NAME/TAG`` as the model path reads a source: how to build it, and its weights."""
    clip = load_clip(str(name).strip(), progress)
    return clip.source, clip.image.state_dict()


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """ImageNet-1k's class names from timm's label info, each its first WordNet lemma ("golden retriever")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes()))


@functools.lru_cache(maxsize=8)
def _class_embeddings(text: TextEncoder, classes: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
    """(C, D) unit class embeddings: each class's prompts over the templates, averaged and renormalised (CLIP's
    prompt ensembling)."""
    units = text([t.format(c) for c in classes for t in templates]).view(len(classes), len(templates), -1)
    return torch.nn.functional.normalize(units.mean(1), dim=-1)


def zero_shot(clip: ClipModel, image_embedding: torch.Tensor, classes: Sequence[str], *,
              templates: Sequence[str] = (DEFAULT_TEMPLATE,), k: int = 5) -> tuple[Prediction, ...]:
    """Zero-shot predictions of one image embedding (D,) (the head's output) over ``classes``: softmax over the
    classes of logit_scale · cos(image, class), the ``k`` most probable first (``logit`` = logit_scale · cos)."""
    classes = tuple(str(c).strip() for c in classes)
    if not classes or not all(classes):
        raise ParameterError("zero-shot predictions need a list of class names, none empty")
    if any("{}" not in t for t in templates) or not templates:
        raise ParameterError("each prompt template must hold {} where the class name goes, e.g. 'a photo of a {}.'")
    units = _class_embeddings(clip.text, classes, tuple(templates))
    image = torch.nn.functional.normalize(image_embedding.detach().float().cpu().reshape(-1), dim=0)
    if image.numel() != units.shape[1]:
        raise ParameterError(f"an image embedding of size {image.numel()} for text embeddings of {units.shape[1]}")
    logits = clip.logit_scale * (units @ image)
    probs = logits.softmax(-1)
    top = torch.topk(probs, min(k, len(classes)))
    return tuple(Prediction(index=i, name=classes[i], probability=float(probs[i]), logit=float(logits[i]))
                 for i in top.indices.tolist())
