"""Train a tiny ViT from scratch: a timm ``VisionTransformer`` with the patch size, width, depth and heads asked for,
on scikit-learn's handwritten digits or the user's labelled images, saved as a checkpoint every vitviz path loads.

The recipe (measured in benchmarks/results-training.md): AdamW (lr 1e-3, weight decay 0.05), a linear warm-up over
the first epoch then a cosine decay to zero, batches of 32, 20 epochs. A ViT from scratch sits on a plateau (loss
ln C) for its first hundred steps or so; small batches give it more steps per CPU second. A first recipe with label
smoothing 0.1, random shifts (``augment``: up to 2 px, edges replicated), batches of 64 and lr 2e-3 learned far more
slowly on the digits (validation accuracy 0.78 after 15 epochs against 0.93 after 14), so both are off by default.
A fixed stratified train/validation split (:func:`vitviz.experiments.data.split`) and one seed for the
initialisation, the order of the batches and the shifts.

The images are fitted as the analysis fits them (timm's eval crop, the architecture's mean and std), so a trained
model sees in the app exactly what it saw in training. The checkpoint (safetensors) names its architecture in the
metadata keys ``arch`` and ``kwargs`` that :mod:`vitviz.models.checkpoints` reads, its class names under
``class_names`` and its validation accuracy under ``val_accuracy``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from ..device import cpu_threads, pick_device, use_threads
from ..errors import ParameterError
from ..export import write_atomic
from ..models.checkpoints import CLASS_NAMES_KEY
from .data import Labelled, digits, labelled_images, split

__all__ = ["ARCH", "TrainConfig", "Step", "Trained", "train_vit", "training_data", "accuracy", "checkpoint_bytes",
           "save_checkpoint"]

ARCH = "vit_tiny_patch16_224"  # the timm architecture a trained model is, with every size set in its kwargs
MAX_TRAIN_IMG_SIZE = 128  # px: training from scratch on a CPU is for small images
MAX_SHIFT = 2  # px of random shift, the only augmentation


@dataclass(frozen=True)
class TrainConfig:
    """The architecture and the training settings."""

    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    img_size: int = 32
    global_pool: str = "token"  # what the head reads: the CLS token, or "avg" (the mean of the patch tokens)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: bool = False  # random shifts of up to MAX_SHIFT px (slower to learn within a CPU minute on digits)
    seed: int = 0
    val_fraction: float = 0.2
    max_seconds: float | None = None  # stop after this long (the app's bound on one job); None: no bound

    def check(self) -> None:
        """Refuse settings no model can be built or trained with, each in a sentence."""
        rules = [
            (1 <= self.patch_size <= 32, f"patch size {self.patch_size}: choose 1 to 32 px"),
            (8 <= self.img_size <= MAX_TRAIN_IMG_SIZE, f"image size {self.img_size}: choose 8 to "
                                                        f"{MAX_TRAIN_IMG_SIZE} px"),
            (self.img_size % self.patch_size == 0,
             f"image size {self.img_size} is not a whole number of {self.patch_size} px patches"),
            (1 <= self.num_heads <= 16 and 1 <= self.embed_dim <= 512, "embedding dimension 1 to 512, 1 to 16 heads"),
            (self.embed_dim % self.num_heads == 0,
             f"embedding dimension {self.embed_dim} is not a multiple of {self.num_heads} heads"),
            (1 <= self.depth <= 12, f"depth {self.depth}: choose 1 to 12 blocks"),
            (self.global_pool in ("token", "avg"), f"pooling {self.global_pool!r}: choose 'token' or 'avg'"),
            (1 <= self.epochs <= 200 and 1 <= self.batch_size <= 1024, "1 to 200 epochs, batches of 1 to 1024"),
            (0 < self.lr <= 1 and 0 <= self.weight_decay <= 1, "a learning rate in (0, 1], weight decay in [0, 1]"),
            (0 <= self.label_smoothing < 1 and 0 < self.val_fraction < 1,
             "label smoothing in [0, 1), a validation fraction in (0, 1)"),
        ]
        wrong = [text for ok, text in rules if not ok]
        if wrong:
            raise ParameterError(f"cannot train with these settings: {wrong[0]}")

    def kwargs(self, num_classes: int) -> dict[str, Any]:
        """The create_model kwargs of the architecture (what the checkpoint's 'kwargs' metadata records)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, num_classes=num_classes, global_pool=self.global_pool)


@dataclass(frozen=True)
class Step:
    """Where training is: after a step (``val_accuracy`` None) or at the end of an epoch (measured)."""

    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based, over the whole run
    steps: int
    loss: float  # the step's mean training loss
    val_accuracy: float | None
    seconds: float  # since training started

    @property
    def fraction(self) -> float:
        return self.step / self.steps


@dataclass(frozen=True)
class Trained:
    """A trained model (eval mode, no gradients) and what it takes to save and describe it."""

    model: torch.nn.Module
    arch: str
    kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    val_accuracy: float
    history: tuple[Step, ...]
    seconds: float
    stopped: str | None = None  # why training ended early (the stop button, the time bound); None: every epoch ran
    source: str = "digits"
    extra: dict[str, str] = field(default_factory=dict)  # more metadata for the checkpoint

    def checkpoint(self) -> bytes:
        """The safetensors checkpoint (architecture, class names and validation accuracy in its metadata)."""
        return checkpoint_bytes(self.model, arch=self.arch, kwargs=self.kwargs, class_names=self.class_names,
                                val_accuracy=self.val_accuracy, extra={"trained_on": self.source, **self.extra})

    def save(self, path: str | os.PathLike) -> Path:
        return save_checkpoint(path, self.checkpoint())


def checkpoint_bytes(model: torch.nn.Module, *, arch: str, kwargs: dict[str, Any], class_names: tuple[str, ...],
                     val_accuracy: float, extra: dict[str, str] | None = None) -> bytes:
    """A model's weights (float32, CPU) as safetensors, with the metadata vitviz's loader reads."""
    from safetensors.torch import save

    if len(class_names) != int(kwargs.get("num_classes", 0)):
        raise ParameterError(f"{len(class_names)} class names for a head of {kwargs.get('num_classes', 0)} classes")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {"arch": arch, "kwargs": json.dumps(kwargs), CLASS_NAMES_KEY: json.dumps(list(class_names)),
                "val_accuracy": f"{val_accuracy:.4f}", **(extra or {})}
    return save(state, metadata=metadata)


def save_checkpoint(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ParameterError(f"{path.name!r}: a trained model is saved as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data)


def _data_config(config: TrainConfig) -> dict[str, Any]:
    """mean, std, crop_pct, interpolation of the architecture: what the analysis will fit images with."""
    with torch.device("meta"):
        probe = timm.create_model(ARCH, pretrained=False, **config.kwargs(2))
    return timm.data.resolve_model_data_config(probe)


def training_data(source: str | os.PathLike | bytes | Labelled, config: TrainConfig, *,
                  name: str | None = None, limit: int | None = None) -> Labelled:
    """``"digits"`` (scikit-learn's, ``limit``: the first N), a labelled folder or zip (path or bytes), fitted to
    ``config.img_size`` as the trained model's analysis will fit them; a :class:`Labelled` is checked and kept."""
    config.check()
    if isinstance(source, Labelled):
        if source.pixels.shape[1:3] != (config.img_size, config.img_size):
            raise ParameterError(f"the images are {source.pixels.shape[2]}x{source.pixels.shape[1]} px; the model "
                                 f"is trained at {config.img_size} px")
        return source
    cfg = _data_config(config)
    fit = dict(img_size=config.img_size, crop_pct=float(cfg["crop_pct"]), interpolation=str(cfg["interpolation"]))
    if isinstance(source, str) and source == "digits":
        return digits(**fit, limit=limit)
    return labelled_images(source, **fit, name=name)


def _normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, as :func:`vitviz.inputs.fit.to_tensor`."""
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _shifted(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by up to MAX_SHIFT px in x and y (edges replicated)."""
    s = MAX_SHIFT
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * s + 1, (2, x.shape[0]), generator=g).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))])


