"""Explanations as shared jobs: computed once on a worker thread, waited on (with progress) by every session asking.

An explanation can take seconds on a CPU (greedy deletion runs 32 forward + backward steps). Streamlit elements
cannot be updated from inside a cached function (they would be replayed on a cache hit), so the cached resource is
the *job*, not only its result: the first session to ask starts it on a worker thread, every session asking for the
same (image, model, method, target) waits on that one job and draws its own progress bar from it.

A second job (:func:`measurement`) then measures the finished map a second way, by blurring the removed patches: a
measure no method here is built on (greedy deletion optimises token removal itself). The page does not wait on it:
the map and its score by token removal are drawn first, and the page polls this job until its score is ready.

Bounds: at most ``MAX_RUNNING`` jobs compute at once (the others wait for a slot); a job nobody has polled for
``ABANDON_S`` seconds (its sessions moved to another method or image) stops before the next block it would walk;
a job running longer than ``max_job_seconds()`` stops there too, with a message. A failed or stopped job is not
kept: the first waiter to see the failure clears it, so asking again retries.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st
import torch

from vitviz.analysis.onepass import Analysis
from vitviz.errors import OutOfMemoryError, ResourceError
from vitviz.inputs.image import to_tensor
from vitviz.models import ModelInfo

from . import cache

__all__ = ["Explained", "Measured", "ExplainJob", "explanation", "measurement", "max_job_seconds", "MAX_RUNNING",
           "ABANDON_S"]

MAX_RUNNING = 2  # explanation jobs computing at once, over all sessions (memory and cores are shared)
ABANDON_S = 10.0  # a job nobody has polled for this long stops before its next block
DEFAULT_MAX_JOB_S = 300.0  # one explanation's time at most, from its start (waiting for a slot not counted)
_SLOTS = threading.BoundedSemaphore(MAX_RUNNING)
_POLL_S = 0.2
_EXIT_WAIT_S = 30.0  # at exit, how long the running jobs are given to reach their next check
_EXITING = threading.Event()  # set at interpreter exit: every job stops at its next check


@dataclass(frozen=True)
class Explained:
    """One target explained by one method and by the random baseline, with both maps' faithfulness curves."""

    explanation: object  # vitviz.explain.Explanation
    curves: object  # vitviz.faithfulness.Curves of the method's map
    random_curves: object  # the mean curves of RANDOM_DRAWS seeded random maps, the baseline
    random_maps: tuple = ()  # those random maps (gh, gw), measured again by :func:`measurement`


@dataclass(frozen=True)
class Measured:
    """An explained map measured by blurring the removed patches (σ = ``perturb.BLUR_SIGMA_PX``), read by the same
    target, beside the same random maps measured the same way."""

    curves: object  # vitviz.faithfulness.Curves of the method's map, perturbation "blur"
    random_curves: object  # the mean of the random maps' curves by blurring


class Abandoned(Exception):
    """Raised inside a job whose sessions stopped waiting for it."""


class ExplainJob:
    """An explanation (or its measure by blurring) being computed: how far it is (``fraction``, ``stage``), then its
    result or its error."""

    def __init__(self, method: str, *, waiting: str = "Waiting for another explanation to finish...",
                 too_long: str = "try a faster method, a smaller image size or a smaller model") -> None:
        self.method = method
        self.too_long = too_long  # what to do about the time limit, in the sentence that says it was reached
        self.fraction = 0.0
        self.stage = waiting  # until it gets a slot
        self.result: Explained | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.polled = time.monotonic()  # the last time a session waited on it
        self.started: float | None = None  # when it got a slot and began to compute
        self.limit = max_job_seconds()
        self._lock = threading.Lock()
        self._cleared = False
        self.askers: set[str] = set()  # the sessions that asked for it and have not left it (measures only)
        self.cancelled = False  # every asker left it, or it left the cache: it stops at its next check

    def check(self) -> None:
        """Stop here (raise :class:`Abandoned`) if no session has waited on the job for ``ABANDON_S`` or it was
        cancelled, or with a :class:`ResourceError` once it has computed for longer than ``max_job_seconds()``."""
        now = time.monotonic()
        if _EXITING.is_set():
            raise Abandoned("the server is stopping")
        if self.cancelled:
            raise Abandoned("the measure was left unfinished: its askers moved on")
        if now - self.polled > ABANDON_S:
            raise Abandoned("the explanation was left unfinished: nobody was waiting for it")
        if self.started is not None and now - self.started > self.limit:
            raise ResourceError(f"this job was stopped after {self.limit:.0f} s, the longest one job may run on this "
                                f"server: {self.too_long}")

    def poll(self) -> bool:
        """Count as a wait (a job goes on while someone asks for it); True once it has finished."""
        self.polled = time.monotonic()
        return self.done.is_set()

    def ask(self, asker: str) -> bool:
        """``asker`` (a session's token) waits for it: :meth:`poll`, and remember the asker until it leaves."""
        with self._lock:
            self.askers.add(asker)
        return self.poll()

    def leave(self, asker: str) -> None:
        """``asker`` no longer wants it (its page moved to another method, target or image): once every asker has
        left an unfinished job, it stops at its next check and frees its slot (not ``ABANDON_S`` later)."""
        with self._lock:
            self.askers.discard(asker)
            if not self.askers and not self.done.is_set():
                self.cancelled = True

    def first_to_clear(self) -> bool:
        """True once: for the first waiter to see a failure, who removes the job from the cache."""
        with self._lock:
            first, self._cleared = not self._cleared, True
            return first


