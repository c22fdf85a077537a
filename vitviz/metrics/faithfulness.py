"""Faithfulness of a map: remove patches in the map's order and watch the target score (deletion / insertion side).

For a map over the N patches of one image and ``steps`` = S (default 10), step i = 0..S-1 removes
k_i = floor(i·N/S + ½) patches (the removed fraction x_i = i/S: 0, 0.1, ..., 0.9 for S = 10):

- MoRF (most relevant first): the k_i patches with the highest values;
- LeRF (least relevant first): the k_i patches with the lowest values.

Ties are broken by patch index in both orders (a stable sort of -map and of map), so a constant map removes the
same patches both ways and scores exactly 0. A faithful map makes the score fall fast under MoRF and slowly under
LeRF. The areas are trapezoids over the removed fraction, AUC = Σ_i (x_{i+1} - x_i)·(y_i + y_{i+1})/2 on
x_0..x_{S-1} (so at most 0.9 for scores ≤ 1 at S = 10), and

    score = AUC_LeRF - AUC_MoRF        (a random map scores about 0; higher is more faithful)

the symmetric relevance gain (SRG) of Blücher et al. 2024 ("Decoupling pixel flipping and occlusion strategy"),
which reads both orders so that neither a map that only finds the important patches nor one that only finds the
unimportant ones scores well.

The score y at each step (:func:`curves`), by ``readout``:

- ``target`` (the default: what the map explained): for the ``embedding`` target cos(f(x̃), f(x)), f the embedding
  the head reads (1 at step 0); for ``patch`` p cos(g_p(x̃), g_p(x)) of patch p's final feature (patch p is never
  removed: it is ranked out, and the k_i are counted over the other N - 1 patches); for ``class`` c the softmax
  probability p_c(x̃), the logit y_c(x̃) recorded beside it; for a ``prompt`` cos(e(x̃), t), the target's own score;
- ``cls``: cos(f(x̃), f(x)) of the head's embedding (the CLS token for token pooling), whatever was explained;
- ``mean``: the cosine of the mean of the final (normed) patch tokens with the full image's, a read-out no method
  here explains (for backbones);
- ``probability`` / ``logit``: of the explained class, else of the full image's top-1 class (classifiers only).

Perturbation (how a patch is removed; the pixel ones are in :mod:`.perturb`):

- ``tokens``: the patch token is dropped from the sequence after its position embedding was added (prefix tokens,
  CLS + registers + distillation token, are always kept), then the blocks, the final norm and the head run on the
  shorter sequence. Native to ViTs: no infill, and the pass is cheaper by the share of tokens dropped;
- ``pixels``: the patch's pixels are set to the image's per-channel mean in input space (the normalised tensor the
  model reads; the same as the mean pixel, since normalisation is affine per channel), for comparison with
  Chefer et al. 2021's perturbation protocol (Table 1);
- ``blur``: the patch's pixels are taken from the image blurred by a Gaussian of σ = 10 px;
- ``road``: ROAD's noisy linear imputation (Rong et al. 2022) of the removed pixels from their neighbours.

Greedy deletion (:mod:`vitviz.explain.deletion`) is built on token removal with the target read-out: that pair
measures it on its own objective, every other pair does not.

The curves run without gradients, under inference mode. Token removal batches each step's MoRF and LeRF inputs
(the same token count) of every map together; step 0 (nothing removed) is one pass shared by all curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError, ParameterError
from ..targets import (
    ModelOutputs,
    Target,
    check_one_image,
    embed_tokens,
    head_outputs,
    resolve_target,
    target_reference,
    target_score,
)
from ..walk.blocks import run_blocks  # Eva's and Beit's blocks read positions inside attention
from .perturb import blur_fill, gaussian_blur, mean_fill, road_fill, road_noise

__all__ = [
    "Perturbation",
    "PERTURBATIONS",
    "Readout",
    "READOUTS",
    "Curves",
    "removed_counts",
    "removal_orders",
    "auc",
    "run_kept",
    "curve_score",
    "curves",
    "curves_by_readout",
    "average_curves",
    "faithfulness",
]

Perturbation = Literal["tokens", "pixels", "blur", "road"]
PERTURBATIONS = ("tokens", "pixels", "blur", "road")
Readout = Literal["target", "cls", "mean", "probability", "logit"]
READOUTS = ("target", "cls", "mean", "probability", "logit")
ScoreKind = Literal["cosine", "probability", "logit"]
PERTURBATION_WORDS = {"tokens": "token removal", "pixels": "mean fill", "blur": "blurring", "road": "ROAD imputation"}
_BATCH_BYTES = 256 * 2**20  # attention probabilities of one block for one chunk of perturbed inputs


@dataclass(frozen=True)
class Curves:
    """One map's two curves: the score at each removed fraction, their areas and the faithfulness score."""

    fractions: np.ndarray  # (S,) x_i = i / S
    removed: np.ndarray  # (S,) k_i patches removed
    morf: np.ndarray  # (S,) score with the most relevant k_i patches removed
    lerf: np.ndarray  # (S,) ... the least relevant
    morf_logit: np.ndarray | None  # (S,) the class logit beside the probability (class targets only)
    lerf_logit: np.ndarray | None
    morf_auc: float
    lerf_auc: float
    score_kind: ScoreKind
    perturbation: Perturbation
    target: Target  # resolved
    seconds: float  # the share of the batched passes spent on this map's inputs
    readout: Readout = "target"

    @property
    def score(self) -> float:
        """The symmetric relevance gain, AUC_LeRF − AUC_MoRF."""
        return self.lerf_auc - self.morf_auc

    @property
    def measure(self) -> str:
        """What measured it, for a person: "by token removal, CLS embedding"."""
        what = {"target": "", "cls": ", CLS embedding", "mean": ", mean patch token", "probability": ", probability",
                "logit": ", logit"}[self.readout]
        return f"by {PERTURBATION_WORDS[self.perturbation]}{what}"


