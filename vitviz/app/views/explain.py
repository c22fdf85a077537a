"""Explain: what the model's answer (a class, or its embedding) depends on, with the map's faithfulness beside it.

Attention shows where attention goes; this view shows which patches the target depends on, and measures it two
ways: the target's score as the most relevant patches are removed (MoRF, should fall fast) and as the least relevant
are removed (LeRF, should stay), against random maps. Score = area under LeRF − area under MoRF (random ≈ 0).
Removed by token removal (dropped from the sequence: greedy deletion's own objective, so it flatters that method) and
by blurring (a measure no method here is built on). The map and its score by token removal come first; the score by
blurring is measured after, by a second shared job, and appears when ready (the part of the page that shows it
reruns alone until then, so nothing waits on it).

A CLIP model (``clip:NAME/TAG``) is explained for a text prompt typed in a box (the cosine of the image with the
prompt), and its zero-shot predictions over a list of class names are shown instead of a classifier's.
"""

from __future__ import annotations

import functools
import logging
import uuid

import numpy as np
import streamlit as st
import torch

from vitviz import figures as vf
from vitviz.errors import VitvizError
from vitviz.evaluate import RANDOM_DRAWS
from vitviz.explain import DEFAULT_METHOD
from vitviz.explain.registry import METHODS as REGISTERED
from vitviz.inputs.image import to_tensor
from vitviz.metrics.perturb import BLUR_SIGMA_PX
from vitviz.models.clip import DEFAULT_TEMPLATE, is_clip_name, load_clip, zero_shot
from vitviz.models.labels import has_classes
from vitviz.targets import Target, prompt_target

from .. import cache, jobs
from ..state import keep
from ..widgets import chart, md_escape

log = logging.getLogger("vitviz.app")

TITLE = "Explain"
POLL_S = 0.5  # how often the score by blurring is looked for while it is measured (the page's part alone reruns)
CURVES_BY = {"tokens": "by token removal", "blur": f"by blurring (σ {BLUR_SIGMA_PX:g} px)"}
# every registered method but the random baseline (drawn beside each map), the default first; rollout as the
# measured variant (from layer 1, discarding the lowest 90%)
METHODS = tuple(dict.fromkeys((DEFAULT_METHOD, *("rollout:start=1,discard=0.9" if m.name == "rollout" else m.name
                                                 for m in REGISTERED if m.name != "random"))))
METHOD_TEXT = {m.name: m.title for m in REGISTERED}
MEASURED = (" On the photos we measured, the default, AttnLRP with its γ-rule in the last 4 blocks, ranked best "
            "among the methods that cost at most three passes, by the measures no method is built on; AttnLRP with "
            "the γ-rule in every block ranked higher still, at more than four passes, and greedy token deletion "
            "alike, at tens of passes.")
# how to read a map whose values are not a relevance on their own scale
READING = {"deletion": "Patches were removed in steps, each step taking the patches whose presence the score "
                       "leaned on most among those left; a patch's value is how much of the score was still to go "
                       "when it was removed (dark: removed after the score had stopped falling)."}


def _method_label(label: str) -> str:
    name, _, rest = label.partition(":")
    return METHOD_TEXT.get(name, name) + (f" ({rest})" if rest else "") + (" — default" if label == DEFAULT_METHOD
                                                                             else "")


DEFAULT_PROMPT = "a photo of a cat"
DEFAULT_CLASSES = "cat, dog, bird, car, person, tree"


def _is_clip(ctx) -> bool:
    return is_clip_name(ctx.key.model.name)


def _targets(ctx) -> list[str]:
    """What can be explained: a classifier's top-5 classes and its embedding; a backbone's embedding (label-free,
    Crabbé & van der Schaar 2022) or the query patch's feature; a CLIP model's text prompt. Never a class the model
    does not have (a CLIP tower's head is its projection into the text space, not classes)."""
    built, _info = cache.model(ctx.key.model, ctx.weights)
    patch = f"patch:{ctx.query}"
    if _is_clip(ctx):
        return ["prompt", "embedding", patch]
    if not has_classes(built):
        return ["embedding", patch]
    return ["class", "embedding", patch]


def _target_text(target: str, ctx) -> str:
    if target == "prompt":  # the text itself is in its own box (a label that changed with it would reset the menu)
        return "the text prompt (typed below)"
    if target == "class":
        return "the top-1 class"
    if target == "embedding":
        return "the image's own embedding (label-free)"
    return f"the query patch {ctx.query}'s feature"


