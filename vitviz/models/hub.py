"""timm's model registry and the Hugging Face Hub: names, suggestions, the local cache, pretrained weights."""

from __future__ import annotations

import difflib
import functools
import socket

import timm
import torch

from ..errors import ModelError, ModelUnavailableError
from ..walk.capture import check_capturable
from ._arch import CHECKPOINT_SUFFIXES, ModelSource, Status

__all__ = ["check_arch", "hub_cached", "is_model_name", "list_pretrained_vits", "list_vit_models"]


# timm modules whose models vitviz walks: ViT, DeiT, DINOv2 and SigLIP towers (vision_transformer, deit), EVA-02,
# DINOv3 and the RoPE ViTs (eva), BEiT (beit); docs/families.md says which views and methods work for each
_VIT_MODULES = ("vision_transformer", "deit", "eva", "beit")


@functools.lru_cache(maxsize=1)
def list_vit_models() -> tuple[str, ...]:
    """timm architecture names of the ViT families vitviz walks (a few, e.g. parallel-block ones or CLS-less ones
    that max-pool their tokens, are refused with their reason when loaded; CLS-less average- or attention-pooled
    ones are read through their pooling, :mod:`vitviz.analysis.readout`)."""
    return tuple(name for module in _VIT_MODULES for name in timm.list_models(module=module))


@functools.lru_cache(maxsize=1)
def list_pretrained_vits() -> tuple[str, ...]:
    """``arch.tag`` names with pretrained weights on the Hub, of the ViT families (no network: timm's registry)."""
    names = timm.list_models(module=list(_VIT_MODULES), pretrained=True)
    return tuple(sorted(names))


def is_model_name(name: str) -> bool:
    base = name.split(".")[0]
    return base in timm.list_models()


def hub_cached(name: str) -> bool:
    """Whether a timm model's pretrained weights are already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
    except (ImportError, RuntimeError, ValueError):
        return False
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    files += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def check_arch(arch: str) -> str:
    """A timm architecture name typed by a user, stripped; a ModelError with suggestions when timm has no such name."""
    arch = arch.strip()
    if not is_model_name(arch):
        raise ModelError(f"{arch!r} is not a timm architecture name.{_suggest(arch)}")
    return arch


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.split(".")[0], list_vit_models(), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _unknown_name(name: str) -> ModelError:
    hint = _suggest(name)
    kinds = ", ".join(CHECKPOINT_SUFFIXES)
    return ModelError(f"{name!r} is neither a timm model name nor a checkpoint file ({kinds}).{hint}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` s (never tried when offline is set).

    Asked only for weights that are not cached: without it, an offline server spins through the Hub client's
    retries for minutes before it fails.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(name: str, detail: str = "") -> ModelUnavailableError:
    return ModelUnavailableError(
        f"the pretrained weights of {name!r} are not on this server and the Hugging Face Hub cannot be reached from "
        f"it{detail}. Use the embedded default model or a checkpoint file, or download the weights once where the Hub "
        "is reachable (they land in the Hugging Face cache)."
    )


def _hub_source(name: str, progress: Status | None) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    if not is_model_name(name):
        raise _unknown_name(name)
    if not hub_cached(name) and not _hub_reachable():
        raise _unavailable(name)
    if progress:
        progress(f"Loading {name} from the Hugging Face Hub (or its local cache)...")
    try:
        model = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError, ImportError) as exc:  # 404, gated, bad cache, lost connection
        raise _unavailable(name, f" ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") \
            from exc
    check_capturable(model)
    return ModelSource(name=name, arch=name, kind="hub"), model.state_dict()