def _lr_at(step: int, *, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.inference_mode()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 256) -> float:
    """The fraction of ``x`` (normalised, (N, 3, H, W)) that ``model`` classifies as ``y``."""
    if len(y) == 0:
        return float("nan")
    right = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return right / len(y)


def _threads(threads: int | None) -> None:
    """``threads`` torch threads for this process, never more than its cores; None leaves the setting alone."""
    if threads is not None:
        use_threads(min(int(threads), cpu_threads()))


class _Run:
    """One training run's tensors, model, optimiser and clock."""

    def __init__(self, data: Labelled, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        cfg = _data_config(config)
        mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        train_idx, val_idx = split(data.labels, val_fraction=config.val_fraction, seed=config.seed)
        pixels = torch.from_numpy(np.ascontiguousarray(data.pixels)).to(device)
        labels = torch.from_numpy(data.labels).to(device)
        self.norm = lambda p: _normalise(p, mean, std)
        self.train_pixels, self.train_labels = pixels[train_idx], labels[train_idx]
        self.val_x, self.val_y = self.norm(pixels[val_idx]), labels[val_idx]
        torch.manual_seed(config.seed)
        self.g = torch.Generator().manual_seed(config.seed)
        self.model = timm.create_model(ARCH, pretrained=False, **config.kwargs(len(data.class_names))).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.per_epoch = max(1, math.ceil(len(train_idx) / config.batch_size))
        self.steps = self.per_epoch * config.epochs
        self.t0 = time.perf_counter()

    def step(self, index: torch.Tensor, step: int) -> float:
        x = self.norm(self.train_pixels[index.to(self.device)])
        if self.config.augment:
            x = _shifted(x.cpu(), self.g).to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, steps=self.steps, warmup=self.per_epoch, lr=self.config.lr)
        loss = F.cross_entropy(self.model(x), self.train_labels[index.to(self.device)],
                               label_smoothing=self.config.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def over_time(self) -> bool:
        bound = self.config.max_seconds
        return bound is not None and self.seconds() > bound


def train_vit(
        data: Labelled,
        config: TrainConfig = TrainConfig(),
        *,
        progress: Callable[[Step], None] | None = None,
        stop: Callable[[], bool] | None = None,
        device: str = "auto",
        threads: int | None = None,
) -> Trained:
    """Train ``config``'s ViT on ``data`` (fitted at ``config.img_size``, :func:`training_data`) from scratch.

    ``progress(step)`` is called after every step and with the validation accuracy at the end of every epoch;
    ``stop()`` is asked before every step (the app's stop button): True ends training there, as does
    ``config.max_seconds``; the model so far is returned, measured, with the reason in ``stopped``.
    ``device``: "auto" is CUDA when there is one, else the CPU; ``threads``: torch threads (at most the cores).
    """
    config.check()
    data = training_data(data, config)
    _threads(threads)
    run = _Run(data, config, pick_device(device) if device != "auto" else _auto_device())
    history, stopped, step, acc = [], None, 0, float("nan")
    for epoch in range(1, config.epochs + 1):
        run.model.train()
        for index in torch.randperm(len(run.train_labels), generator=run.g).split(config.batch_size):
            stopped = "stopped" if stop is not None and stop() else "time limit" if run.over_time() else None
            if stopped:
                break
            loss = run.step(index, step)
            step += 1
            history.append(Step(epoch, config.epochs, step, run.steps, loss, None, run.seconds()))
            if progress is not None:
                progress(history[-1])
        run.model.eval()
        acc = accuracy(run.model, run.val_x, run.val_y)
        if history:
            history[-1] = Step(epoch, config.epochs, step, run.steps, history[-1].loss, acc, run.seconds())
            if progress is not None:
                progress(history[-1])
        if stopped:
            break
    model = run.model.eval().requires_grad_(False)
    return Trained(model, ARCH, config.kwargs(len(data.class_names)), data.class_names, acc, tuple(history),
                   run.seconds(), stopped, data.name)


def _auto_device() -> torch.device:
    """The CPU by default, CUDA where there is one (MPS is left out: timm training on it is not exercised here)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