def _prompt_ui() -> tuple[str, tuple[str, ...]]:
    """A CLIP model's text boxes: the prompt explained, and the class names of the zero-shot predictions."""
    keep("explain_prompt", lambda v: isinstance(v, str), DEFAULT_PROMPT)
    keep("explain_classes", lambda v: isinstance(v, str), DEFAULT_CLASSES)
    left, right = st.columns(2)
    prompt = left.text_input("Prompt", key="explain_prompt", max_chars=300,
                             help="What to look for: the explained score is the cosine of the image's embedding "
                                  "with this text's embedding.")
    names = right.text_input("Zero-shot classes", key="explain_classes", max_chars=2000,
                             help=f"Class names separated by commas, each read as '{DEFAULT_TEMPLATE}': the "
                                  "predictions are the softmax of the scaled cosines with the image.")
    return prompt.strip(), tuple(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))


@functools.lru_cache(maxsize=64)
def _prompt_target(model: str, text: str) -> Target:
    """The prompt's target, its text embedded once per model and text (shared by every session)."""
    return prompt_target(load_clip(model).text, text)


@st.cache_data(max_entries=16, show_spinner=False)
def _image_embedding(key, _res, _weights) -> np.ndarray:
    """The CLIP image embedding (D,) of the analysed image: the tower's head output, one plain forward."""
    built, info = cache.model(key.model, _weights)
    param = next(built.parameters())
    x = to_tensor(_res.pixels, mean=info.mean, std=info.std).to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        return built(x)[0].float().cpu().numpy()


def _zero_shot_caption(ctx, classes: tuple[str, ...]) -> str | None:
    if not classes:
        return None
    found = zero_shot(load_clip(ctx.key.model.name), torch.from_numpy(_image_embedding(ctx.key, ctx.res, ctx.weights)),
                      classes)
    return "Zero-shot predictions: " + "; ".join(f"'{p.name}' (p = {p.probability:.2g})" for p in found)


def _explained(ctx, method: str, target: str | Target):
    """The cached explanation; a progress bar while it is computed (none when it is ready)."""
    slot = st.empty()
    done = jobs.explanation(ctx.key, method, target, ctx.res, ctx.weights,
                             progress=lambda fraction, text: slot.progress(fraction, text=text))
    slot.empty()
    return done


def _unit(c, e) -> str:
    """What the curves read: the explained score itself."""
    if c.score_kind != "cosine":
        return f"{c.score_kind} of the class"
    if e.target.kind == "patch":
        return f"cosine with the full image's feature of patch {e.target.index}"
    if e.target.kind == "prompt":
        return "cosine with the prompt's text embedding"
    return "cosine with the full image's embedding"


def _score_text(c, r, unit: str) -> str:
    """One score named by its perturbation and read-out: "**Faithfulness by token removal**, read as the ..."."""
    how = CURVES_BY[c.perturbation]
    return (f"**Faithfulness {how}**, read as the {unit}, {len(c.fractions)} steps: **{c.score:+.3g}** (LeRF area "
            f"{c.lerf_auc:.3g} − MoRF area {c.morf_auc:.3g}; {RANDOM_DRAWS} random maps score {r.score:+.2g} on "
            "average on this image).")


def _failure_text(exc: BaseException) -> str:
    """Why there is no score by blurring, in a sentence (a bug is logged, never shown as a traceback)."""
    if isinstance(exc, VitvizError):
        return f"No faithfulness {CURVES_BY['blur']}: {md_escape(str(exc))}"
    if isinstance(exc, jobs.Abandoned):  # left by every session or by the cache, or the server is stopping
        return (f"The faithfulness {CURVES_BY['blur']} was stopped before it finished ({md_escape(str(exc))}); "
                "it is measured again when the page next runs.")
    log.error("internal error measuring faithfulness by blurring", exc_info=exc)
    return (f"No faithfulness {CURVES_BY['blur']}: an internal error, a bug in vitviz, not a problem with your image "
            "or settings. It was logged on the server; the map and its score by token removal above are unaffected.")


def _blur_score(job: jobs.ExplainJob, unit: str, polling: bool) -> None:
    """The score by blurring, its progress while it is measured, or why it is missing. Drawn as a fragment that
    reruns alone every ``POLL_S`` while ``polling``; once the job is done it reruns the page (the curves' toggle
    then has the curves, and the polling stops)."""
    if not job.poll():
        st.progress(job.fraction, text=job.stage)
        return
    if polling:
        st.rerun()
    if job.error is not None:
        (st.info if isinstance(job.error, jobs.Abandoned) else st.error)(_failure_text(job.error))
        return
    st.markdown(_score_text(job.result.curves, job.result.random_curves, unit)
                + " No method here is built on this measure.")


