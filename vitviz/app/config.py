"""Server options of the app, one definition for ``vitviz app`` (passed as flags) and ``.streamlit/config.toml``.

The file watcher is off: a deployed app never reloads its own source, and watching a checkout would also watch its
virtual environment (thousands of files, inotify overflows, a slower first page).
"""

from __future__ import annotations

from vitviz.image import MAX_UPLOAD_BYTES

__all__ = ["SERVER_OPTIONS", "streamlit_flags"]

SERVER_OPTIONS: dict[str, object] = {
    "server.headless": True,
    "server.fileWatcherType": "none",
    "server.runOnSave": False,
    "server.maxUploadSize": MAX_UPLOAD_BYTES // 10**6,  # Streamlit's MB are 10^6 bytes
    "browser.gatherUsageStats": False,
    "client.toolbarMode": "minimal",
    "client.showErrorDetails": "none",
    "runner.magicEnabled": False,
}


def streamlit_flags(options: dict[str, object] = SERVER_OPTIONS) -> list[str]:
    """``--section.option value`` pairs for ``streamlit run``."""
    flags = []
    for name, value in options.items():
        flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags
