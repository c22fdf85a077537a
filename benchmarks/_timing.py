"""The benchmarks' one way to time things: a call timed once (:func:`timed`), and variants timed side by side in
interleaved rounds (:func:`interleaved`: every round runs each variant once, the order rotated every round, after
warm-up rounds), summed up by their median and minimum (:func:`median_ms`, :func:`min_ms`).

Interleaving spreads a slow spell of a shared machine over all variants instead of one. The clock is a
parameter: ``time.perf_counter`` (wall time) or ``time.process_time`` (this process's CPU time, all threads: time
spent waiting for a core is not counted). ``sync`` is called right before and after each timed call (on CUDA:
``torch.cuda.synchronize``, so that the clock covers the queued kernels). No torch import here: the callers bring
their own inference mode and device.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["timed", "interleaved", "median_ms", "min_ms"]

T = TypeVar("T")
Clock = Callable[[], float]


def timed(fn: Callable[[], T], *, clock: Clock = time.perf_counter,
          sync: Callable[[], None] | None = None) -> tuple[T, float]:
    """``fn()`` once: what it returned and the seconds it took on ``clock``."""
    if sync is not None:
        sync()
    t0 = clock()
    out = fn()
    if sync is not None:
        sync()
    return out, clock() - t0


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                clock: Clock = time.perf_counter, sync: Callable[[], None] | None = None,
                collect: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each fn over ``repeats`` rounds after ``warmup`` untimed ones, round-robin: round r runs
    the fns from the (r mod n)-th on, then the rest. ``collect``: ``gc.collect()`` before every call, so one
    variant's garbage is not collected in another's time."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if collect:
                gc.collect()
            seconds = timed(fns[name], clock=clock, sync=sync)[1]  # the result is freed here, before the next call
            if r >= warmup:
                times[name].append(seconds)
    return times


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def min_ms(seconds: Sequence[float]) -> float:
    return min(seconds) * 1e3
