"""Predictions of a classifier head and the names of its classes.

Class names come first from the model itself: ``pretrained_cfg["label_names"]`` (timm's own field), which vitviz sets
when it builds a checkpoint whose metadata names its classes (a trained or probed model, :mod:`vitviz.experiments`).
Otherwise from timm's bundled label info: :func:`timm.data.infer_imagenet_subset` guesses the ImageNet
subset from the number of classes (1000 -> ImageNet-1k, 11821 -> ImageNet-12k, ...) and
:class:`timm.data.ImageNetInfo` names each index with its WordNet lemma ("golden retriever"). A head whose size
matches no known subset gets "class N". A model without a head (``num_classes == 0``, e.g. the default DINOv2
backbone) has no classes at all: it never yields predictions (timm's guess would fall back to the pretrained
config's 1000 classes, so the head is checked first).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.data import ImageNetInfo, infer_imagenet_subset

from ..errors import ModelError, ParameterError

__all__ = ["Prediction", "PROJECTION_KEY", "has_head", "is_projection_head", "has_classes", "no_classes_reason",
           "label_set", "own_names", "class_names", "class_name", "top_predictions", "predict"]


@dataclass(frozen=True)
class Prediction:
    """One class of a classifier's output for one image."""

    index: int
    name: str | None  # None when the label set is unknown
    probability: float  # softmax over the head's classes
    logit: float

    def describe(self) -> str:
        """``class 207 'golden retriever' (p = 0.83)``, or ``class 3 (p = 0.41)`` without a known name; a small
        probability in two significant digits (``p = 0.0031``, ``p = 4.2e-06``), never ``p = 0.00``."""
        named = f" '{self.name}'" if self.name else ""
        p = self.probability
        return f"class {self.index}{named} (p = {p:.2f})" if p >= 0.01 else f"class {self.index}{named} (p = {p:.2g})"


PROJECTION_KEY = "vitviz_projection_head"  # pretrained_cfg flag vitviz sets on the CLIP/SigLIP towers it builds
_TEXT_PAIRED = ("_clip_", "siglip")  # timm's image towers of image-text models (vit_base_patch16_clip_224, ...)


def has_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` ends in a head (``num_classes > 0``): a classifier, or a CLIP tower's projection; a backbone
    returns its embedding instead. Classes: :func:`has_classes`."""
    return int(getattr(model, "num_classes", 0) or 0) > 0


def is_projection_head(model: torch.nn.Module) -> bool:
    """Whether ``model``'s head projects into an image-text space (a CLIP or SigLIP image tower) instead of scoring
    classes: towers vitviz built (open_clip, transformers) say so; timm's own, by name, unless fine-tuned (``_ft_``
    tags: ``vit_base_patch16_clip_224.openai_ft_in1k`` is a classifier)."""
    if not has_head(model):
        return False
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get(PROJECTION_KEY):
        return True
    arch, tag = str(cfg.get("architecture", "")), str(cfg.get("tag", "") or "")
    return any(s in arch for s in _TEXT_PAIRED) and "ft" not in tag.split("_") and not tag.startswith("ft")


def has_classes(model: torch.nn.Module) -> bool:
    """Whether ``model`` scores classes: a head that is no image-text projection (predictions, class targets)."""
    return has_head(model) and not is_projection_head(model)


@functools.lru_cache(maxsize=8)
def _names(subset: str) -> tuple[str, ...]:
    info = ImageNetInfo(subset)
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def label_set(model: torch.nn.Module) -> str | None:
    """The ImageNet subset timm infers for ``model``'s head (``"imagenet-1k"``, ...), or None (unknown / no head)."""
    if not has_classes(model):
        return None
    subset = infer_imagenet_subset(model)
    if subset is None or len(_names(subset)) != int(model.num_classes):
        return None
    return subset


def own_names(model: torch.nn.Module) -> tuple[str, ...] | None:
    """The class names the model carries (``pretrained_cfg["label_names"]``, one per class of its head), or None."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if not has_classes(model) or not isinstance(names, (list, tuple)) or len(names) != int(model.num_classes):
        return None
    return tuple(str(n) for n in names)


def class_names(model: torch.nn.Module) -> tuple[str, ...] | None:
    """Every class name of ``model``'s head in index order: the model's own names, else those of the ImageNet subset
    timm infers from the head's size; None when the label set is unknown."""
    own = own_names(model)
    if own is not None:
        return own
    subset = label_set(model)
    return _names(subset) if subset else None


def class_name(model: torch.nn.Module, index: int) -> str:
    """The name of class ``index`` ("golden retriever"), or "class N" when the label set is unknown."""
    if not has_classes(model):
        raise ModelError(no_classes_reason(model))
    if not 0 <= index < int(model.num_classes):
        raise ParameterError(f"class {index} does not exist: choose 0 to {int(model.num_classes) - 1}")
    names = class_names(model)
    return names[index] if names else f"class {index}"


def no_classes_reason(model: torch.nn.Module) -> str:
    """Why ``model`` has no classes, in a sentence a user reads."""
    if is_projection_head(model):
        return ("the model's head projects the image into an image-text embedding space (a CLIP/SigLIP tower), it "
                "scores no classes: explain a text prompt or the embedding")
    return "the model has no classifier head (it is a backbone returning an embedding), so it has no classes"


def top_predictions(logits: torch.Tensor, *, names: Sequence[str] | None = None, k: int = 5) -> tuple[Prediction, ...]:
    """The ``k`` most probable classes of one image's logits (C,), most probable first."""
    if logits.ndim != 1 or logits.numel() == 0:
        raise ParameterError(f"expected one image's logits as a (C,) tensor, got shape {tuple(logits.shape)}")
    if k < 1:
        raise ParameterError(f"k must be at least 1, got {k}")
    if names is not None and len(names) != logits.numel():
        raise ParameterError(f"{len(names)} class names for {logits.numel()} logits")
    logits = logits.detach().float().cpu()
    probs = logits.softmax(-1)
    top = torch.topk(probs, min(k, logits.numel()))
    return tuple(
        Prediction(index=i, name=names[i] if names else None, probability=float(probs[i]), logit=float(logits[i]))
        for i in top.indices.tolist()
    )


def predict(model: torch.nn.Module, x: torch.Tensor, *, k: int = 5) -> tuple[Prediction, ...]:
    """Top-``k`` predictions of ``model`` on one image ``x`` (1, 3, H, W): one plain forward, no gradients."""
    if not has_classes(model):
        raise ModelError(no_classes_reason(model) + ", so it makes no predictions")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ParameterError(f"expected one image as a (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
    with torch.inference_mode():
        logits = model(x)
    return top_predictions(logits[0], names=class_names(model), k=k)
