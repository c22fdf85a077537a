"""The app's caches: models and analyses as shared resources, small derived maps as data.

Every cached analysis is keyed by one frozen :class:`AnalysisKey` (the model key, the image's sha256 and the fit).
Resources are shared by all sessions and never mutated (models carry no per-session state, analyses are read-only),
so several browser sessions use one model and one analysis per image. Arguments starting with ``_`` are not hashed:
the key stands for them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from vitviz.analysis import maps, tokens
from vitviz.analysis.onepass import Analysis, analyze_with_fallback
from vitviz.errors import CheckpointError, ParameterError, VitvizError
from vitviz.inputs.image import LoadedImage, load_image
from vitviz.models import CHECKPOINT_SUFFIXES, ModelInfo, ModelKey, ModelSource, build_for, load_source
from vitviz.models.checkpoints import upload_param_cap

from .bytecache import ByteLRU

__all__ = ["AnalysisKey", "Weights", "digest", "model_source", "upload_file_name", "uploaded_source", "model", "image",
           "image_cache_bytes", "image_bytes", "DEFAULT_IMAGE_CACHE_MB", "analysis", "rollout_table", "raw_maps",
           "query_maps", "distances", "TokenStats", "token_stats"]


Weights = tuple[ModelSource, dict[str, torch.Tensor]]  # a model's source (how to build it) and its state dict


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
def model_source(name: str, arch: str | None) -> Weights:
    """The weights at the model's native sizes and how to build it; shared by all sessions, never mutated."""
    return load_source(name, arch=arch)


def upload_file_name(filename: str, suffix: str) -> str:
    """The name an uploaded checkpoint is stored under while it is read, so every message names the user's file:
    the last component of the user's name, without control characters, within a file name's length."""
    base = "".join(ch for ch in re.split(r"[\\/]", filename)[-1] if unicodedata.category(ch)[0] != "C").strip()
    if base in ("", ".", "..") or Path(base).suffix.lower() != suffix:
        base = "checkpoint" + suffix
    stem = base[: len(base) - len(suffix)]
    return stem.encode()[: 200 - len(suffix)].decode(errors="ignore") + base[len(stem):]


def _read_upload(name: str, data: bytes, arch: str | None) -> Weights:
    """``load_source`` on ``data`` written as ``name`` into a private temp folder (0700), removed at once."""
    def unstored(exc: OSError) -> CheckpointError:
        return CheckpointError(f"could not store the uploaded checkpoint {name!r} on the server "
                               f"({exc.strerror or exc})")

    try:
        tmp = tempfile.TemporaryDirectory(prefix="vitviz-upload-", ignore_cleanup_errors=True)
    except OSError as exc:
        raise unstored(exc) from exc
    with tmp as folder:
        path = Path(folder) / name
        try:
            path.write_bytes(data)
        except OSError as exc:
            raise unstored(exc) from exc
        try:
            return load_source(path, arch=arch, max_params=upload_param_cap())
        except VitvizError as exc:  # the loader names the file by its last component; never show the folder
            if folder not in str(exc):
                raise
            raise CheckpointError(str(exc).replace(str(path), name).replace(folder, "")) from exc


@st.cache_resource(max_entries=2, show_spinner="Reading the checkpoint...")
def uploaded_source(digest: str, arch: str | None, filename: str, _data: bytes) -> Weights:
    """An uploaded checkpoint's weights, keyed by its sha256. The file exists on the server only while it is read
    (under the user's file name in a private temp folder, deleted at once), so messages name the user's file; the
    model is named by the user's file name."""
    suffix = Path(filename).suffix.lower()
    name = upload_file_name(filename, suffix)
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{name!r}: checkpoint files must end in {', '.join(CHECKPOINT_SUFFIXES)}")
    source, state = _read_upload(name, _data, arch)
    return replace(source, name=filename), state


@st.cache_resource(max_entries=4, show_spinner="Building the model...")
def model(key: ModelKey, _weights: Weights):
    """The built model and its ModelInfo, from ``_weights`` for ``key``: the library's one model path."""
    return build_for(key, *_weights)


