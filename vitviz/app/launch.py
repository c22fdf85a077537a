"""``vitviz app``: start the Streamlit server on the installed package's entry script."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import streamlit_flags

__all__ = ["ENTRY", "launch", "command"]

ENTRY = Path(__file__).with_name("entry.py")


def command(*, port: int, streamlit_args: list[str]) -> list[str]:
    """The ``python -m streamlit run`` command line; options given by the user come last and win."""
    return [sys.executable, "-m", "streamlit", "run", str(ENTRY), *streamlit_flags(), "--server.port", str(port),
            *streamlit_args]


def launch(*, port: int, streamlit_args: list[str]) -> int:
    """Replace this process with the Streamlit server (Ctrl-C then stops the server itself)."""
    cmd = command(port=port, streamlit_args=streamlit_args)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached
