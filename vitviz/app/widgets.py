"""Helpers every view uses: user errors as messages (bugs logged), clickable charts, and the click-to-query-patch
callback.

The callbacks are functions of this module taking only widget keys, so a callback never holds a run's arrays (a
callback that closed over a script's globals kept every analysis a session had seen alive).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath
from typing import NoReturn

import streamlit as st

from vitviz import figures as vf
from vitviz.analysis.readout import readout_name
from vitviz.errors import VitvizError

__all__ = ["fail", "bug", "guarded", "chart", "clicked_patch", "on_click", "md_escape", "file_stem", "readout_note"]

log = logging.getLogger("vitviz.app")

# what makes emphasis, code, links, html, headings, lists, maths, entities; and Streamlit's own directives:
# ``:red[x]`` colours, ``:smile:`` emoji, ``:material/home:`` icons (Streamlit rewrites ":material/" before parsing)
_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|~$:/&!+=-])")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")  # a name must not start a new Markdown block
_ORDERED = re.compile(r"^(\s*\d+)([.)])")  # "1. x" at the start would be a numbered list
# Streamlit replaces these in the parsed text, where a backslash no longer counts: " -> " becomes an arrow, " >= " a
# sign, ":streamlit:" its logo. An invisible WORD JOINER (U+2060) after the first character keeps them as typed.
_REPLACED = re.compile(r"(?<!\S)([<>~-])(->|-|=|>)(?!\S)|(:)(streamlit:)")
WORD_JOINER = "\u2060"


def md_escape(text: str) -> str:
    """``text`` shown literally inside Markdown or any Streamlit element that renders it (st.markdown, caption,
    error, info, warning, success, titles): a file name such as ``**x**.pth``, ``[a](b)`` or ``:red[x].png`` stays
    as typed. Every user-supplied string (file names, typed model names, messages that quote them) goes through it."""
    text = _LINE_BREAKS.sub(" ", str(text))
    text = _REPLACED.sub(lambda m: WORD_JOINER.join(g for g in m.groups() if g is not None), text)
    return _ORDERED.sub(r"\1\\\2", _MARKDOWN.sub(r"\\\1", text))


def fail(exc: VitvizError) -> NoReturn:
    """A user-caused error: its message, no traceback, and nothing further on this run."""
    st.error(md_escape(str(exc)))  # st.error renders Markdown: a file name in a message must show as typed
    st.stop()


def bug(where: str) -> NoReturn:
    """Anything but a :class:`VitvizError` is a bug: logged with its traceback on the server; the user reads that it
    is one (never a message that blames the input), and nothing further on this run."""
    log.exception("internal error in %s", where)
    st.error(f"Internal error in {md_escape(where)}: this is a bug in vitviz, not a problem with your image or "
             "settings. It was logged on the server.")
    st.stop()


@contextmanager
def guarded(where: str) -> Iterator[None]:
    """Run a block: a user error (:class:`VitvizError`) becomes its message (:func:`fail`), anything else a logged
    bug (:func:`bug`). Streamlit's own stop and rerun are BaseExceptions and pass through."""
    try:
        yield
    except VitvizError as exc:
        fail(exc)
    except Exception:  # noqa: BLE001 - a bug: logged, and said to be one
        bug(where)


def file_stem(name: str) -> str:
    """What a download is named after: the image file's stem, in letters, digits, ``._-`` (``my cat.jpg``:
    ``my_cat``), at most 80 characters; ``image`` if nothing is left."""
    stem = re.sub(r"[^\w.-]+", "_", PurePath(name.replace("\\", "/")).stem).strip("._-")
    return stem[:80] or "image"


def clicked_patch(points: list[dict], *, grid: tuple[int, int], patch_size: int, mosaic: bool = False) -> int | None:
    """The patch of the first clicked point. In the browser a click selects one of the figure's click targets, whose
    ``customdata[0]`` is the patch index (a typed-array row arrives as ``{"0": index, "1": row, ...}``); otherwise
    the patch under the point's (x, y) (plot coordinates are image pixels, or mosaic cells)."""
    gh, gw = grid
    for pt in points:
        custom = pt.get("customdata") or [None]
        idx = custom.get("0") if isinstance(custom, dict) else custom[0] if isinstance(custom, list) else None
        if isinstance(idx, (int, float)) and float(idx).is_integer() and 0 <= idx < gh * gw:
            return int(idx)
        x, y = pt.get("x"), pt.get("y")
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
            continue
        if mosaic:
            idx = vf.mosaic_point_to_patch(x, y, grid=grid)
        else:
            r, c = int(y // patch_size), int(x // patch_size)
            idx = r * gw + c if 0 <= r < gh and 0 <= c < gw else None
        if idx is not None:
            return idx
    return None


def on_click(chart_key: str, *, mosaic: bool = False) -> None:
    """Chart selection callback: runs before the rerun, so it may set the query patch input."""
    geom = st.session_state.get("_geometry")
    event = st.session_state.get(chart_key)
    if not geom or not event:
        return
    idx = clicked_patch(event["selection"]["points"], grid=geom["grid"], patch_size=geom["patch_size"], mosaic=mosaic)
    if idx is not None:
        st.session_state["query_patch"] = idx


def chart(fig, key: str, *, stem: str, clickable: bool = True, mosaic: bool = False, toolbar: bool = True) -> None:
    """A plotly figure, clickable to pick the query patch, with its standalone-HTML download under it, named after
    the image (``stem``) and the figure: ``cat-heads.html`` for ``fig_heads``.

    ``theme=None``: Streamlit's theme would replace colours of the figure (it turns the first colour of Inferno and
    Magma, #000004, pink), so the screen would not show the scale the colour bar and the downloads use.
    """
    config = {"displaylogo": False} if toolbar else {"displayModeBar": False}
    if clickable:
        # Plotly keeps a clicked point selected, and a click on a selected point unselects it (an empty selection).
        # The figure names the query patch, so a new query gives a new element with nothing selected: a click on a
        # patch clicked before selects it afresh. Selection events only fire on a change: an old one never re-applies.
        fig.update_layout(selectionrevision=f"query {st.session_state.get('query_patch')}")
        st.plotly_chart(fig, key=key, on_select=functools.partial(on_click, key, mosaic=mosaic),
                        selection_mode="points", theme=None, config=config)
    else:
        st.plotly_chart(fig, key=key, theme=None, config=config)
    name = f"{stem}-{key.removeprefix('fig_').replace('_', '-')}.html"
    st.download_button("Figure as HTML", data=functools.partial(vf.figure_html, fig), file_name=name,
                       mime="text/html", key=f"dl_{key}", on_click="ignore")


def readout_note(info) -> str:
    """"" for a model with a CLS token; else one sentence saying what its maps follow instead (its readout)."""
    if info.readout == "cls":
        return ""
    return (f"This model has no CLS token: its maps follow {readout_name(info.readout)}, the tokens its head pools, "
            "each token's attention row weighted as the head weights that token.")
