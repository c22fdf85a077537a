"""Probe a backbone into a classifier: a linear head on its image embedding (what its head would read: timm's
``forward_head(..., pre_logits=True)``, the CLS token after the final norm for DINOv2), fitted on labelled images.

The embeddings are computed once (batched, no gradients) and kept in memory per (model key, images); the head is
fitted on a fixed stratified split (:func:`vitviz.experiments.data.split`) and measured on the held-out part.

Two fits, both on standardised embeddings and folded back into one ``Linear`` on the raw embedding:

- ``"logistic"`` (the default): multinomial logistic regression with an L2 penalty ``l2 / 2 ||W||^2`` on the mean
  cross-entropy, minimised by L-BFGS (at most ``steps`` iterations, float64; the problem is convex, so it reaches the
  one optimum). Its softmax is a probability, so the predictions' p values mean something.
- ``"ridge"``: closed-form ridge least squares on one-hot targets, ``W = (Xᵀ X + l2 N I)⁻¹ Xᵀ Y`` on centred
  embeddings (bias unpenalised): exact and instant, but its outputs are scores near 0 and 1, not logits, so the
  softmax over them understates how sure the model is.

The result saves as a checkpoint of the backbone (at the size its embeddings were computed) WITH the fitted head
(timm's ``head``, ``num_classes`` = the number of classes) and the class names, loading like a trained model.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ModelError, ParameterError
from ..models.checkpoints import ARCH_KWARGS
from .data import Labelled, split
from .train import checkpoint_bytes

__all__ = ["ProbeMethod", "Probe", "embeddings", "fit_head", "fit_probe", "MAX_CACHED"]

ProbeMethod = Literal["logistic", "ridge"]
MAX_CACHED = 4  # sets of embeddings kept in memory (per model key and images)
_CACHE: OrderedDict[tuple[Hashable, str], torch.Tensor] = OrderedDict()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Probe:
    """A fitted linear head on a backbone's embedding, and its held-out accuracy."""

    weight: torch.Tensor  # (C, D), float32: logits = embedding @ weight.T + bias
    bias: torch.Tensor  # (C,)
    class_names: tuple[str, ...]
    accuracy: float  # on the held-out split
    method: str
    n_train: int
    n_val: int
    seconds: float  # the fit (and the embeddings, when they were not cached)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias

    def checkpoint(self, model: torch.nn.Module, *, arch: str, kwargs: dict[str, Any]) -> bytes:
        """The backbone ``model`` (as built: its patch and image size) with this head, as a safetensors checkpoint.
        ``kwargs``: the backbone's create_model kwargs (its source's); the head and the built sizes replace theirs."""
        pe = model.patch_embed
        head_kwargs = {k: v for k, v in kwargs.items() if k in ARCH_KWARGS}
        head_kwargs.update(num_classes=len(self.class_names), patch_size=int(pe.patch_size[0]),
                           img_size=[int(pe.img_size[0]), int(pe.img_size[1])])
        state = {**model.state_dict(), "head.weight": self.weight, "head.bias": self.bias}
        return checkpoint_bytes(_StateOnly(state), arch=arch, kwargs=head_kwargs, class_names=self.class_names,
                                val_accuracy=self.accuracy, extra={"probe": self.method})


class _StateOnly:
    """What :func:`checkpoint_bytes` reads of a model: its state dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def embeddings(model: torch.nn.Module, data: Labelled, *, mean, std, key: Hashable | None = None,
               batch: int = 32, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(N, D) float32 CPU: what ``model``'s head would read for each image, batched, without gradients. Kept in
    memory under (``key``, the images' digest) when ``key`` is given (the model key: the same weights and sizes)."""
    cache_key = None if key is None else (key, data.digest)
    if cache_key is not None:
        with _LOCK:
            if cache_key in _CACHE:
                _CACHE.move_to_end(cache_key)
                return _CACHE[cache_key]
    param = next(model.parameters())
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(data.labels), batch):
            x = (torch.from_numpy(data.pixels[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0 - m) / s
            x = x.to(device=param.device, dtype=param.dtype)
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
            if progress is not None:
                progress(min(i + batch, len(data.labels)), len(data.labels))
    feats = torch.cat(out)
    if cache_key is not None:
        with _LOCK:
            _CACHE[cache_key] = feats
            while len(_CACHE) > MAX_CACHED:
                _CACHE.popitem(last=False)
    return feats


def _ridge(z: torch.Tensor, y: torch.Tensor, c: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge on one-hot targets, bias unpenalised (centred data): (W (C, D), b (C,))."""
    onehot = torch.nn.functional.one_hot(y, c).double()
    zm, ym = z.mean(0), onehot.mean(0)
    zc, yc = z - zm, onehot - ym
    a = zc.T @ zc + l2 * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(a, zc.T @ yc).T
    return w, ym - w @ zm


def _logistic(z: torch.Tensor, y: torch.Tensor, c: int, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2/2 ||W||^2 (bias unpenalised), by L-BFGS."""
    w = torch.zeros(c, z.shape[1], dtype=z.dtype, requires_grad=True)
    b = torch.zeros(c, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_head(features: torch.Tensor, labels: torch.Tensor | np.ndarray, *, num_classes: int,
             method: ProbeMethod = "logistic", l2: float = 1e-2, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head (W (C, D), b (C,)) on ``features`` (N, D): fitted on standardised features (float64), folded
    back so that ``logits = features @ W.T + b`` on the raw ones."""
    if method not in ("logistic", "ridge"):
        raise ParameterError(f"unknown probe method {method!r}: choose 'logistic' or 'ridge'")
    if not l2 > 0:
        raise ParameterError(f"the L2 penalty must be positive, got {l2}")
    x = features.double()
    y = torch.as_tensor(labels, dtype=torch.int64)
    mu, sigma = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sigma
    w, b = _ridge(z, y, num_classes, l2) if method == "ridge" else _logistic(z, y, num_classes, l2, steps)
    w_raw = w / sigma
    return w_raw.float(), (b - w_raw @ mu).float()


def fit_probe(
        model: torch.nn.Module,
        data: Labelled,
        *,
        mean,
        std,
        key: Hashable | None = None,
        method: ProbeMethod = "logistic",
        l2: float = 1e-2,
        val_fraction: float = 0.2,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
) -> Probe:
    """Fit a linear head on ``model``'s embeddings of ``data`` (fitted at the model's input size; ``mean``/``std``
    its normalisation) on a fixed split, and measure it on the held-out part. ``key`` keeps the embeddings cached."""
    if int(getattr(model, "num_features", 0) or 0) < 1:
        raise ModelError("the model has no embedding to probe")
    t0 = time.perf_counter()
    feats = embeddings(model, data, mean=mean, std=std, key=key, progress=progress)
    train_idx, val_idx = split(data.labels, val_fraction=val_fraction, seed=seed)
    y = torch.from_numpy(data.labels)
    w, b = fit_head(feats[train_idx], y[train_idx], num_classes=len(data.class_names), method=method, l2=l2)
    acc = float((feats[val_idx] @ w.T + b).argmax(-1).eq(y[val_idx]).double().mean()) if len(val_idx) else np.nan
    return Probe(w, b, data.class_names, acc, method, len(train_idx), len(val_idx), time.perf_counter() - t0)
