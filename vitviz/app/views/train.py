"""Train & probe: train a tiny ViT from scratch (digits, or a zip of labelled images) or probe the current backbone
into a classifier, then download the checkpoint or analyse with it ("Use this model").

Training runs on a worker thread of this session (the model is its own, never the shared one); the page polls it,
drawing the progress bar and the loss and validation-accuracy curves, and the Stop button asks it to stop before its
next step. Bounds: one training at a time on the server (others wait for it), at most ``MAX_EPOCHS`` epochs, and at
most ``max_job_seconds()`` (VITVIZ_MAX_JOB_SECONDS) of training, after which the model so far is kept.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import plotly.graph_objects as go
import streamlit as st

from vitviz.errors import VitvizError
from vitviz.experiments.data import Labelled, labelled_images
from vitviz.experiments.train import Step, TrainConfig, Trained, train_vit, training_data

from .. import cache, jobs
from ..sidebar import TRAINED, TRAINED_KEY
from ..state import keep
from ..widgets import guarded, md_escape

TITLE = "Train & probe"
MAX_EPOCHS = 50
_TRAINING = threading.BoundedSemaphore(1)  # trainings at once over all sessions (they share the cores)
_POLL_S = 0.3
INITIAL = dict(train_data="digits", train_patch=4, train_dim=64, train_depth=4, train_heads=4, train_img=32,
               train_epochs=20)


class TrainJob:
    """A training on a worker thread: its steps so far, then its result or its error."""

    def __init__(self, data: Labelled, config: TrainConfig) -> None:
        self.steps: list[Step] = []
        self.result: Trained | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.waiting = True  # for another session's training to finish
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(data, config), daemon=True, name="vitviz-train").start()

    def _run(self, data: Labelled, config: TrainConfig) -> None:
        try:
            while not _TRAINING.acquire(timeout=_POLL_S):
                if self.stop.is_set():
                    return
            try:
                self.waiting = False
                self.result = train_vit(data, config, progress=self.steps.append, stop=self.stop.is_set)
            finally:
                _TRAINING.release()
        except BaseException as exc:  # noqa: BLE001 - shown to the session that started it
            self.error = exc
        finally:
            self.done.set()


@st.cache_resource(max_entries=2, show_spinner="Reading the digits...")
def _digits(img_size: int) -> Labelled:
    return training_data("digits", replace(TrainConfig(), img_size=img_size))


@st.cache_resource(max_entries=2, show_spinner="Reading the labelled images...")
def _zip(digest: str, img_size: int, name: str, _data: bytes) -> Labelled:
    """A zip's images fitted for training at ``img_size`` (as the trained model's analysis will fit them)."""
    return training_data(_data, replace(TrainConfig(), img_size=img_size), name=name)


@st.cache_resource(max_entries=2, show_spinner="Reading the labelled images...")
def _probe_zip(digest: str, img_size: int, crop_pct: float, interpolation: str, name: str, _data: bytes) -> Labelled:
    """A zip's images fitted to the current model's input, as its analysis fits them."""
    return labelled_images(_data, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, name=name)


def _config_ui() -> TrainConfig:
    """The architecture and the epochs, every widget keyed, its state set once."""
    for key, value in INITIAL.items():
        st.session_state.setdefault(key, value)
    c = st.columns(6)
    patch = c[0].selectbox("Patch size", (2, 4, 8, 16), key="train_patch")
    sizes = [s for s in (16, 24, 32, 48, 64) if s % patch == 0 and s > patch]
    keep("train_img", lambda v: v in sizes, 32 if 32 in sizes else sizes[0])
    img = c[1].selectbox("Image size", sizes, key="train_img", help="The digits (8x8) are resized to it.")
    dim = c[2].selectbox("Embedding dim", (16, 32, 64, 128), key="train_dim")
    depth = c[3].slider("Depth", 1, 8, key="train_depth")
    keep("train_heads", lambda v: dim % v == 0, 4 if dim % 4 == 0 else 1)
    heads = c[4].selectbox("Heads", [h for h in (1, 2, 4, 8) if dim % h == 0], key="train_heads")
    epochs = c[5].slider("Epochs", 1, MAX_EPOCHS, key="train_epochs")
    return TrainConfig(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, img_size=img, epochs=epochs,
                       max_seconds=jobs.max_job_seconds())


def _data_ui(config: TrainConfig) -> Labelled | None:
    choice = st.radio("Data", ("digits", "zip"), key="train_data", horizontal=True,
                      format_func={"digits": "handwritten digits (scikit-learn, 1,797 images)",
                                   "zip": "my labelled images (a .zip, one folder per class)"}.get)
    try:
        if choice == "digits":
            return _digits(config.img_size)
        upload = st.file_uploader("Labelled images (.zip)", type=["zip"], key="train_zip",
                                  help="One sub-folder per class, its name the class name; up to 2,000 images.")
        if upload is None:
            return None
        data = upload.getvalue()
        return _zip(cache.digest(data), config.img_size, upload.name, data)
    except VitvizError as exc:  # no scikit-learn (a note: the base install) or a bad zip (an error); the probe works
        (st.info if choice == "digits" else st.error)(md_escape(str(exc)))
        return None


def _curves(steps: list[Step]) -> go.Figure:
    """The training loss per step and the validation accuracy per epoch, on two y axes."""
    measured = [s for s in steps if s.val_accuracy is not None]
    fig = go.Figure([go.Scatter(x=[s.step for s in steps], y=[s.loss for s in steps], name="training loss",
                                line=dict(color="#636efa")),
                     go.Scatter(x=[s.step for s in measured], y=[s.val_accuracy for s in measured], yaxis="y2",
                                name="validation accuracy", mode="lines+markers", line=dict(color="#ef553b"))])
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=10, b=10), xaxis=dict(title=dict(text="step")),
                      yaxis=dict(title=dict(text="loss"), rangemode="tozero"),
                      yaxis2=dict(title=dict(text="accuracy"), overlaying="y", side="right", range=[0, 1]),
                      legend=dict(orientation="h", x=0, y=1.1))
    return fig


def _progress_text(job: TrainJob) -> tuple[float, str]:
    if job.waiting:
        return 0.0, "Waiting for another session's training to finish..."
    if not job.steps:
        return 0.0, "Starting..."
    s = job.steps[-1]
    acc = next((f", validation accuracy {t.val_accuracy:.3f}" for t in reversed(job.steps)
                if t.val_accuracy is not None), "")
    return s.fraction, f"Epoch {s.epoch} of {s.epochs}, step {s.step} of {s.steps}: loss {s.loss:.3f}{acc}"


def _follow(job: TrainJob) -> None:
    """The progress bar and the curves while the job runs (the Stop button's click reruns the page: it stops it)."""
    bar, plot = st.empty(), st.empty()
    while not job.done.wait(_POLL_S):
        bar.progress(*_progress_text(job))
        if job.steps:
            plot.plotly_chart(_curves(list(job.steps)), theme=None, config={"displayModeBar": False})
    bar.empty()
    plot.empty()


def _use(name: str, data: bytes) -> None:
    """Callback: the sidebar's model becomes this checkpoint (before the rerun draws the sidebar)."""
    st.session_state[TRAINED_KEY] = (name, data)
    st.session_state["model"] = TRAINED


def _offer(name: str, data: bytes, text: str, key: str) -> None:
    """The checkpoint: what it is, a download, and "Use this model"."""
    st.success(text)
    left, right = st.columns(2)
    left.download_button("Download checkpoint", data=data, file_name=name, mime="application/octet-stream",
                         key=f"dl_{key}", on_click="ignore")
    right.button("Use this model", key=f"use_{key}", on_click=_use, args=(name, data),
                 help="Analyse images with it: the sidebar's model becomes this checkpoint (Explain then shows its "
                      "predictions with its class names).")


def _train_block() -> None:
    config = _config_ui()
    data = _data_ui(config)
    job: TrainJob | None = st.session_state.get("_train_job")
    left, right = st.columns(2)
    running = job is not None and not job.done.is_set()
    if right.button("Stop", key="train_stop", disabled=not running) and running:
        job.stop.set()
    if left.button("Train", key="train_start", type="primary", disabled=running or data is None):
        job = st.session_state["_train_job"] = TrainJob(data, config)
        st.session_state.pop("_train_ckpt", None)
    if job is None:
        return
    _follow(job)
    if job.error is not None:
        raise job.error
    done = job.result
    if done is None:  # stopped while it waited for another session's training
        return
    st.plotly_chart(_curves(list(done.history)), theme=None, config={"displayModeBar": False}, key="fig_training")
    if "_train_ckpt" not in st.session_state:  # serialised once per training
        st.session_state["_train_ckpt"] = done.checkpoint()
    why = {"stopped": " (stopped)", "time limit": " (stopped at this server's time limit)"}.get(done.stopped, "")
    _offer(f"vit-{done.source.replace(' ', '_')}.safetensors", st.session_state["_train_ckpt"],
           f"Trained{why}: validation accuracy **{done.val_accuracy:.3f}** after {done.history[-1].epoch} epoch(s), "
           f"{done.seconds:.0f} s; classes {md_escape(', '.join(done.class_names)[:200])}.", "train")


def _fit_probe(ctx, name: str, data: bytes) -> tuple[str, bytes, str]:
    """The current model (square, at the image size in use) with a linear head fitted on the zip's images."""
    from vitviz.experiments.probe import fit_probe

    side = ctx.info.img_size[0]
    key = replace(ctx.key.model, img_size=(side, side))
    built, info = cache.model(key, ctx.weights)
    images = _probe_zip(cache.digest(data), side, info.crop_pct, info.interpolation, name, data)
    bar = st.progress(0.0, text="Computing the embeddings...")
    probe = fit_probe(built, images, mean=info.mean, std=info.std, key=key,
                      progress=lambda i, n: bar.progress(i / n, text=f"Embeddings: {i} of {n} images"))
    bar.empty()
    source = ctx.weights[0]
    ckpt = probe.checkpoint(built, arch=source.arch, kwargs=source.kwargs)
    text = (f"Probed {md_escape(info.name)}: held-out accuracy **{probe.accuracy:.3f}** on {probe.n_val} images "
            f"({probe.n_train} for the fit, {probe.method} regression on its {info.embed_dim}-d embedding, "
            f"{probe.seconds:.1f} s); classes {md_escape(', '.join(probe.class_names)[:200])}.")
    return f"probe-{len(probe.class_names)}-classes.safetensors", ckpt, text


def _probe_block(ctx) -> None:
    st.subheader("Probe the current model into a classifier")
    st.markdown("A linear head on the current model's image embedding (what its head would read; for DINOv2 the "
                "CLS token), fitted on your labelled images: how DINOv2 is used in practice. The embeddings are "
                "computed once; the head is measured on a held-out fifth of your images.")
    upload = st.file_uploader("Labelled images (.zip)", type=["zip"], key="probe_zip",
                              help="One sub-folder per class, its name the class name; up to 2,000 images.")
    if st.button("Fit a linear head", key="probe_start", disabled=upload is None):
        st.session_state["_probe"] = _fit_probe(ctx, upload.name, upload.getvalue())
    if "_probe" in st.session_state:
        name, ckpt, text = st.session_state["_probe"]
        _offer(name, ckpt, text, "probe")


def render(ctx) -> None:
    st.markdown("Train your own tiny ViT from scratch and watch it learn: the tutorial's experiment (patch size, "
                "embedding dimension, depth and heads are yours to choose). Then download it, or analyse images "
                "with it: every view and Explain take it as a classifier with its own class names.")
    with guarded("training"):
        _train_block()
    st.divider()
    with guarded("the probe"):
        _probe_block(ctx)
