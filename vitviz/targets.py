"""Targets: the scalar an explanation explains and the faithfulness curves score, read from the model's own head.

A *target* is one of:

- ``class`` c of a classifier head (default: the top-1 class): the logit y_c (the pre-softmax score, as in
  Chefer et al.'s and LeGrad's code); the faithfulness curves score its softmax probability;
- ``embedding``, label-free after Crabbé & van der Schaar (ICML 2022): s(x̃) = ⟨f(x), f(x̃)⟩ with f the embedding
  the head reads (the final CLS token after the final norm; a classifier's pre-logits) and f(x) held constant;
- ``patch`` p: the same with f the final (normed) feature of patch p, s(x̃) = ⟨g_p(x), g_p(x̃)⟩;
- ``prompt`` (CLIP-style models, :mod:`vitviz.models.clip`): s(x̃) = cos(e(x̃), t) of the image embedding e (the
  head's output, open_clip's ``encode_image``) with the prompt's unit text embedding t. t is computed once by the
  text encoder (:func:`prompt_target`) and travels with the target, so the shared model holds no request's state.

A model without a head (``num_classes == 0``, the default DINOv2) never gets a class target: :class:`ModelError`.
Methods (:mod:`vitviz.explain`) and metrics (:mod:`vitviz.metrics`) both read targets from here; neither imports
the other's targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import ModelError, ParameterError
from .models.labels import Prediction, class_names, has_classes, has_head, no_classes_reason
from .walk.blocks import check_walkable, embed

__all__ = [
    "TargetKind",
    "Target",
    "ModelOutputs",
    "embed_tokens",
    "head_outputs",
    "resolve_target",
    "describe_target",
    "target_reference",
    "target_score",
    "check_one_image",
    "prompt_target",
]

TargetKind = Literal["auto", "class", "embedding", "patch", "prompt"]
_TARGET_KINDS = ("auto", "class", "embedding", "patch", "prompt")
embed_tokens = embed  # (B, 3, H, W) -> (B, T, C), as timm's forward does


@dataclass(frozen=True)
class Target:
    """What is explained. ``index``: the class (None = top-1) or the patch (row-major over the grid); ``text`` and
    ``text_embedding``: a prompt and its unit text embedding (D,) (:func:`prompt_target` makes both)."""

    kind: TargetKind = "auto"
    index: int | None = None
    text: str | None = None
    text_embedding: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _TARGET_KINDS:
            raise ParameterError(f"unknown target {self.kind!r}: choose auto, class, class:N, embedding, patch:N "
                                 "or prompt:TEXT")
        if (self.kind == "prompt") != (self.text is not None) or (self.kind != "prompt" and self.text_embedding):
            raise ParameterError("a prompt and its text embedding belong to the prompt target only, which needs them")
        if self.kind == "prompt" and not self.text.strip():
            raise ParameterError("the prompt target needs some text: prompt:TEXT")
        if self.index is not None and (not isinstance(self.index, int) or isinstance(self.index, bool)
                                       or self.index < 0):
            raise ParameterError(f"a target index must be a non-negative integer, got {self.index!r}")
        if self.kind in ("auto", "embedding", "prompt") and self.index is not None:
            raise ParameterError(f"the {self.kind} target takes no index")
        if self.kind == "patch" and self.index is None:
            raise ParameterError("the patch target needs a patch index: patch:N")

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """``auto``, ``class`` (top-1), ``class:N``, ``embedding``, ``patch:N`` or ``prompt:TEXT`` (its text embedding
        still to come: :func:`prompt_target`)."""
        if isinstance(text, Target):
            return text
        kind, sep, prompt = str(text).strip().partition(":")
        if kind.lower() == "prompt" and sep:
            return cls("prompt", text=prompt.strip())
        kind, _, index = str(text).strip().lower().partition(":")
        if index and not index.isdigit():
            raise ParameterError(f"target {text!r}: the index after ':' must be a non-negative integer")
        return cls(kind, int(index) if index else None)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        if self.kind == "prompt":
            return f"prompt:{self.text}"
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class ModelOutputs:
    """What the head reads from final (normed) tokens: ``tokens`` (B, T, C), ``embedding`` (B, D), ``logits``."""

    tokens: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor | None  # (B, num_classes); None for a model without a head


def head_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> ModelOutputs:
    """Un-normed final tokens (B, T, C) -> the final norm, the embedding the head reads and the logits.

    The embedding is timm's ``forward_head(pre_logits=True)``: the normed CLS token for token pooling (the mean
    of the CLS and distillation tokens for a distilled DeiT, the pooled patches for average pooling).
    """
    feats = model.norm(tokens)
    embedding = model.forward_head(feats, pre_logits=True)
    logits = model.forward_head(feats) if has_head(model) else None
    return ModelOutputs(tokens=feats, embedding=embedding, logits=logits)


def _num_patches(model: torch.nn.Module) -> int:
    gh, gw = model.patch_embed.grid_size
    return int(gh) * int(gw)


def resolve_target(model: torch.nn.Module, target: Target | str, logits: torch.Tensor | None) -> Target:
    """``auto`` -> class (with a head) or embedding; ``class`` -> its index (top-1 of ``logits`` (C,) when None).

    Raises :class:`ModelError` for a class target on a model without a head, :class:`ParameterError` for an index
    out of range.
    """
    target = Target.parse(target)
    kind = ("class" if has_classes(model) else "embedding") if target.kind == "auto" else target.kind
    if kind == "class":
        if not has_classes(model):
            raise ModelError(f"{no_classes_reason(model)}: there is no class to explain")
        num = int(model.num_classes)
        index = int(logits.argmax()) if target.index is None else target.index
        if not 0 <= index < num:
            raise ParameterError(f"class {index} does not exist: choose 0 to {num - 1}")
        return Target("class", index)
    if kind == "prompt":
        return _checked_prompt(model, target)
    if kind == "patch" and not 0 <= target.index < _num_patches(model):
        raise ParameterError(f"patch {target.index} does not exist: choose 0 to {_num_patches(model) - 1}")
    return Target(kind, target.index)


def _checked_prompt(model: torch.nn.Module, target: Target) -> Target:
    """A prompt target whose text embedding fits the model's image embedding (the head's output)."""
    if target.text_embedding is None:
        raise ParameterError(f"the prompt {target.text!r} has no text embedding yet: make the target with "
                             "vitviz.targets.prompt_target and the model's text encoder")
    if not has_head(model) or int(model.num_classes) != len(target.text_embedding):
        raise ModelError(f"the prompt's text embedding has {len(target.text_embedding)} numbers, but this model's head "
                         f"gives {int(getattr(model, 'num_classes', 0) or 0)}: a prompt needs the image tower of the "
                         "CLIP model whose text encoder made it")
    return target


def prompt_target(encoder: Callable[[Sequence[str]], torch.Tensor], prompt: str) -> Target:
    """The prompt target of ``prompt``: ``encoder`` (a CLIP text encoder, :class:`vitviz.models.clip.TextEncoder`, or
    a :class:`~vitviz.models.clip.ClipModel`) gives its unit text embedding, computed once and carried by the target."""
    text = str(prompt).strip()
    if not text:
        raise ParameterError("the prompt target needs some text")
    unit = getattr(encoder, "text", encoder)([text])[0]
    return Target("prompt", text=text, text_embedding=tuple(float(v) for v in unit.detach().float().reshape(-1)))


def _cosine(image: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """cos(e, t) per row of ``image`` (B, D) with a unit ``unit`` (D,)."""
    return (image @ unit.to(image.dtype)) / image.norm(dim=-1)


def describe_target(model: torch.nn.Module, target: Target, logits: torch.Tensor | None) -> str:
    """A person's description of a resolved target, e.g. ``class 207 'golden retriever' (p = 0.83)``."""
    if target.kind == "class":
        names = class_names(model)
        probs = logits.detach().float().softmax(-1)
        c = target.index
        return Prediction(c, names[c] if names else None, float(probs[c]), float(logits[c])).describe()
    if target.kind == "prompt":
        unit = torch.tensor(target.text_embedding, dtype=torch.float32)
        cos = float(_cosine(logits.detach().float().cpu()[None], unit)[0])
        return f"the prompt '{target.text}' (cos = {cos:.2g})"
    if target.kind == "patch":
        gw = int(model.patch_embed.grid_size[1])
        row, col = divmod(target.index, gw)
        return f"patch {target.index}'s own feature (row {row}, column {col})"
    if getattr(model, "dist_token", None) is not None:
        return "the image's own embedding (mean of its CLS and distillation tokens)"
    pool = getattr(model, "global_pool", "token")
    if pool != "token":  # timm's names: "avg", "map" (an attention pool), "max", "avgmax"
        how = {"avg": "mean", "map": "attention"}.get(pool, pool)
        return f"the image's own {how}-pooled embedding"
    return "the image's own CLS embedding" + (" (pre-logits)" if has_head(model) else "")


