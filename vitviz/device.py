"""Device and precision choice: CUDA, else MPS, else CPU; half precision only where it is safe."""

from __future__ import annotations

import os
from typing import Literal

import torch

from .errors import ParameterError

__all__ = ["DeviceName", "PrecisionName", "available_devices", "pick_device", "pick_dtype", "cpu_threads",
           "use_threads"]

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["auto", "fp32", "fp16", "bf16"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this machine can run on, best first (always ends with ``cpu``)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    return found + ["cpu"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, else MPS, else CPU; an explicit name must be available here."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    base = name.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise ParameterError(f"unknown device {name!r}: choose one of auto, cpu, cuda, mps")
    if base not in available_devices():
        raise ParameterError(
            f"device {name!r} is not available on this machine (available: {', '.join(available_devices())})"
        )
    return torch.device(name)


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported else fp16; fp16 on MPS. Explicit names are honoured on GPUs.

    Half precision is refused on CPU: it is slower there and gains nothing for a single image.
    """
    precision = (precision or "auto").lower()
    if precision not in ("auto", *_DTYPES):
        raise ParameterError(f"unknown precision {precision!r}: choose one of auto, fp32, fp16, bf16")
    if device.type == "cpu":
        if precision not in ("auto", "fp32"):
            raise ParameterError(f"precision {precision} is not supported on the CPU: use fp32 (or auto)")
        return torch.float32
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def cpu_threads(concurrent: int = 1, *, cores: int | None = None) -> int:
    """Torch threads for each of ``concurrent`` jobs sharing this machine's cores: cores ÷ jobs, at least 1.

    Each Python thread (or process) that runs torch ops starts its own team of this many threads, so concurrent
    work asking for more than the cores oversubscribes them (a busy 2-core box ran several times slower).
    """
    if cores is None:  # the cores this process may run on (a container's or taskset's share), else all
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cores) // max(1, int(concurrent)))


def use_threads(n: int) -> None:
    """Set torch's intra-op threads for this process (a whole-process setting: the CLI's and the app's own)."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ParameterError(f"threads must be a whole number of at least 1, got {n!r}")
    torch.set_num_threads(int(n))
