"""The one shape of an explanation method, and what a method is given and gives back.

A method is one module holding one :class:`MethodSpec`: its name and title, its settings (a frozen dataclass whose
fields are the ``key=value`` settings of ``name:key=value,...``), whether its map depends on the target, which
pass it needs (:mod:`.passes`: shared between methods where equal) and how it turns that pass into a map. The
registry (:mod:`.registry`) lists them; the app's menu, the CLI's help and ``vitviz evaluate`` all read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ParameterError
from ..models.labels import Prediction
from ..targets import ModelOutputs, Target

__all__ = ["Geometry", "PassResult", "MethodSpec", "Explanation", "Progress", "layer_index", "ranks_nothing"]

Progress = Callable[[int, int], None]  # (steps done, steps in all) of a method that runs in steps


@dataclass(frozen=True)
class Geometry:
    """What a map needs to know of the model: its patch grid, prefix tokens (CLS, registers, distillation) and depth."""

    grid: tuple[int, int]
    num_prefix_tokens: int
    depth: int
    pool: str = "token"  # how the head reads the final tokens: "token" (CLS), "avg" (patches), "map", ...
    pool_from: int = 0  # the first token an average pool reads (0 when it includes the prefix tokens)
    distilled: bool = False  # a distilled DeiT's head averages its CLS and distillation tokens

    @classmethod
    def of(cls, model: torch.nn.Module) -> Geometry:
        gh, gw = (int(v) for v in model.patch_embed.grid_size)
        p = int(model.num_prefix_tokens)
        pool = "map" if getattr(model, "attn_pool", None) is not None else str(model.global_pool or "none")
        return cls(grid=(gh, gw), num_prefix_tokens=p, depth=len(model.blocks), pool=pool,
                   pool_from=0 if getattr(model, "pool_include_prefix", False) else p,
                   distilled=getattr(model, "dist_token", None) is not None)

    def readout(self, target: Target, *, pool: torch.Tensor | None = None) -> torch.Tensor | None:
        """How ``target`` reads the final tokens, as weights w (T,) over them: patch p's own token, the CLS token
        (and the distillation token), the pooled patches' mean, or for an attention-pool head ("map") ``pool``, the
        weights its attention gave the tokens on this image (:func:`.passes.pool_readout`); None for a head no row
        describes (max pooling, an attention pool without its weights)."""
        T = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        w = torch.zeros(T, dtype=torch.float64)
        if target.kind == "patch":  # the patch's own feature, whatever the head pools
            w[self.num_prefix_tokens + target.index] = 1.0
            return w
        if self.pool == "map":  # weights that differ per image: read from the pass
            return pool
        if self.pool == "token":
            w[: 2 if self.distilled else 1] = 1.0 / (2 if self.distilled else 1)
        elif self.pool == "avg":
            w[self.pool_from :] = 1.0 / (T - self.pool_from)
        else:  # max pooling: no weights over the tokens
            return None
        return w


@dataclass(frozen=True)
class PassResult:
    """What one pass yields for the methods sharing it: every layer's attention (H, T, T each) when it has them,
    the gradients or a method's own result (``extra``), the model's outputs on the image and the resolved target."""

    outputs: ModelOutputs
    target: Target
    attention: torch.Tensor | tuple[torch.Tensor, ...] | None = None  # (L, H, T, T), or L tensors (H, T, T)
    extra: Any = None  # AttentionGradients, Deletion, ...: whatever the pass computes besides attention
    passes: str = "none"  # what ran, for a person: "1 forward + 1 backward"


@dataclass(frozen=True)
class NoSettings:
    """A method with nothing to set."""


@dataclass(frozen=True)
class MethodSpec:
    """One explanation method: ``needs(settings, geometry)`` names its pass, ``map(settings, result, geometry)``
    turns the pass into a (gh, gw) map."""

    name: str
    title: str  # for a person: "attention rollout (Abnar & Zuidema 2020)"
    settings: type = NoSettings
    uses_target: bool = True
    needs: Callable[[Any, Geometry], Any] | None = None
    map: Callable[[Any, PassResult, Geometry], torch.Tensor | np.ndarray] | None = None

    def parse_settings(self, text: str) -> Any:
        """``key=value,...`` -> the settings dataclass, each value read as its field's type."""
        kinds = {f.name: type(f.default) for f in dataclasses.fields(self.settings)}
        kwargs: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key not in kinds:
                allowed = ", ".join(kinds) or "none"
                raise ParameterError(f"method {self.name!r} takes settings key=value with keys: {allowed}")
            try:
                kwargs[key] = kinds[key](value)
            except ValueError:
                raise ParameterError(f"method {self.name!r}: {key}={value!r} is not a {kinds[key].__name__}") from None
        return self.settings(**kwargs)


@dataclass(frozen=True)
class Explanation:
    """One map (gh, gw) float32 (read-only), what made it and what it explains."""

    map: np.ndarray
    method: Any  # vitviz.explain.Method
    target: Target  # resolved: class (with its index), embedding or patch
    target_description: str  # "class 207 'golden retriever' (p = 0.83)", "the image's own CLS embedding"
    uses_target: bool  # False for attention-only and random maps: the same map for every target
    predictions: tuple[Prediction, ...]  # a classifier's top 5 on this image; () for a model without a head
    seconds: float  # its pass(es) and the map arithmetic
    passes: str  # "1 forward + 1 backward", "1 forward (attention only)", "none"
    notes: tuple[str, ...] = field(default=())  # e.g. that the map is constant and ranks nothing

    @property
    def informative(self) -> bool:
        """False when the map is constant or not finite: it ranks no patch above another."""
        return not ranks_nothing(self.map)


def ranks_nothing(heat: np.ndarray) -> bool:
    """Whether a map is empty, constant or not finite: then it ranks no patch above another."""
    return not (heat.size > 0 and np.isfinite(heat).all() and heat.max() > heat.min())


def layer_index(layer: int, depth: int, what: str) -> int:
    """A layer counted from 0, or from the end when negative, checked against ``depth``."""
    index = layer if layer >= 0 else depth + layer
    if not 0 <= index < depth:
        raise ParameterError(f"{what} {layer} is out of range: the model has layers 0 to {depth - 1}")
    return index
