"""The inputs of a dataset-scale run: which files, under which output names, decoded where, batched how.

``collect_inputs`` turns what the user typed (image files, folders searched recursively, text files listing paths)
into one ordered list; every process of a distributed run derives the same list, names (``output_stems``) and
chunks (``chunks``) from it, so outputs are named and batched the same whatever the number of processes.

Decoding runs in :class:`torch.utils.data.DataLoader` worker processes (``loader``), so the model never waits on
JPEG decoding: a worker hands back a :class:`Decoded` per input, which holds the image, or the reason it could not
be read (a bad file never kills a worker), or what ``skip`` returned for it (e.g. the summary row of an output a
resumed run keeps).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.data import DataLoader, Dataset

from ..errors import VitvizError
from . import image as _image  # looked up at call time, so a test can stand a slow decoder in for load_image
from .image import IMAGE_SUFFIXES, LoadedImage

__all__ = ["LIST_SUFFIXES", "Item", "Decoded", "collect_inputs", "output_stems", "items_for", "chunks",
           "group_by", "InputDataset", "loader"]

LIST_SUFFIXES = (".txt", ".lst", ".list")  # a file given with one of these lists paths, one a line

T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One input of the run: its place in the run's input order, its path as given, and its output stem."""

    index: int
    path: Path
    stem: str


@dataclass(frozen=True)
class Decoded:
    """What a worker made of one :class:`Item`: exactly one of ``image``, ``error`` and ``kept`` is set."""

    item: Item
    image: LoadedImage | None = None
    error: str | None = None  # why it could not be read, for a person (no exception class names)
    kept: Any = None  # what ``skip`` returned: the input needs no pass


def _folder_images(root: Path, exclude: Path | None) -> list[Path]:
    """Image files under ``root``, recursively, in sorted order; symlinked folders are not followed (no loops)."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if exclude is None or not _same(Path(here, d), exclude))
        for name in sorted(files):
            p = Path(here, name)
            # dangling links are kept so that they are reported, never skipped in silence
            if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink()):
                found.append(p)
    return found


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _listed(listing: Path) -> list[Path]:
    """Paths in a list file, one a line (relative ones from the list's folder); blanks and ``#`` lines skipped."""
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VitvizError(f"cannot read the list of paths '{listing}': {exc}") from exc
    lines = (line.strip() for line in text.splitlines())
    return [listing.parent / line for line in lines if line and not line.startswith("#")]


def collect_inputs(paths: Sequence[Path], *, exclude: Path | None = None) -> list[Path]:
    """Image paths in order: files as given, folders expanded recursively (sorted), list files (``.txt``, ``.lst``,
    ``.list``) replaced by the paths they list (folders among them expanded too).

    Missing paths are kept, so that they are reported; a path given twice is kept once (its first place). A folder
    ``exclude`` (the output folder) met inside a searched folder is not searched: outputs are never read back.
    """
    expanded: list[Path] = []
    for p in map(Path, paths):
        if p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            expanded += _listed(p)
        else:
            expanded.append(p)
    found: list[Path] = []
    for p in expanded:
        found += _folder_images(p, exclude) if p.is_dir() else [p]
    seen: set[str] = set()
    unique = []
    for p in found:
        key = os.path.abspath(p)  # 'a/../b.jpg' and 'b.jpg' are one input
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Output stems, unique even when inputs share a name (a.jpg and a.png, two folders, or an 'a-2.jpg' too)."""
    used: set[str] = set()
    out = []
    for p in paths:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.stem) or "image"
        name, n = stem, 1
        while name.lower() in used:  # lower: case-insensitive file systems
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        out.append(name)
    return out


def items_for(paths: Sequence[Path]) -> list[Item]:
    return [Item(i, p, s) for i, (p, s) in enumerate(zip(paths, output_stems(paths), strict=True))]


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive runs of ``size`` items: the unit a distributed run shares out, so that every image meets the same
    batch companions (and gets the same numbers) whatever the number of processes."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def group_by(values: Iterable[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """``values`` grouped by ``key``, groups in the order of their first member, members in their own order."""
    groups: dict[Hashable, list[T]] = {}
    for v in values:
        groups.setdefault(key(v), []).append(v)
    return list(groups.values())


def _reason(exc: Exception) -> str:
    if isinstance(exc, VitvizError):
        return str(exc)
    return f"cannot be decoded ({exc or type(exc).__name__})"


class InputDataset(Dataset):
    """``Decoded`` records of ``items``, made in DataLoader workers; ``skip(item)`` (if given, picklable) is asked
    first and an input it returns something for is not decoded."""

    def __init__(self, items: Sequence[Item], *, skip: Callable[[Item], Any] | None = None):
        self.items = list(items)
        self.skip = skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        item = self.items[i]
        kept = self.skip(item) if self.skip is not None else None
        if kept is not None:
            return Decoded(item, kept=kept)
        try:
            return Decoded(item, image=_image.load_image(item.path, name=item.path.name))
        except Exception as exc:  # a bad file is that file's failure, reported; it must not end the worker
            return Decoded(item, error=_reason(exc))


def loader(batches: Sequence[Sequence[Item]], *, workers: int = 0, skip: Callable[[Item], Any] | None = None,
           prefetch: int = 4) -> DataLoader:
    """A DataLoader yielding one ``list[Decoded]`` per batch of ``batches``, in order, decoded by ``workers``
    processes (0: in this process) that each run ``prefetch`` batches ahead.

    No more workers than there are batches to overlap with the pass: one batch (or none) is decoded right here.
    """
    if workers < 0:
        raise VitvizError(f"workers must be 0 or more, got {workers}")
    workers = min(workers, max(len(batches) - 1, 0))
    flat = [item for batch in batches for item in batch]
    sampler, start = [], 0
    for batch in batches:
        sampler.append(list(range(start, start + len(batch))))
        start += len(batch)
    return DataLoader(InputDataset(flat, skip=skip), batch_sampler=sampler, collate_fn=list, num_workers=workers,
                      prefetch_factor=prefetch if workers else None)
