"""What ``analyze`` and ``evaluate`` share: one parent parser, the resolved options, the inputs, the messages.

Building the parser imports no torch (``vitviz --version`` stays fast): the defaults and choices that the library
defines (:data:`vitviz.settings.DEFAULTS`, the fits and head fusions, the method registry) are :class:`Lazy` values,
read when a run starts (:func:`resolve`) or when ``--help`` prints them (:class:`HelpWithMethods` also lists the
registered methods then).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ModelUnavailableError, ResourceError, VitvizError

__all__ = ["GPU_WORKERS", "DEFAULT_DIST_TIMEOUT_S", "Lazy", "HelpWithMethods", "parent_parser", "resolve",
           "check_common", "batch_size", "workers", "threads", "collect", "progress", "parse_methods", "for_terminal",
           "setting", "FITS", "FUSIONS", "Prompts", "prompts", "image_prompt"]

GPU_WORKERS = 4  # decoding processes per GPU rank by default (fewer when the machine has fewer cores per rank)
DEFAULT_DIST_TIMEOUT_S = 24 * 3600  # the final wait for the slowest rank; a dead rank is caught by torchrun first


class Lazy:
    """``module.name`` (then ``then`` applied), imported when first used: as a default (:func:`resolve`), as
    choices (``in``, iteration; give the argument a metavar, else argparse lists them when it is added) or in the
    help (``str``)."""

    def __init__(self, module: str, name: str, then=None):
        self.module, self.name, self.then = module, name, then

    def get(self):
        value = getattr(importlib.import_module(self.module), self.name)
        return self.then(value) if self.then else value

    def __str__(self) -> str:
        return str(self.get())

    def __repr__(self) -> str:
        return f"Lazy({self.module}.{self.name})"

    def __iter__(self):
        return iter(self.get())

    def __contains__(self, value) -> bool:
        return value in self.get()


def setting(name: str) -> Lazy:
    """The default of ``name`` in :data:`vitviz.settings.DEFAULTS` (the app's and the CLI's)."""
    return Lazy("vitviz.settings", "DEFAULTS", lambda d: getattr(d, name))


FITS = Lazy("vitviz.settings", "FITS")
FUSIONS = Lazy("vitviz.analysis.rollout", "FUSIONS")


def _method_table(parser: argparse.ArgumentParser) -> str:
    """Every registered method with its title; for a parser with ``--methods`` (evaluate), its default list too."""
    from ..explain.registry import METHODS

    width = max(len(m.name) for m in METHODS)
    text = "methods (NAME, or NAME:key=value,... with its settings):\n"
    text += "\n".join(f"  {m.name:<{width}}  {m.title}" for m in METHODS)
    default = parser.get_default("methods")
    if default is not None:
        text += "\n\ndefault --methods:\n" + "\n".join(f"  {m}" for m in str(default).split(";"))
    return text


class HelpWithMethods(argparse.Action):
    """``-h``/``--help`` that also lists the registered explanation methods (read only now: the registry imports
    torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show this help message (and the explanation methods) and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = _method_table(parser)
        parser.print_help()
        parser.exit()


def parent_parser() -> argparse.ArgumentParser:
    """The options of ``analyze`` and ``evaluate``, declared once (their subparsers take it as a parent)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-h", "--help", action=HelpWithMethods)
    p.add_argument("images", nargs="+", type=Path,
                   help="image files, folders (searched recursively) or .txt/.lst/.list files listing paths")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--model", default=setting("model"),
                   help="'default' (the embedded DINOv2 ViT-S/14), a timm model name, a checkpoint file, a folder "
                        "saved by Hugging Face transformers (or hf:owner/name on the Hub), or an open_clip model "
                        "clip:NAME/TAG (pip install 'vitviz[clip]')")
    p.add_argument("--arch", default=None, help="timm architecture of a checkpoint file that does not name it")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="CLIP models (--model clip:NAME/TAG, e.g. clip:ViT-B-32/openai): explain the cosine of the "
                        "image's embedding with this text prompt's, e.g. 'a dog'")
    p.add_argument("--prompts", default=None, metavar="NAMES",
                   help="CLIP models: zero-shot predictions over these comma-separated class names, each read as 'a "
                        "photo of a NAME.', or 'imagenet' (ImageNet-1k's names); without --prompt the top "
                        "prediction's prompt is explained")
    p.add_argument("--patch-size", type=int, default=setting("patch_size"),
                   help="patch size (default: the model's own)")
    p.add_argument("--img-size", type=int, default=setting("img_size"), help="input size in px (default %(default)s)")
    p.add_argument("--fit", choices=FITS, default=setting("fit"), metavar="FIT",  # a metavar: no choices read here
                   help="%(choices)s: centre crop (timm eval) or the whole image (default %(default)s)")
    p.add_argument("--device", default=setting("device"), help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps")
    p.add_argument("--precision", default=setting("precision"), help="auto, fp32, fp16 or bf16 (GPU only)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images decoded and shared out together; analyze runs them in one pass (default: 16 on "
                        "GPU, 1 on CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes per rank, 0 = decode in the main process (default: 0 when the pass runs "
                        f"on the CPU, else up to {GPU_WORKERS})")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_DIST_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others (default one day)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: this machine's cores divided by the processes "
                        "torchrun starts on it, at least 1; results are bit-identical only between runs with "
                        "the same count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def threads(asked: int | None) -> int:
    """``--threads``, else the cores shared among this machine's ranks (LOCAL_WORLD_SIZE under torchrun)."""
    from ..device import cpu_threads

    return asked if asked is not None else cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every :class:`Lazy` default read (after parsing, before a run)."""
    for key, value in vars(args).items():
        if isinstance(value, Lazy):
            setattr(args, key, value.get())
    return args


def check_common(args: argparse.Namespace) -> None:
    """The shared options that argparse cannot check alone, refused before any model is opened."""
    if not args.dist_timeout > 0:
        raise VitvizError(f"the distributed timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.batch_size is not None and args.batch_size < 1:
        raise VitvizError(f"batch size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise VitvizError(f"workers must be 0 or more, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise VitvizError(f"threads must be at least 1, got {args.threads}")


@dataclass(frozen=True)
class Prompts:
    """``--prompt`` and ``--prompts`` of a CLIP model, resolved once: the model, the prompt target, the classes."""

    clip: object  # vitviz.models.clip.ClipModel
    target: object | None  # the --prompt target (vitviz.targets.Target), None without --prompt
    classes: tuple[str, ...]  # --prompts' class names; () without


def prompts(args: argparse.Namespace) -> Prompts | None:
    """``--prompt``/``--prompts`` checked and their text embedded: a CLIP model only. None for another model."""
    from ..models.clip import is_clip_name, load_clip

    if args.prompt is None and args.prompts is None and not is_clip_name(args.model):
        return None
    if not is_clip_name(args.model):
        raise VitvizError("--prompt and --prompts need a CLIP model: use --model clip:NAME/TAG, e.g. "
                          "clip:ViT-B-32/openai (pip install 'vitviz[clip]')")
    clip = load_clip(str(args.model).strip())
    target = None
    if args.prompt is not None:
        from ..targets import prompt_target

        target = prompt_target(clip.text, args.prompt)
    return Prompts(clip, target, _classes(args.prompts))


def _classes(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    if text.strip().lower() == "imagenet":
        from ..models.clip import imagenet_classes

        return imagenet_classes()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise VitvizError("--prompts needs class names separated by commas, e.g. 'cat,dog,car', or 'imagenet'")
    return names


def image_prompt(found: Prompts | None, model, x, target="auto") -> tuple[object, tuple]:
    """The target to explain on image ``x`` (1, 3, H, W) and its zero-shot predictions: --prompt's target, else the
    top prediction's prompt with --prompts, else ``target`` (a CLIP model's ``auto``: its embedding, for its head is
    no classifier); the predictions () without --prompts."""
    if found is None:
        return target, ()
    if target == "auto":
        target = "embedding"
    predictions = ()
    if found.classes:
        import torch

        from ..models.clip import DEFAULT_TEMPLATE, zero_shot

        with torch.inference_mode():
            embedding = model(x)[0]
        predictions = zero_shot(found.clip, embedding, found.classes)
    if found.target is not None or not predictions:
        return found.target or target, predictions
    from ..targets import prompt_target

    return prompt_target(found.clip.text, DEFAULT_TEMPLATE.format(predictions[0].name)), predictions


def parse_methods(names: list[str]) -> list:
    """``names`` (``NAME`` or ``NAME:key=value,...``) as :class:`vitviz.explain.Method`: a bad one fails here, before
    any model is opened, with the library's one sentence naming the known methods."""
    from ..explain.registry import Method

    return [Method.parse(name) for name in names]