def removed_counts(num_patches: int, steps: int = 10) -> np.ndarray:
    """k_i = floor(i·N/S + ½) for i = 0..S-1: (S,) int."""
    if not isinstance(steps, int) or steps < 2:
        raise ParameterError(f"steps must be an integer of at least 2, got {steps!r}")
    if num_patches < 1:
        raise ParameterError("there are no patches to remove")
    return np.array([math.floor(i * num_patches / steps + 0.5) for i in range(steps)], dtype=np.int64)


def removal_orders(heat: np.ndarray, *, protect: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(MoRF, LeRF) orders of the patch indices of a (gh, gw) map, ties by index; ``protect`` is left out of both."""
    flat = np.asarray(heat, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise ParameterError("the map has NaN or infinite values, so its patches cannot be ranked")
    idx = np.arange(flat.size)
    if protect is not None:
        keep = idx != protect
        flat, idx = flat[keep], idx[keep]
    morf = idx[np.argsort(-flat, kind="stable")]
    lerf = idx[np.argsort(flat, kind="stable")]
    return morf, lerf


def auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid area under ``values`` over ``fractions``: Σ (x_{i+1} - x_i)·(y_i + y_{i+1})/2."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ParameterError(f"fractions and values must be matching 1-D arrays, got {x.shape} and {y.shape}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def run_kept(model: torch.nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> ModelOutputs:
    """The model on the prefix tokens and the kept patch tokens only.

    ``tokens`` (1, T, C) from :func:`vitviz.explain.embed_tokens` (position embeddings added); ``keep`` (B, K)
    patch indices (0..N-1) per sequence, in the order they go into the sequence -> outputs of (B, P + K) tokens.
    """
    p = int(model.num_prefix_tokens)
    B = keep.shape[0]
    prefix = tokens[:, :p].expand(B, -1, -1)
    patches = tokens[0, p:][keep]  # (B, K, C)
    return head_outputs(model, run_blocks(model, torch.cat([prefix, patches], dim=1), patches=keep))


def curve_score(model: torch.nn.Module, target: Target, out: ModelOutputs, ref: torch.Tensor,
                position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the curves measure, (B,), and for a class target the (B,) logit beside it (differentiable).

    ``ref``: the full image's embedding (or patch p's feature); ``position`` (B,): where patch p sits in each
    sequence (patch targets).
    """
    if target.kind == "class":
        logits = out.logits.float()
        return logits.softmax(-1)[:, target.index], logits[:, target.index]
    if target.kind == "embedding":
        return F.cosine_similarity(out.embedding.float(), ref[None].float(), dim=-1), None
    if target.kind == "prompt":  # the score is a cosine already: cos(e(x̃), t)
        return target_score(model, target, out, ref).float(), None
    rows = torch.arange(out.tokens.shape[0], device=out.tokens.device)
    feat = out.tokens[rows, position].float()  # (B, C)
    return F.cosine_similarity(feat, ref[None].float(), dim=-1), None


def _patch_mean(model: torch.nn.Module, out: ModelOutputs) -> torch.Tensor:
    return out.tokens[:, int(model.num_prefix_tokens):].float().mean(1)


class _Reader:
    """The curves' score of a batch of outputs under one read-out, with its references from the full image."""

    def __init__(self, model: torch.nn.Module, target: Target, readout: Readout, full: ModelOutputs) -> None:
        self.model, self.target, self.readout = model, target, readout
        if readout in ("probability", "logit") and full.logits is None:
            raise ModelError(f"the {readout} read-out needs a classifier head; this model has none")
        self.cls = target.index if target.kind == "class" else (
            int(full.logits[0].argmax()) if full.logits is not None else None)
        self.ref = {"cls": full.embedding[0], "mean": _patch_mean(model, full)[0]}.get(readout)
        if readout == "target":
            self.ref = target_reference(model, target, full)  # f(x), g_p(x), the prompt's t; None for a class
        self.kind: ScoreKind = ("probability" if target.kind == "class" else "cosine") if readout == "target" else (
            "cosine" if readout in ("cls", "mean") else readout)

    def __call__(self, out: ModelOutputs, position: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) scores and, beside a probability, the (B,) logit."""
        if self.readout == "target":
            return curve_score(self.model, self.target, out, self.ref, position)
        if self.readout == "cls":
            return F.cosine_similarity(out.embedding.float(), self.ref[None].float(), dim=-1), None
        if self.readout == "mean":
            return F.cosine_similarity(_patch_mean(self.model, out), self.ref[None].float(), dim=-1), None
        logits = out.logits.float()
        if self.readout == "logit":
            return logits[:, self.cls], None
        return logits.softmax(-1)[:, self.cls], logits[:, self.cls]


def _chunk(model: torch.nn.Module, num_tokens: int) -> int:
    heads = int(model.blocks[0].attn.num_heads)
    return max(1, min(64, _BATCH_BYTES // (heads * num_tokens * num_tokens * 4)))


def _kept_sets(orders: list[tuple[np.ndarray, np.ndarray]], k: int, protect: int | None) -> np.ndarray:
    """(2M, N - k) sorted kept patch indices: MoRF then LeRF of each map, with ``k`` removed."""
    rows = []
    for morf, lerf in orders:
        for order in (morf, lerf):
            kept = order[k:]
            if protect is not None:
                kept = np.append(kept, protect)
            rows.append(np.sort(kept))
    return np.stack(rows)


def _start(model, x, target, readouts):
    """The full image's outputs, the resolved target and a reader of the curves' score per read-out."""
    full = head_outputs(model, run_blocks(model, embed_tokens(model, x)))
    resolved = resolve_target(model, target, None if full.logits is None else full.logits[0])
    return full, resolved, [_Reader(model, resolved, r, full) for r in readouts]


def _tables(steps: int, columns: int, s0, l0) -> tuple[np.ndarray, np.ndarray | None]:
    """Score (and logit) tables (S, columns), step 0 filled from the full image's pass."""
    scores = np.empty((steps, columns))
    logits = np.empty((steps, columns)) if l0 is not None else None
    scores[0] = float(s0[0])
    if logits is not None:
        logits[0] = float(l0[0])
    return scores, logits


def _token_steps(model, x, orders, counts, target, protect, readers, interrupt=None):
    """Scores (S, 2M) per reader (and logits), each step's 2M sequences run in chunks; step 0 once."""
    dev = x.device
    tokens = embed_tokens(model, x)  # (1, T, C)
    full, resolved, readers = _start(model, x, target, readers)
    p = int(model.num_prefix_tokens)
    tables = [_tables(len(counts), 2 * len(orders), *r(full, torch.tensor([p + (protect or 0)], device=dev)))
              for r in readers]
    for i, k in enumerate(counts[1:], start=1):
        kept = torch.from_numpy(_kept_sets(orders, int(k), protect)).to(dev)  # (2M, K)
        size = _chunk(model, p + kept.shape[1])
        for a in range(0, kept.shape[0], size):
            if interrupt is not None:
                interrupt()
            sub = kept[a : a + size]
            pos = p + (sub == protect).int().argmax(dim=1) if protect is not None else None
            out = run_kept(model, tokens, sub)
            for reader, (scores, logits) in zip(readers, tables, strict=True):
                s, lg = reader(out, pos)
                scores[i, a : a + size] = s.cpu().numpy()
                if logits is not None:
                    logits[i, a : a + size] = lg.cpu().numpy()
    return tables, resolved, readers


def _filler(perturbation: Perturbation, x: torch.Tensor, seed: int, patch: int):
    """fill(removed (b, 1, H, W)) -> the perturbed inputs (b, 3, H, W) of ``x``."""
    if perturbation == "pixels":
        return lambda removed: mean_fill(x, removed)
    if perturbation == "blur":
        blurred = gaussian_blur(x)  # once per image
        return lambda removed: blur_fill(x, removed, blurred)
    noise = road_noise(x, seed=seed)  # one field per image: equal masks, equal inputs
    return lambda removed: road_fill(x, removed, noise=noise, patch=patch)


def _pixel_steps(model, x, orders, counts, target, protect, readers, perturbation="pixels", seed=0, interrupt=None):
    """As :func:`_token_steps`, with removed patches filled in the image (:mod:`.perturb`)."""
    gh, gw = (int(v) for v in model.patch_embed.grid_size)
    ps = int(model.patch_embed.patch_size[0])
    full, resolved, readers = _start(model, x, target, readers)
    p = int(model.num_prefix_tokens)
    jobs = [(i, j, order[:k]) for i, k in enumerate(counts) if i > 0
            for j, order in enumerate(o for pair in orders for o in pair)]
    pos = None if protect is None else torch.tensor([p + protect], device=x.device)
    tables = [_tables(len(counts), 2 * len(orders), *r(full, pos)) for r in readers]
    fill = _filler(perturbation, x, seed, ps)
    size = _chunk(model, p + gh * gw)
    for a in range(0, len(jobs), size):
        if interrupt is not None:
            interrupt()
        chunk = jobs[a : a + size]
        masks = torch.zeros((len(chunk), gh * gw), dtype=torch.bool, device=x.device)
        for r, (_i, _j, removed) in enumerate(chunk):
            masks[r, torch.from_numpy(removed).to(x.device)] = True
        pixel_mask = masks.view(-1, 1, gh, gw).repeat_interleave(ps, 2).repeat_interleave(ps, 3)
        out = head_outputs(model, run_blocks(model, embed_tokens(model, fill(pixel_mask))))
        for reader, (scores, logits) in zip(readers, tables, strict=True):
            s, lg = reader(out, None if pos is None else pos.expand(len(chunk)))
            for r, (i, j, _rm) in enumerate(chunk):
                scores[i, j] = float(s[r])
                if logits is not None:
                    logits[i, j] = float(lg[r])
    return tables, resolved, readers


def _check_curves(model, x, maps, perturbation, readout) -> tuple[int, int]:
    """The model's grid, once the image, the maps and the options are known to fit."""
    check_one_image(model, x)
    if perturbation not in PERTURBATIONS:
        raise ParameterError(f"unknown perturbation {perturbation!r}: choose one of {', '.join(PERTURBATIONS)}")
    if readout not in READOUTS:
        raise ParameterError(f"unknown read-out {readout!r}: choose one of {', '.join(READOUTS)}")
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    if not maps:
        raise ParameterError("no maps to measure")
    for heat in maps:
        if tuple(np.shape(heat)) != grid:
            raise ParameterError(f"a map of shape {tuple(np.shape(heat))} does not fit the {grid[0]}x{grid[1]} grid")
    return grid


def curves_by_readout(
        model: torch.nn.Module,
        x: torch.Tensor,
        maps: Sequence[np.ndarray],
        *,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
        readouts: Sequence[Readout] = ("target",),
        steps: int = 10,
        seed: int = 0,
        interrupt: Callable[[], None] | None = None,
) -> dict[str, list[Curves]]:
    """:func:`curves` under several read-outs at once: every read-out reads the same perturbed passes."""
    for readout in readouts:
        grid = _check_curves(model, x, maps, perturbation, readout)
    target = Target.parse(target)
    protect = target.index if target.kind == "patch" else None
    orders = [removal_orders(h, protect=protect) for h in maps]
    counts = removed_counts(grid[0] * grid[1] - (protect is not None), steps)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if perturbation == "tokens":
            tables, resolved, readers = _token_steps(model, x, orders, counts, target, protect, readouts, interrupt)
        else:
            tables, resolved, readers = _pixel_steps(model, x, orders, counts, target, protect, readouts,
                                                     perturbation, seed, interrupt)
    seconds = (time.perf_counter() - t0) / len(maps)
    return {r.readout: _curves(table, counts, r, perturbation, resolved, seconds, steps)
            for r, table in zip(readers, tables, strict=True)}


def _curves(table, counts, reader, perturbation, resolved, seconds, steps) -> list[Curves]:
    (scores, logits), fractions = table, np.arange(steps) / steps
    out = []
    for m in range(scores.shape[1] // 2):
        mo, le = scores[:, 2 * m], scores[:, 2 * m + 1]
        out.append(Curves(
            fractions=fractions, removed=counts, morf=mo, lerf=le,
            morf_logit=None if logits is None else logits[:, 2 * m],
            lerf_logit=None if logits is None else logits[:, 2 * m + 1],
            morf_auc=auc(fractions, mo), lerf_auc=auc(fractions, le), score_kind=reader.kind,
            perturbation=perturbation, target=resolved, seconds=seconds, readout=reader.readout,
        ))
    return out


def curves(
        model: torch.nn.Module,
        x: torch.Tensor,
        maps: Sequence[np.ndarray],
        *,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
        readout: Readout = "target",
        steps: int = 10,
        seed: int = 0,
        interrupt: Callable[[], None] | None = None,
) -> list[Curves]:
    """MoRF and LeRF curves of several (gh, gw) maps of one image ``x`` (1, 3, H, W), sharing the passes.

    ``target`` as in :mod:`vitviz.explain` (pass an explanation's resolved target to score what it explained);
    ``readout`` what the score reads (module docstring); ``seed`` ROAD's noise; ``interrupt()`` is called before
    every batch of perturbed passes and may raise to stop them (an abandoned job).
    """
    return curves_by_readout(model, x, maps, target=target, perturbation=perturbation, readouts=(readout,),
                             steps=steps, seed=seed, interrupt=interrupt)[readout]


def average_curves(measured: Sequence[Curves]) -> Curves:
    """The mean of several maps' curves under one measure (e.g. a random baseline's seeded draws): the curves, their
    areas and so the score averaged."""
    if not measured:
        raise ParameterError("no curves to average")
    mean = lambda key: np.mean([getattr(c, key) for c in measured], axis=0)  # noqa: E731
    logits = measured[0].morf_logit is not None
    return replace(measured[0], morf=mean("morf"), lerf=mean("lerf"), morf_auc=float(mean("morf_auc")),
                   lerf_auc=float(mean("lerf_auc")), morf_logit=mean("morf_logit") if logits else None,
                   lerf_logit=mean("lerf_logit") if logits else None, seconds=float(sum(c.seconds for c in measured)))


def faithfulness(
        model: torch.nn.Module,
        x: torch.Tensor,
        heat: np.ndarray,
        *,
        target: Target | str = "auto",
        perturbation: Perturbation = "tokens",
        readout: Readout = "target",
        steps: int = 10,
) -> Curves:
    """The curves of one map: see :func:`curves`."""
    return curves(model, x, [heat], target=target, perturbation=perturbation, readout=readout, steps=steps)[0]
