"""``vitviz train digits|FOLDER|ZIP --out FILE``: train a tiny ViT from scratch and save it as a checkpoint.

``digits`` is scikit-learn's bundled handwritten digits (``pip install vitviz[train]``); a folder (or a zip of one)
holds one sub-folder of images per class. The checkpoint (``.safetensors``) names its architecture, its class names
and its validation accuracy; every vitviz path loads it (``--model FILE``, the app). The last line printed is
``validation accuracy 0.973``; one line per epoch goes to stderr (none with ``--quiet``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import Lazy

__all__ = ["add_parser", "run", "accuracy_line"]


def _default(name: str) -> Lazy:
    """A :class:`~vitviz.experiments.train.TrainConfig` default, read when a run starts (no torch import here)."""
    return Lazy("vitviz.experiments.train", "TrainConfig", lambda config: getattr(config, name))


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a tiny ViT from scratch on digits or your labelled images",
                       description="Train a tiny ViT from scratch and save it as a .safetensors checkpoint.")
    t.add_argument("data", help="'digits' (scikit-learn's handwritten digits), or a folder or .zip with one "
                                "sub-folder of images per class")
    t.add_argument("--out", type=Path, required=True, help="the checkpoint to write (.safetensors)")
    for flag, name, kind, what in (("--patch-size", "patch_size", int, "patch size in px"),
                                   ("--embed-dim", "embed_dim", int, "embedding dimension"),
                                   ("--depth", "depth", int, "number of blocks"),
                                   ("--heads", "num_heads", int, "attention heads per block"),
                                   ("--img-size", "img_size", int, "input size in px"),
                                   ("--epochs", "epochs", int, "passes over the training split"),
                                   ("--batch-size", "batch_size", int, "images per step"),
                                   ("--lr", "lr", float, "peak learning rate (AdamW)"),
                                   ("--seed", "seed", int, "seed of the split, the initialisation and the batches")):
        t.add_argument(flag, dest=name, type=kind, default=_default(name), help=f"{what} (default %(default)s)")
    t.add_argument("--device", default="auto", help="auto (CUDA if there is one, else the CPU), cpu or cuda")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: this machine's cores)")
    t.add_argument("--quiet", action="store_true", help="no line per epoch")


def accuracy_line(value: float) -> str:
    """The last line ``train`` and ``probe`` print, what scripts read."""
    return f"validation accuracy {value:.3f}"


def threads(asked: int | None) -> None:
    """Torch threads for this run: ``--threads`` (never more than the cores), else the cores."""
    from ..device import cpu_threads, use_threads
    from ..errors import ParameterError

    if asked is not None and asked < 1:
        raise ParameterError(f"threads must be at least 1, got {asked}")
    use_threads(min(asked or cpu_threads(), cpu_threads()))


def run(args: argparse.Namespace) -> int:
    from ..experiments.train import TrainConfig, train_vit, training_data

    config = TrainConfig(patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                         num_heads=args.num_heads, img_size=args.img_size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    config.check()
    if args.out.suffix.lower() != ".safetensors":
        from ..errors import ParameterError

        raise ParameterError(f"--out {args.out.name!r}: a trained model is saved as .safetensors")
    threads(args.threads)
    data = training_data(args.data if args.data == "digits" else Path(args.data), config)

    def report(step) -> None:
        if step.val_accuracy is not None and not args.quiet:
            print(f"epoch {step.epoch}/{step.epochs}: loss {step.loss:.3f}, validation accuracy "
                  f"{step.val_accuracy:.3f} ({step.seconds:.1f} s)", file=sys.stderr)

    trained = train_vit(data, config, progress=report, device=args.device)
    trained.save(args.out)
    print(f"vitviz: {len(data.labels)} images, {len(data.class_names)} classes; saved {args.out}", file=sys.stderr)
    print(accuracy_line(trained.val_accuracy))
    return 0