@atexit.register
def _stop_jobs() -> None:
    """At exit, stop the running jobs at their next check and wait for them: a worker thread still inside a torch
    operation when the interpreter finalizes aborts the process ("terminate called without an active exception")."""
    _EXITING.set()
    deadline = time.monotonic() + _EXIT_WAIT_S
    for thread in threading.enumerate():
        if thread.name in ("vitviz-explain", "vitviz-measure"):
            thread.join(max(0.0, deadline - time.monotonic()))


@functools.cache
def share_cores() -> int:
    """Torch threads for the app's process, set once: ``VITVIZ_THREADS``, else the cores shared among the jobs that
    may compute at once and the page's own work (each Python thread running torch starts a team of this many
    threads: with the default, the server never asks for more threads than cores)."""
    from vitviz.device import cpu_threads, use_threads

    text = os.environ.get("VITVIZ_THREADS", "").strip()
    try:
        n = int(text) if text else cpu_threads(MAX_RUNNING + 1)
    except ValueError:
        n = cpu_threads(MAX_RUNNING + 1)  # a typo in an operator's setting must not stop the page
    use_threads(max(1, n))
    return max(1, n)


def max_job_seconds() -> float:
    """``VITVIZ_MAX_JOB_SECONDS`` (the operator's bound on one explanation), else ``DEFAULT_MAX_JOB_S``."""
    try:
        return float(os.environ.get("VITVIZ_MAX_JOB_SECONDS", DEFAULT_MAX_JOB_S))
    except ValueError:
        return DEFAULT_MAX_JOB_S


def _step(job: ExplainJob, done: int, total: int) -> None:
    job.check()
    job.fraction = 0.8 * done / total  # the curves after it cost about a fifth of a 32-step deletion
    job.stage = f"Greedy deletion: step {done} of {total} (a forward and a backward pass on the patches left)"


def _input(built, info: ModelInfo, res: Analysis) -> torch.Tensor:
    """The analysed image as the model reads it (1, 3, H, W), on its device and in its dtype."""
    param = next(built.parameters())
    return to_tensor(res.pixels, mean=info.mean, std=info.std).to(device=param.device, dtype=param.dtype)


def _compute(job: ExplainJob, built, info: ModelInfo, target: str, res: Analysis) -> Explained:
    from vitviz.evaluate import RANDOM_DRAWS
    from vitviz.explain import Method, explain_all
    from vitviz.metrics.faithfulness import average_curves, curves

    x = _input(built, info, res)
    job.stage = ("Greedy deletion: starting..." if Method.parse(job.method).name == "deletion"
                 else "Explaining: one forward and one backward pass...")
    found, *draws = explain_all(built, x, methods=[job.method, *(f"random:seed={k}" for k in range(RANDOM_DRAWS))],
                                target=target, progress=lambda i, n: _step(job, i, n), interrupt=job.check)
    job.fraction = max(job.fraction, 0.8)
    job.stage = f"Measuring faithfulness by token removal: 10 steps, against {RANDOM_DRAWS} random maps..."
    measured = curves(built, x, [found.map, *(d.map for d in draws)], target=found.target, interrupt=job.check)
    return Explained(found, measured[0], average_curves(measured[1:]), tuple(d.map for d in draws))


