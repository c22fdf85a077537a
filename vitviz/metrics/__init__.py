"""Metrics of finished maps: faithfulness curves (:mod:`.faithfulness`, perturbations in :mod:`.perturb`) and
sensitivity-n (:mod:`.sensitivity`). They import targets, never methods. (``faithfulness`` is the curves' module;
its function of the same name is ``vitviz.metrics.faithfulness.faithfulness``.)"""

from __future__ import annotations

from .._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
