"""Models and checkpoints: sources (the embedded default, the Hub, files, transformers folders, open_clip models),
safe checkpoint reading, building at the sizes asked for, description, class names."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "DEFAULT_MODEL": "_arch",
    "CHECKPOINT_SUFFIXES": "_arch",
    "ModelSource": "_arch",
    "MAX_IMG_SIZE": "build",
    "ModelInfo": "build",
    "describe_model": "build",
    "patch_size_range": "build",
    "resolve_sizes": "build",
    "load_source": "build",
    "build_model": "build",
    "ModelKey": "build",
    "build_for": "build",
    "get_model": "build",
    "native_patch_size": "build",
    "ARCH_KWARGS": "checkpoints",
    "MAX_CHECKPOINT_BYTES": "checkpoints",
    "MAX_CHECKPOINT_EXPANSION": "checkpoints",
    "MAX_DEPTH": "checkpoints",
    "MAX_STATE_PER_MODEL": "checkpoints",
    "read_checkpoint": "checkpoints",
    "check_dense": "checkpoints",
    "upload_param_cap": "checkpoints",
    "ClipModel": "clip",
    "load_clip": "clip",
    "clip_model": "clip",
    "zero_shot": "clip",
    "HF_PREFIX": "hf",
    "HFSource": "hf",
    "hf_source": "hf",
    "is_hf_folder": "hf",
    "check_arch": "hub",
    "hub_cached": "hub",
    "is_model_name": "hub",
    "list_pretrained_vits": "hub",
    "list_vit_models": "hub",
    "Prediction": "labels",
    "class_names": "labels",
    "has_head": "labels",
    "top_predictions": "labels",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
