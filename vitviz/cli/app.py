"""``vitviz app [--port N] [--host HOST] [streamlit options...]``: the Streamlit UI of an installed vitviz."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    a = sub.add_parser("app", help="start the web app (streamlit); further options go to streamlit",
                       description="Start the vitviz web app. Options other than --port and --host are passed to "
                                   "streamlit, e.g. --server.headless true.")
    a.add_argument("--port", type=int, default=8501, help="port to serve on (default %(default)s)")
    a.add_argument("--host", default=None,
                   help="address to listen on (default: $VITVIZ_HOST, else 127.0.0.1: this machine only)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..app.launch import launch

    return launch(port=args.port, host=args.host, streamlit_args=extra)