def batch_size(asked: int | None, device: str) -> int:
    return asked if asked is not None else (1 if device == "cpu" else 16)


def workers(asked: int | None, device: str) -> int:
    """On the CPU the pass already keeps every core busy and decoding is a small part of it: decode in the main
    process (benchmarks/results-distributed.md: no gain from a worker on 2 cores). A GPU waits on decoding instead:
    up to GPU_WORKERS per rank, sharing the cores among the ranks of this machine."""
    if asked is not None:
        return asked
    if device == "cpu":
        return 0
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(GPU_WORKERS, (os.cpu_count() or 1) // ranks_here - 1))


def collect(args: argparse.Namespace, world) -> list:
    """The run's inputs, listed once by rank 0 and sent to the others, so every rank shares out the same list."""
    from ..inputs.folders import collect_inputs, items_for
    from .distributed import broadcast, wait_all

    found: tuple[list, str | None] = ([], None)
    if world.main:
        try:
            found = (collect_inputs(args.images, exclude=args.out), None)
        except VitvizError as exc:
            found = ([], str(exc))  # sent on, so that every rank stops with it
    wait_all(world, timeout_s=args.dist_timeout)
    paths, error = broadcast(found, world)
    if error:
        raise VitvizError(error)
    if not paths:
        raise VitvizError("no images found in the given paths")
    return items_for(paths)


def progress(total: int, quiet: bool, world):
    """A progress bar on stderr (rank 0 only), or None."""
    if quiet or total <= 1 or not world.main:
        return None
    from tqdm import tqdm

    desc = f"rank 0 of {world.size}" if world.distributed else None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, desc=desc)


_HINTS = (  # (error class, words in its message, the flags a terminal user gives for what the message asks)
    (CheckpointError, "architecture", "use --arch NAME"),
    (ModelUnavailableError, "checkpoint file", "use --model default or --model FILE"),
    (ResourceError, "patch size", "use --patch-size P or --img-size S"),
)


def for_terminal(exc: Exception) -> str:
    """The library's message worded for a terminal user: this machine rather than "this server", and the flags to
    use where the message says what to change."""
    text = str(exc).replace("this server", "this machine")
    for kind, words, hint in _HINTS:
        if isinstance(exc, kind) and words in text:
            return f"{text.rstrip('.')} — {hint}"
    return text
