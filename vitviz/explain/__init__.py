"""Explanation methods with one shape: which patches a target (a class, the embedding, a patch's feature) depends on.

One module per method family, each a :class:`MethodSpec` (settings, the pass it needs, whether it uses the target, its
map): :mod:`.rollout` (rollout, raw attention), :mod:`.chefer` (Chefer, gradient × attention), :mod:`.legrad`,
:mod:`.deletion` (greedy token deletion), :mod:`.baseline` (random). :mod:`.registry` lists them; :mod:`.passes`
runs the passes they share; :func:`explain_all` plans and runs them. Targets live in :mod:`vitviz.targets`.
"""

from __future__ import annotations

from ..targets import ModelOutputs, Target, TargetKind, describe_target, embed_tokens, head_outputs, resolve_target
from ._base import Explanation, Geometry, MethodSpec, PassResult, Progress
from .baseline import random_map
from .chefer import chefer_map, grad_attention_map
from .deletion import DELETION_STEPS
from .legrad import legrad_map
from .passes import AttentionGradients, attention_gradients
from .registry import DEFAULT_METHOD, METHOD_NAMES, METHODS, Method, method_spec
from .run import explain, explain_all

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "DEFAULT_METHOD",
    "DELETION_STEPS",
    "Method",
    "MethodSpec",
    "method_spec",
    "Explanation",
    "Geometry",
    "PassResult",
    "Progress",
    "Target",
    "TargetKind",
    "ModelOutputs",
    "AttentionGradients",
    "attention_gradients",
    "embed_tokens",
    "head_outputs",
    "resolve_target",
    "describe_target",
    "chefer_map",
    "legrad_map",
    "grad_attention_map",
    "random_map",
    "explain",
    "explain_all",
]