def _measure(job: ExplainJob, built, x: torch.Tensor, done: Explained) -> Measured:
    """The map and the random maps by blurring, one map at a time (each is 2 x 9 passes over the whole image; the
    shared unperturbed pass is repeated, one pass in 19); the job may stop before any batch of passes."""
    from vitviz.metrics.faithfulness import average_curves, curves
    from vitviz.metrics.perturb import BLUR_SIGMA_PX

    maps = [done.explanation.map, *done.random_maps]
    measured = []
    for i, heat in enumerate(maps):
        job.check()
        job.fraction = i / len(maps)
        job.stage = (f"Measuring faithfulness by blurring (σ {BLUR_SIGMA_PX:g} px): "
                     + ("the map..." if i == 0 else f"random map {i} of {len(maps) - 1}..."))
        measured += curves(built, x, [heat], target=done.explanation.target, perturbation="blur",
                           interrupt=job.check)
    return Measured(measured[0], average_curves(measured[1:]))


def _run(job: ExplainJob, compute: Callable[[], object]) -> None:
    try:
        while not _SLOTS.acquire(timeout=_POLL_S):
            job.check()
        try:
            job.started = time.monotonic()
            job.result = compute()
        finally:
            _SLOTS.release()
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        job.error = OutOfMemoryError("the GPU ran out of memory for this explanation: try a smaller image size or "
                                     "another method")
        traceback.clear_frames(exc.__traceback__)  # the frames hold the walk's tensors
    except BaseException as exc:  # noqa: BLE001 - handed to the sessions waiting for it
        job.error = exc
        traceback.clear_frames(exc.__traceback__)
    finally:
        job.done.set()


@st.cache_resource(max_entries=16, show_spinner=False)
def _job(key: cache.AnalysisKey, method: str, target: str, _res: Analysis, _built) -> ExplainJob:
    job = ExplainJob(method)
    threading.Thread(target=_run, args=(job, functools.partial(_compute, job, *_built, target, _res)), daemon=True,
                     name="vitviz-explain").start()  # it calls no Streamlit function
    return job


def _cancel(job: ExplainJob) -> None:
    """A job that left the cache can be found by nobody: stop it at its next check (a finished one is unchanged)."""
    if not job.done.is_set():
        job.cancelled = True


@st.cache_resource(max_entries=16, show_spinner=False, on_release=_cancel)
def _measure_job(key: cache.AnalysisKey, method: str, target: str, _res: Analysis, _built, _done: Explained
                 ) -> ExplainJob:
    from vitviz.metrics.perturb import BLUR_SIGMA_PX

    job = ExplainJob(method, waiting=f"Faithfulness by blurring (σ {BLUR_SIGMA_PX:g} px): waiting for another job "
                                     "to finish...",
                     too_long="its cost does not depend on the method; a smaller image size or a smaller model "
                              "measures faster")
    x = _input(*_built, _res)  # the input, not the analysis: a job left running keeps no analysis alive
    threading.Thread(target=_run, args=(job, functools.partial(_measure, job, _built[0], x, _done)), daemon=True,
                     name="vitviz-measure").start()
    return job


def explanation(key: cache.AnalysisKey, method: str, target: str, res: Analysis, weights: cache.Weights, *,
                progress: Callable[[float, str], None] | None = None) -> Explained:
    """Computed once per (image, model, method, target) and shared, like the analysis; ``progress(fraction, text)``
    is called from this (the script's) thread while it runs. A failed explanation is not kept: asking again retries.
    """
    share_cores()  # once per process, before the first job computes
    built = cache.model(key.model, weights)  # (model, info), from the cache in this thread
    while True:
        job = _job(key, method, target, res, built)
        while not job.done.wait(_POLL_S):
            job.polled = time.monotonic()
            if progress is not None:
                progress(job.fraction, job.stage)
        if job.error is None:
            return job.result
        if job.first_to_clear():
            _job.clear(key, method, target, res, built)
        if not isinstance(job.error, Abandoned):  # a job stopped for want of askers: ask it again
            raise job.error


def measurement(key: cache.AnalysisKey, method: str, target: str, res: Analysis, weights: cache.Weights,
                done: Explained, *, asker: str) -> ExplainJob:
    """The job measuring ``done`` (the explanation of these arguments) by blurring, started by the first asker and
    shared; never waited on here: the page draws the map first and polls this job (this call and each
    :meth:`ExplainJob.poll` count as a wait; ``asker`` is the session's token, for :meth:`ExplainJob.leave`). A job
    stopped or cancelled for want of askers is started afresh; a failed one is returned (``error`` set) and removed
    from the cache by the first asker to see it, so the next ask retries."""
    share_cores()
    built = cache.model(key.model, weights)
    while True:
        job = _measure_job(key, method, target, res, built, done)
        finished = job.ask(asker)
        stopped = isinstance(job.error, Abandoned) or (job.cancelled and not finished)
        if finished and job.error is None:
            return job
        if (stopped or finished) and job.first_to_clear():
            _measure_job.clear(key, method, target, res, built, done)
        if not stopped:
            return job
