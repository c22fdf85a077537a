"""Explanations of one target by several methods, sharing their passes (the planner captum has no counterpart of)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ParameterError
from ..models.labels import class_names, has_classes, top_predictions
from ..targets import Target, check_one_image, describe_target
from ._base import Explanation, Geometry, PassResult, Progress, ranks_nothing
from .passes import Plain, merge_passes
from .registry import Method

__all__ = ["explain", "explain_all"]


def _frozen(heat: torch.Tensor | np.ndarray) -> np.ndarray:
    a = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else heat
    a = np.array(a, dtype=np.float32)  # our own copy
    a.flags.writeable = False
    return a


def _notes(heat: np.ndarray) -> tuple[str, ...]:
    if ranks_nothing(heat) and not np.isfinite(heat).all():
        return ("This map has values that are not numbers (NaN or infinite): it ranks nothing.",)
    if ranks_nothing(heat):
        return ("This map is constant: this method gives no patch more weight than another for this target, so it "
                "explains nothing here. Try another method or target.",)
    return ()


def _run_passes(model, x, passes, target, progress, interrupt) -> dict[object, tuple[PassResult, float]]:
    """Each distinct pass once; a random-only request still runs a plain forward (to resolve the target)."""
    runs = {}
    distinct = [p for p in dict.fromkeys(passes) if p != Plain()] or [Plain()]
    for p in distinct:
        t0 = time.perf_counter()
        runs[p] = (p.run(model, x, target, progress=progress, interrupt=interrupt), time.perf_counter() - t0)
    return runs


def explain_all(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        methods: Sequence[Method | str],
        target: Target | str = "auto",
        progress: Progress | None = None,
        interrupt: Callable[[], None] | None = None,
) -> list[Explanation]:
    """Explanations of one target on one image ``x`` (1, 3, H, W) by several methods, sharing their passes.

    Each pass runs once however many methods need it (:mod:`.passes`). Each explanation's ``seconds`` is its pass (a
    shared pass is charged in full to each method using it) plus its map; the random map costs its map only.
    ``progress(i, n)`` after each step of a method that runs in steps; ``interrupt()`` before every block walked
    (it raises to stop: an abandoned or timed-out job).
    """
    check_one_image(model, x)
    methods = [Method.parse(m) for m in methods]
    if not methods:
        raise ParameterError("no methods to explain with")
    geo = Geometry.of(model)
    requests = [m.spec.needs(m.settings, geo) for m in methods]
    serving = merge_passes(requests)
    runs = _run_passes(model, x, [serving[r] for r in requests], target, progress, interrupt)
    first = next(iter(runs.values()))[0]
    logits = None if first.outputs.logits is None else first.outputs.logits[0]
    description = describe_target(model, first.target, logits)
    # a CLIP tower's head projects into the text space: its outputs are no classes (has_classes)
    classifies = logits is not None and first.target.kind != "prompt" and has_classes(model)
    predictions = top_predictions(logits, names=class_names(model)) if classifies else ()
    out = []
    for m, r in zip(methods, requests, strict=True):
        run, pass_seconds = runs.get(serving[r], (first, 0.0))
        t0 = time.perf_counter()
        heat = _frozen(m.spec.map(m.settings, run, geo))
        out.append(Explanation(
            map=heat, method=m, target=first.target, target_description=description, uses_target=m.spec.uses_target,
            predictions=predictions, passes=run.passes if serving[r] != Plain() else "none", notes=_notes(heat),
            seconds=(pass_seconds if serving[r] != Plain() else 0.0) + time.perf_counter() - t0,
        ))
    return out


def explain(
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        method: Method | str = "chefer",
        target: Target | str = "auto",
        progress: Progress | None = None,
        interrupt: Callable[[], None] | None = None,
) -> Explanation:
    """One explanation of ``target`` on one image ``x`` (1, 3, H, W): see :func:`explain_all`."""
    return explain_all(model, x, methods=[method], target=target, progress=progress, interrupt=interrupt)[0]