def _measuring(ctx, method: str, target: str | Target, done) -> jobs.ExplainJob:
    """The shared job measuring this map by blurring; the one this session asked for before (another method, target
    or image) is left, so that it stops at once if nobody else wants it."""
    if "_explain_asker" not in st.session_state:
        st.session_state["_explain_asker"] = uuid.uuid4().hex  # this session, among a job's askers
    asker = st.session_state["_explain_asker"]
    job = jobs.measurement(ctx.key, method, target, ctx.res, ctx.weights, done, asker=asker)
    last = st.session_state.get("_explain_measuring")
    if last is not None and last is not job:
        last.leave(asker)
    st.session_state["_explain_measuring"] = job  # a job keeps no analysis alive (issue 14)
    return job


def _scores(ctx, method: str, target: str | Target, done, unit: str) -> jobs.ExplainJob:
    """The two scores side by side: by token removal (ready with the map) and by blurring (when it is ready)."""
    left, right = st.columns(2)
    own = (" Greedy deletion picks its patches by this very measure (its own objective): read the score by blurring "
           "to compare it with the other methods." if done.explanation.method.name == "deletion" else "")
    left.markdown(_score_text(done.curves, done.random_curves, unit) + own)
    job = _measuring(ctx, method, target, done)
    polling = not job.done.is_set()
    with right:
        st.fragment(_blur_score, run_every=POLL_S if polling else None)(job, unit, polling)
    return job


def _curves_chart(ctx, done, job: jobs.ExplainJob, unit: str) -> None:
    """The curves of one measure, chosen by a toggle: one chart at the map's side (both in one chart would be eight
    lines; a second chart would push the map's companion below it), the scores of both are in the text above."""
    keep("explain_curves_by", lambda v: v in CURVES_BY, "tokens")
    by = st.segmented_control("Curves", list(CURVES_BY), key="explain_curves_by", format_func=CURVES_BY.get,
                              required=True, help="Which measure's curves to show; both scores are written above.")
    if by == "blur" and (not job.done.is_set() or job.error is not None):
        st.info(f"The curves {CURVES_BY['blur']} appear here once measured (see above).")
        return
    c, r = (job.result.curves, job.result.random_curves) if by == "blur" else (done.curves, done.random_curves)
    chart(vf.curves_figure(c.fractions, {"MoRF (most relevant removed first)": c.morf,
                                         "LeRF (least relevant removed first)": c.lerf,
                                         f"random MoRF (mean of {RANDOM_DRAWS})": r.morf,
                                         f"random LeRF (mean of {RANDOM_DRAWS})": r.lerf},
                           title=f"Faithfulness curves {CURVES_BY[by]}", y_title=unit),
          "fig_explain_curves", stem=ctx.stem, clickable=False)


def render(ctx) -> None:
    info, d = ctx.info, ctx.display
    targets = _targets(ctx)
    keep("explain_target", lambda v: v in targets, targets[0])
    keep("explain_method", lambda v: v in METHODS, DEFAULT_METHOD)
    left, right = st.columns(2)
    target = left.selectbox("What to explain", targets, key="explain_target",
                            format_func=lambda t: _target_text(t, ctx))
    method = right.selectbox("Method", METHODS, key="explain_method", format_func=_method_label)
    prompt, classes = _prompt_ui() if _is_clip(ctx) else ("", ())
    if target == "prompt" and not prompt:
        st.info("Type a prompt to explain, e.g. 'a photo of a cat'.")
        return
    asked = _prompt_target(ctx.key.model.name, prompt) if target == "prompt" else target
    done = _explained(ctx, method, asked)
    e = done.explanation
    predicted = _zero_shot_caption(ctx, classes) if _is_clip(ctx) else (
        "Predictions: " + "; ".join(p.describe() for p in e.predictions) if e.predictions else None)
    if predicted:
        st.caption(predicted)
    st.markdown(f"**{_method_label(method)}** explains **{e.target_description}** ({e.passes}). Brighter patches "
                f"matter more to it. Its faithfulness is measured two ways below; for both, higher means the map "
                f"follows the model more closely (a random map scores about 0). {READING.get(e.method.name, '')}"
                f"{'' if method == DEFAULT_METHOD else MEASURED}")
    unit = _unit(done.curves, e)
    job = _scores(ctx, method, asked, done, unit)
    for note in e.notes:
        st.warning(note)
    cols = st.columns(2)
    with cols[0]:
        chart(vf.overlay_figure(ctx.res.pixels, e.map, patch_size=info.patch_size, opacity=d.opacity,
                                colorscale=d.colorscale, highlight=ctx.query, colorbar_title="relevance"),
              "fig_explain", stem=ctx.stem)
    with cols[1]:
        _curves_chart(ctx, done, job, unit)