def target_reference(model: torch.nn.Module, target: Target, out: ModelOutputs) -> torch.Tensor | None:
    """f(x) held constant (detached): the embedding, or patch p's feature; the prompt's unit text embedding t (D,);
    None for a class target."""
    if target.kind == "prompt":
        return torch.tensor(target.text_embedding, dtype=torch.float32, device=out.embedding.device)
    if target.kind == "embedding":
        return out.embedding[0].detach()
    if target.kind == "patch":
        return out.tokens[0, int(model.num_prefix_tokens) + target.index].detach()
    return None


def target_score(model: torch.nn.Module, target: Target, out: ModelOutputs, ref: torch.Tensor | None) -> torch.Tensor:
    """The explained scalar per image (B,): y_c, ⟨f(x), f(x̃)⟩ with ``ref`` = f(x) (constant), or cos(e(x̃), t)."""
    if target.kind == "class":
        return out.logits[:, target.index]
    if target.kind == "prompt":
        return _cosine(out.logits, ref)
    if target.kind == "embedding":
        return out.embedding @ ref.to(out.embedding.dtype)
    return out.tokens[:, int(model.num_prefix_tokens) + target.index] @ ref.to(out.tokens.dtype)


def check_one_image(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Raise unless ``model`` can be walked in eval mode and ``x`` is one image (1, 3, H, W) at its input size."""
    check_walkable(model)
    if model.training:
        raise ModelError("the model is in training mode: call model.eval() first (dropout would change the maps)")
    want = tuple(int(v) for v in model.patch_embed.img_size)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or tuple(x.shape[-2:]) != want:
        raise ParameterError(f"expected one image as a (1, 3, {want[0]}, {want[1]}) tensor, got {tuple(x.shape)}")
    if len(model.blocks) == 0:
        raise ModelError("the model has no transformer blocks, so there is no attention to explain")
