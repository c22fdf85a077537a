"""``vitviz app``: start the Streamlit server on the installed package's entry script, warming what can be warmed.

While the server starts, a background thread imports torch, timm and the app, converts the embedded default model
once (if it is not cached yet), builds it at the app's opening settings and runs the first example through it, all
into the same caches the app reads: the first visitor then waits for none of that.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from .config import SERVER_OPTIONS, streamlit_flags
from .config import host as listen_host

__all__ = ["ENTRY", "launch", "streamlit_argv", "warm"]

ENTRY = Path(__file__).with_name("entry.py")
WARM_THREAD = "vitviz-warm-up"
# what Streamlit logs when its caches are filled from a thread outside any page run: true of the warm-up by design,
# and not the user's business (it reads like an error at start-up)
_BARE_THREAD_LOGGERS = ("streamlit.runtime.scriptrunner_utils.script_run_context",
                        "streamlit.runtime.caching.cache_data_api")


class _NotFromWarmUp(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != WARM_THREAD


def _quiet_warm_up() -> None:
    """Drop Streamlit's bare-thread warnings, only those the warm-up thread itself causes."""
    for name in _BARE_THREAD_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NotFromWarmUp) for f in logger.filters):
            logger.addFilter(_NotFromWarmUp())


def streamlit_argv(*, port: int, streamlit_args: list[str], host: str | None = None) -> list[str]:
    """``streamlit run`` arguments, listening on ``host`` (None: ``$VITVIZ_HOST``, else 127.0.0.1); options given by
    the user come last and win."""
    options = {**SERVER_OPTIONS, "server.address": listen_host(host)}
    return ["streamlit", "run", str(ENTRY), *streamlit_flags(options), "--server.port", str(port), *streamlit_args]


def warm() -> None:
    """Fill the app's caches for its opening state (the embedded default, the first example, the default settings).

    Best effort: whatever fails here (no default model on this machine, say) is left for the page to report.
    """
    _quiet_warm_up()
    try:
        from vitviz.analysis.onepass import input_size_for
        from vitviz.models import ModelKey
        from vitviz.settings import DEFAULTS

        from . import cache
        from .jobs import share_cores
        from .sidebar import ASSETS
        from .state import app_model

        share_cores()  # the threads the page would set, before this process's first pass
        name, arch = app_model()
        weights = cache.model_source(name, arch)
        example = sorted(ASSETS.glob("*.jpg"))[0]
        data = example.read_bytes()
        image = cache.image(cache.digest(data), data, example.name)
        patch = weights[0].native_patch_size
        size = input_size_for(image.image, img_size=DEFAULTS.img_size, patch_size=patch, fit=DEFAULTS.fit)
        key = cache.AnalysisKey(ModelKey(name, arch, patch, size, "auto", "auto"), cache.digest(data), DEFAULTS.fit)
        cache.analysis(key, image, weights)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the server
        print(f"vitviz: warm-up skipped ({type(exc).__name__}: {exc})", file=sys.stderr)


def launch(*, port: int, streamlit_args: list[str], host: str | None = None) -> int:
    """Run the Streamlit server in this process (Ctrl-C stops it), warming the caches beside it; it listens on
    ``host`` (None: ``$VITVIZ_HOST``, else 127.0.0.1 only)."""
    from streamlit.web import cli as stcli

    threading.Thread(target=warm, name=WARM_THREAD, daemon=True).start()
    sys.argv = streamlit_argv(port=port, streamlit_args=streamlit_args, host=host)
    try:
        stcli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
