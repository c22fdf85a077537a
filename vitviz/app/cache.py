"""The app's caches: models and analyses as shared resources, small derived maps as data.

Every cached analysis is keyed by one frozen :class:`AnalysisKey` (the model key, the image's sha256 and the fit).
Resources are shared by all sessions and never mutated (models carry no per-session state, analyses are read-only),
so several browser sessions use one model and one analysis per image. Arguments starting with ``_`` are not hashed:
the key stands for them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from vitviz import maps, tokens
from vitviz.analysis import Analysis, analyze_with_fallback
from vitviz.errors import CheckpointError, OutOfMemoryError
from vitviz.image import LoadedImage, load_image, to_tensor
from vitviz.models import CHECKPOINT_SUFFIXES, ModelInfo, ModelKey, ModelSource, build_for, load_source

__all__ = ["AnalysisKey", "digest", "model_source", "uploaded_source", "model", "image", "analysis", "rollout_table",
           "raw_maps", "query_maps", "distances", "TokenStats", "token_stats", "Explained", "ExplainJob", "explanation"]


@dataclass(frozen=True)
class AnalysisKey:
    """One image through one model: what a cached analysis and every map derived from it are keyed by."""

    model: ModelKey
    digest: str  # sha256 of the image file's bytes
    fit: str


def digest(data: bytes) -> str:
    """The cache key of a file's bytes."""
    return hashlib.sha256(data).hexdigest()


@st.cache_resource(max_entries=3, show_spinner="Loading model weights (the first run converts the default model)...")
def model_source(name: str, arch: str | None) -> tuple[ModelSource, dict]:
    """The weights at the model's native sizes and how to build it; shared by all sessions, never mutated."""
    return load_source(name, arch=arch)


@st.cache_resource(max_entries=2, show_spinner="Reading the checkpoint...")
def uploaded_source(digest: str, arch: str | None, filename: str, _data: bytes) -> tuple[ModelSource, dict]:
    """An uploaded checkpoint's weights, keyed by its sha256. The file exists on the server only while it is read
    (a private temp file, deleted at once); the model is named by the user's file name."""
    suffix = Path(filename).suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"checkpoint files must end in {', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        fd, tmp = tempfile.mkstemp(prefix="vitviz-upload-", suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(_data)
    except OSError as exc:
        raise CheckpointError(f"could not store the uploaded checkpoint on the server ({exc.strerror or exc})") from exc
    try:
        source, state = load_source(tmp, arch=arch)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return replace(source, name=filename), state


@st.cache_resource(max_entries=4, show_spinner="Building the model...")
def model(key: ModelKey, _loaded: tuple[ModelSource, dict]):
    """The built model and its ModelInfo, from the weights ``_loaded`` for ``key``: the library's one model path."""
    return build_for(key, *_loaded)


@st.cache_resource(max_entries=4, show_spinner=False)
def image(digest: str, _data: bytes, name: str) -> LoadedImage:
    """The decoded image (read-only), keyed by the bytes' sha256."""
    return load_image(_data, name=name)


@st.cache_resource(max_entries=4, show_spinner="Running the model...")
def analysis(key: AnalysisKey, _image: LoadedImage, _loaded: tuple[ModelSource, dict]) -> tuple[Analysis, str | None]:
    """One forward pass per image and model, and a notice if the GPU ran out of memory and the CPU did it instead
    (cached under the asked-for key, so a control change never retries the GPU)."""

    def load(dev: str) -> tuple[object, ModelInfo]:
        precision = key.model.precision if dev == key.model.device else "auto"
        return model(replace(key.model, device=dev, precision=precision), _loaded)

    # the tokens (L x T x D) come from the same pass: a few MB beside the attention, for the token views
    results, notice = analyze_with_fallback(load, [_image], device=key.model.device, fit=key.fit, tokens=True)
    return results[0], notice


@st.cache_data(max_entries=16, show_spinner=False)
def rollout_table(key: AnalysisKey, head: str | int, discard: float, drop_artefacts: bool,
                  _res: Analysis) -> np.ndarray:
    """(L, L, gh, gw): rollout over every layer range, [a, b] = layers a..b; optionally without the artefacts."""
    drop = token_stats(key, _res).artefacts if drop_artefacts else None
    return maps.rollout_table(_res.attention, info=_res.info, head_fusion=head, discard_ratio=discard,
                              drop_tokens=drop)


@dataclass(frozen=True)
class TokenStats:
    """Per layer: token norms, attention received, their outliers (L, T each), and the artefact tokens (T,)."""

    norms: np.ndarray
    received: np.ndarray
    norm_outliers: np.ndarray
    sink_outliers: np.ndarray
    artefacts: np.ndarray


