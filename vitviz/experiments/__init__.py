"""Experiments that change the model and show what follows: train a tiny ViT, probe a backbone into a classifier,
take the position embeddings away, knock out heads. A layer above :mod:`vitviz.explain` and :mod:`vitviz.metrics`;
every change goes through the one walk of the blocks (:mod:`vitviz.walk`), never onto the shared model."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "position_experiment": "position",
    "PositionExperiment": "position",
    "head_table": "ablation",
    "ablate": "ablation",
    "HeadTable": "ablation",
    "TrainConfig": "train",
    "Trained": "train",
    "train_vit": "train",
    "training_data": "train",
    "Labelled": "data",
    "digits": "data",
    "labelled_images": "data",
    "Probe": "probe",
    "fit_probe": "probe",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
