"""``vitviz probe FOLDER|ZIP --out FILE [--model default]``: a linear head on a backbone's embedding, fitted on your
labelled images (one sub-folder per class), saved as a checkpoint of the backbone with the head and class names.

The images are fitted as the analysis fits them at ``--img-size`` (centre crop); the head is fitted on a fixed split
and the last line printed is its held-out accuracy, ``validation accuracy 0.973``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import setting
from .train import accuracy_line, threads

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="fit a linear classifier head on a backbone's embedding of your images",
                       description="Fit a linear head on a backbone's image embedding and save the backbone with it.")
    p.add_argument("data", type=Path, help="a folder or .zip with one sub-folder of images per class")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write (.safetensors)")
    p.add_argument("--model", default=setting("model"),
                   help="'default' (the embedded DINOv2 ViT-S/14), a timm model name, or a checkpoint file")
    p.add_argument("--arch", default=None, help="timm architecture of a checkpoint file that does not name it")
    p.add_argument("--patch-size", type=int, default=setting("patch_size"), help="patch size (default: the model's)")
    p.add_argument("--img-size", type=int, default=setting("img_size"), help="input size in px (default %(default)s)")
    p.add_argument("--method", choices=("logistic", "ridge"), default="logistic",
                   help="multinomial logistic regression (L-BFGS; default) or closed-form ridge least squares")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.add_argument("--device", default=setting("device"), help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: this machine's cores)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..experiments.data import labelled_images
    from ..experiments.probe import fit_probe
    from ..experiments.train import save_checkpoint
    from ..models import ModelKey, get_model, native_patch_size, resolve_sizes
    from ..models.build import model_source

    if args.out.suffix.lower() != ".safetensors":
        raise ParameterError(f"--out {args.out.name!r}: a probed model is saved as .safetensors")
    threads(args.threads)
    patch, size = resolve_sizes(native_patch_size=native_patch_size(args.model, arch=args.arch),
                                patch_size=args.patch_size, img_size=args.img_size)
    model, info = get_model(args.model, arch=args.arch, patch_size=patch, img_size=size, device=args.device)
    data = labelled_images(args.data, img_size=size[0], crop_pct=info.crop_pct, interpolation=info.interpolation)
    key = ModelKey(str(args.model), args.arch, patch, size, str(next(model.parameters()).device), "auto")
    probe = fit_probe(model, data, mean=info.mean, std=info.std, key=key, method=args.method, seed=args.seed)
    source = model_source(args.model, arch=args.arch)
    save_checkpoint(args.out, probe.checkpoint(model, arch=source.arch, kwargs=source.kwargs))
    print(f"vitviz: {probe.n_train} training and {probe.n_val} held-out images, {len(data.class_names)} classes, "
          f"{probe.method} head on {info.name}'s {info.embed_dim}-d embedding in {probe.seconds:.1f} s; saved "
          f"{args.out}", file=sys.stderr)
    print(accuracy_line(probe.accuracy))
    return 0
