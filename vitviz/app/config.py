"""Server options of the app, one definition for ``vitviz app`` (passed as flags) and ``.streamlit/config.toml``.

The file watcher is off: a deployed app never reloads its own source, and watching a checkout would also watch its
virtual environment (thousands of files, inotify overflows, a slower first page).

The server listens on 127.0.0.1 only, as a local tool should: anyone who can reach the port can upload files and run
models. ``VITVIZ_HOST`` (read by ``vitviz app``, see :func:`host`) exposes it, e.g. ``VITVIZ_HOST=0.0.0.0 make app``;
a shared app belongs behind authentication (a reverse proxy with a login).
"""

from __future__ import annotations

import os

from vitviz.models.checkpoints import MAX_CHECKPOINT_UPLOAD_BYTES

__all__ = ["DEFAULT_HOST", "SERVER_OPTIONS", "host", "streamlit_flags"]

DEFAULT_HOST = "127.0.0.1"

SERVER_OPTIONS: dict[str, object] = {
    "server.headless": True,
    "server.address": DEFAULT_HOST,  # loopback only; vitviz app: VITVIZ_HOST
    "server.fileWatcherType": "none",
    "server.runOnSave": False,
    # the checkpoint uploader's limit, in Streamlit's MB of 10^6 bytes; image uploads are refused over their own
    # limit (vitviz.inputs.image.MAX_UPLOAD_BYTES) by the decoder, before it reads them
    "server.maxUploadSize": MAX_CHECKPOINT_UPLOAD_BYTES // 10**6,
    "browser.gatherUsageStats": False,
    "client.toolbarMode": "minimal",
    "client.showErrorDetails": "none",
    "runner.magicEnabled": False,
}


def host(given: str | None = None) -> str:
    """The address to listen on: ``given`` (a ``--host`` option), else ``$VITVIZ_HOST``, else 127.0.0.1."""
    for value in (given, os.environ.get("VITVIZ_HOST")):
        if value is not None and value.strip():
            return value.strip()
    return DEFAULT_HOST


def streamlit_flags(options: dict[str, object] = SERVER_OPTIONS) -> list[str]:
    """``--section.option value`` pairs for ``streamlit run``."""
    flags = []
    for name, value in options.items():
        flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags
