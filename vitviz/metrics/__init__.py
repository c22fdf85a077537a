"""Metrics of finished maps: faithfulness curves (:mod:`.faithfulness`, perturbations in :mod:`.perturb`) and
sensitivity-n (:mod:`.sensitivity`). They import targets, never methods. (``faithfulness`` is the curves' module;
its function of the same name is ``vitviz.metrics.faithfulness.faithfulness``.)"""

from __future__ import annotations

import importlib

_LAZY = {
    "Curves": "faithfulness",
    "Perturbation": "faithfulness",
    "PERTURBATIONS": "faithfulness",
    "Readout": "faithfulness",
    "READOUTS": "faithfulness",
    "curves": "faithfulness",
    "curves_by_readout": "faithfulness",
    "Sensitivity": "sensitivity",
    "sensitivity_n": "sensitivity",
}

__all__ = [*_LAZY]


def __getattr__(name: str):
    # imported on first use: a package import never pulls in its siblings' dependencies (no import cycles)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