@st.cache_data(max_entries=8, show_spinner=False)
def token_stats(key: AnalysisKey, _res: Analysis) -> TokenStats:
    p = _res.info.num_prefix_tokens
    norms, received = tokens.token_norms(_res.tokens), tokens.received_attention(_res.attention)
    return TokenStats(norms, received, tokens.find_outliers(norms, num_prefix_tokens=p),
                      tokens.find_outliers(received, num_prefix_tokens=p),
                      tokens.artefact_tokens(norms, received, num_prefix_tokens=p))


@dataclass(frozen=True)
class Explained:
    """One target explained by one method and by the random baseline, with both maps' faithfulness curves."""

    explanation: object  # vitviz.explain.Explanation
    curves: object  # vitviz.faithfulness.Curves of the method's map
    random_curves: object  # ... of the seeded random map, the baseline


class ExplainJob:
    """An explanation being computed on a worker thread: how far it is, then its result or its error.

    The job, not only its result, is the cached resource, so every session that asks for the same explanation
    while it runs waits on the one computation, and each can show its progress (Streamlit elements cannot be
    updated from inside a cached function: they would be replayed on a cache hit).
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.fraction = 0.0
        self.stage = "Explaining..."
        self.result: Explained | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


def _explain_stage(job: ExplainJob, done: int, total: int) -> None:
    job.fraction = 0.8 * done / total  # the curves after it cost about a fifth of a 32-step deletion
    job.stage = f"Greedy deletion: step {done} of {total} (a forward and a backward pass on the patches left)"


def _run_explanation(job: ExplainJob, built, info: ModelInfo, target: str, res: Analysis) -> None:
    from vitviz.explain import Method, explain_all
    from vitviz.faithfulness import curves

    try:
        param = next(built.parameters())
        x = to_tensor(res.pixels, mean=info.mean, std=info.std).to(device=param.device, dtype=param.dtype)
        if Method.parse(job.method).name != "deletion":
            job.stage = "Explaining: one forward and one backward pass..."
        found, rnd = explain_all(built, x, methods=[job.method, "random"], target=target,
                                 progress=lambda i, n: _explain_stage(job, i, n))
        job.fraction = max(job.fraction, 0.8)
        job.stage = "Measuring faithfulness: 10 steps of token removal, against a random map..."
        measured = curves(built, x, [found.map, rnd.map], target=found.target)
        job.result = Explained(found, measured[0], measured[1])
    except torch.OutOfMemoryError as exc:
        job.error = OutOfMemoryError(f"the {param.device.type.upper()} ran out of memory for this explanation: "
                                     "try a smaller image size or another method")
        job.error.__cause__ = exc
    except BaseException as exc:  # noqa: BLE001 - handed to the session that waits for it
        job.error = exc
    finally:
        job.done.set()


@st.cache_resource(max_entries=16, show_spinner=False)
def _explain_job(key: AnalysisKey, method: str, target: str, _res: Analysis, _built) -> ExplainJob:
    job = ExplainJob(method)
    threading.Thread(target=_run_explanation, args=(job, *_built, target, _res), daemon=True,
                     name="vitviz-explain").start()  # it calls no Streamlit function
    return job


def explanation(key: AnalysisKey, method: str, target: str, res: Analysis, loaded, *,
                progress: Callable[[float, str], None] | None = None) -> Explained:
    """Computed once per (image, model, method, target) and shared, like the analysis; ``progress(fraction, text)``
    is called from this (the script's) thread while it runs. A failed explanation is not kept: asking again retries.
    """
    built = model(key.model, loaded)  # (model, info), from the cache in this thread
    job = _explain_job(key, method, target, res, built)
    while not job.done.wait(0.2):
        if progress is not None:
            progress(job.fraction, job.stage)
    if job.error is not None:
        _explain_job.clear(key, method, target, res, built)
        raise job.error
    return job.result


@st.cache_data(max_entries=16, show_spinner=False)
def raw_maps(key: AnalysisKey, head: str | int, _res: Analysis) -> np.ndarray:
    """(L, gh, gw): each layer's own CLS attention."""
    return maps.raw_attention_maps(_res.attention, info=_res.info, head_fusion=head)


@st.cache_data(max_entries=16, show_spinner=False)
def query_maps(key: AnalysisKey, query: int | None, _res: Analysis) -> np.ndarray:
    """(L, H, gh, gw): where one query token (None: CLS) attends, per layer and head."""
    return np.stack([maps.query_attention_maps(_res.attention, info=_res.info, layer=layer, query=query)
                     for layer in range(_res.info.depth)])


@st.cache_data(max_entries=8, show_spinner=False)
def distances(key: AnalysisKey, _res: Analysis) -> np.ndarray:
    """(L, H): mean attention distance per layer and head."""
    return maps.attention_distance(_res.attention, info=_res.info)
