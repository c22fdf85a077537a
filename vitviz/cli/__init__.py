"""Command line: ``vitviz analyze INPUT... --out DIR``, ``vitviz evaluate INPUT... --out DIR``, ``vitviz app``,
``vitviz train digits --out FILE``, ``vitviz probe FOLDER --out FILE`` (also ``python -m vitviz``).

- :mod:`.analyze`: rollout overlays, maps and arrays per image, and ``summary.csv``;
- :mod:`.evaluate`: the faithfulness of explanation methods over images;
- :mod:`.train`, :mod:`.probe`: train a tiny ViT, or fit a linear head on a backbone, saved as a checkpoint;
- :mod:`.app`: the Streamlit UI; options after ``--port``/``--host`` are passed to streamlit;
- :mod:`._common`: the options ``analyze`` and ``evaluate`` share (one parent parser), their inputs, the messages;
- :mod:`.distributed`: runs launched by ``torchrun``.

Building the parser imports no torch (``vitviz --version`` and ``vitviz app --help`` stay fast). Exit codes: 0 done;
1 done but an image failed (``analyze``, one process; under torchrun a finished rank exits 0); 2 bad arguments (one
line on stderr saying why); 130 on SIGINT, 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import VitvizError
from . import analyze, app, evaluate, probe, train
from ._common import check_common, for_terminal, parent_parser, resolve, threads
from .analyze import SUMMARY_FIELDS, TIMING_FIELDS

__all__ = ["main", "build_parser", "SUMMARY_FIELDS", "TIMING_FIELDS"]

EXPERIMENTS = {"train": train.run, "probe": probe.run}  # commands that train or fit a model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitviz", description="See how a Vision Transformer reads images.")
    parser.add_argument("--version", action="version", version=f"vitviz {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parent = parent_parser()
    analyze.add_parser(sub, parent)
    evaluate.add_parser(sub, parent)
    app.add_parser(sub)
    train.add_parser(sub)
    probe.add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from ..device import use_threads
    from .distributed import Interrupted, interruptible

    try:
        with interruptible():
            args = resolve(args)
            if args.command in EXPERIMENTS:  # their own options: no batches, workers or ranks
                return EXPERIMENTS[args.command](args)
            check_common(args)
            use_threads(threads(args.threads))
            return (evaluate.run if args.command == "evaluate" else analyze.run)(args)
    except VitvizError as exc:
        print(f"vitviz: {for_terminal(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"vitviz: interrupted ({exc})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "app":
        return app.run(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _run(args)