DEFAULT_IMAGE_CACHE_MB = 512  # two of the largest images the app takes (64 megapixels: 256 MB each)


def image_cache_bytes() -> int:
    """The decoded-image cache's budget: ``VITVIZ_IMAGE_CACHE_MB`` (MB of 2^20 bytes), read on every insertion."""
    raw = os.environ.get("VITVIZ_IMAGE_CACHE_MB", "").strip() or str(DEFAULT_IMAGE_CACHE_MB)
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0 or mb == float("inf"):
        raise ParameterError(f"VITVIZ_IMAGE_CACHE_MB must be a number of MB (0 or more), got {raw!r}")
    return int(mb * 2**20)


def image_bytes(decoded: LoadedImage) -> int:
    """The pixel memory of a decoded image: PIL keeps multi-band images in 4-byte pixels."""
    im = decoded.image
    per_pixel = 4 if len(im.getbands()) > 1 or im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else 1
    return im.width * im.height * per_pixel


_IMAGES: ByteLRU[LoadedImage] = ByteLRU(image_cache_bytes, image_bytes)


def image(digest: str, data: bytes, name: str) -> LoadedImage:
    """The decoded image (read-only), keyed by the bytes' sha256 and the name. Shared by every session, bounded by
    bytes (``VITVIZ_IMAGE_CACHE_MB``; least recently used first out): one 64-megapixel photo outweighs hundreds of
    small ones, so a count of entries bounds nothing."""
    return _IMAGES.get((digest, name), lambda: load_image(data, name=name))


image.clear = _IMAGES.clear  # type: ignore[attr-defined]  # as on the st.cache_* functions


@st.cache_resource(max_entries=4, show_spinner="Running the model...")
def analysis(key: AnalysisKey, _image: LoadedImage, _weights: Weights) -> tuple[Analysis, str | None]:
    """One forward pass per image and model, and a notice if the GPU ran out of memory and the CPU did it instead
    (cached under the asked-for key, so a control change never retries the GPU)."""

    def load(dev: str) -> tuple[object, ModelInfo]:
        precision = key.model.precision if dev == key.model.device else "auto"
        return model(replace(key.model, device=dev, precision=precision), _weights)

    # the tokens (L x T x D) come from the same pass: a few MB beside the attention, for the token views
    results, notice = analyze_with_fallback(load, [_image], device=key.model.device, fit=key.fit, tokens=True)
    return results[0], notice


@st.cache_data(max_entries=16, show_spinner=False)
def rollout_table(key: AnalysisKey, head: str | int, discard: float, drop_artefacts: bool,
                  _res: Analysis) -> np.ndarray:
    """(L, L, gh, gw): rollout over every layer range, [a, b] = layers a..b; optionally without the artefacts."""
    drop = token_stats(key, _res).artefacts if drop_artefacts else None
    return maps.rollout_table(_res.attention, info=_res.info, head_fusion=head, discard_ratio=discard,
                              drop_tokens=drop, readout=_res.readout)


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


@st.cache_data(max_entries=16, show_spinner=False)
def raw_maps(key: AnalysisKey, head: str | int, _res: Analysis) -> np.ndarray:
    """(L, gh, gw): each layer's own attention of the readout (the CLS token, or the rows the head pools)."""
    return maps.raw_attention_maps(_res.attention, info=_res.info, head_fusion=head, readout=_res.readout)


@st.cache_data(max_entries=16, show_spinner=False)
def query_maps(key: AnalysisKey, query: int | None, _res: Analysis) -> np.ndarray:
    """(L, H, gh, gw): where one query token (None: the readout, the CLS token or the pooled rows) attends."""
    return np.stack([maps.query_attention_maps(_res.attention, info=_res.info, layer=layer, query=query,
                                               readout=_res.readout)
                     for layer in range(_res.info.depth)])


@st.cache_data(max_entries=8, show_spinner=False)
def distances(key: AnalysisKey, _res: Analysis) -> np.ndarray:
    """(L, H): mean attention distance per layer and head."""
    return maps.attention_distance(_res.attention, info=_res.info)
