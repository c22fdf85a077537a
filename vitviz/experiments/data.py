"""Labelled images for training and probing: scikit-learn's bundled handwritten digits, or the user's own folder (one
sub-folder per class) or zip of one, each image fitted to the model's input as the analysis fits it.

A zip is untrusted input (the app takes uploads) and is never extracted to disk: its members are read in memory, each
within the image upload limit, all together within a budget, with names that stay inside the archive (no absolute
paths, no ``..``), no links, and at most ``MAX_IMAGES`` images. Every image goes through
:func:`vitviz.inputs.image.load_image`'s checks (size, pixels, decoding memory).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ImageError, ModelError, ParameterError
from ..inputs.fit import fit_image
from ..inputs.image import IMAGE_SUFFIXES, MAX_UPLOAD_BYTES, load_image
from ..models.checkpoints import MAX_CLASS_NAME_CHARS

__all__ = ["Labelled", "MAX_IMAGES", "MAX_ZIP_BYTES", "MAX_ZIP_MEMBERS", "digits", "labelled_images", "split"]

MAX_IMAGES = 2000  # images in one labelled folder or zip: the fitted pixels of 2000 images at 224 px are 300 MB
MAX_ZIP_BYTES = 1000 * 10**6  # all members of a zip together, uncompressed
MAX_ZIP_MEMBERS = 10_000  # entries of any kind (folders, other files) in a zip's directory
MAX_CLASSES = 1000
TRAIN_EXTRA = "pip install vitviz[train]"


@dataclass(frozen=True)
class Labelled:
    """Images fitted to one input size, their class indices and the class names (in index order)."""

    pixels: np.ndarray  # (N, H, W, 3) uint8: exactly what the model sees
    labels: np.ndarray  # (N,) int64 class indices
    class_names: tuple[str, ...]
    name: str  # where the images came from, for messages and reports ("digits", a folder's name)

    @property
    def digest(self) -> str:
        """sha256 of the pixels and labels: what a cache of features keyed by the images keys on."""
        h = hashlib.sha256(self.pixels.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()


def _fit(image, *, img_size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    return fit_image(image, input_size=(img_size, img_size), fit="crop", crop_pct=crop_pct,
                     interpolation=interpolation).pixels


def digits(*, img_size: int = 32, crop_pct: float = 0.9, interpolation: str = "bicubic",
           limit: int | None = None) -> Labelled:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, classes "0" to "9"; offline), white ink on
    black, each 8x8 image fitted to ``img_size`` px like any image (timm's eval crop). ``limit``: the first N."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModelError("the digits data set comes with scikit-learn, which is not installed: "
                         f"{TRAIN_EXTRA}") from None
    from PIL import Image

    bunch = load_digits()
    images, target = bunch.images[:limit], bunch.target[:limit]
    gray = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values 0..16 -> 0..255
    pixels = np.stack([_fit(Image.fromarray(g).convert("RGB"), img_size=img_size, crop_pct=crop_pct,
                            interpolation=interpolation) for g in gray])
    return Labelled(pixels, np.asarray(target, dtype=np.int64), tuple(str(d) for d in range(10)), "digits")


def split(labels: np.ndarray, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: (train indices, validation indices); every class with two or more images gives
    about ``val_fraction`` of them (at least one) to validation."""
    if not 0 < val_fraction < 1:
        raise ParameterError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0 if len(idx) < 2 else max(1, round(len(idx) * val_fraction))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member may not be read, or None."""
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
        return f"the path {name[:80]!r} leads outside the archive"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"{name[:80]!r} is a link"
    if info.file_size > MAX_UPLOAD_BYTES:
        return (f"{name[:80]!r} is {info.file_size / 1e6:.0f} MB; an image may have at most "
                f"{MAX_UPLOAD_BYTES // 10**6} MB")
    return None


def _image_path(parts: tuple[str, ...]) -> bool:
    """Whether a member's path is an image of a class (not hidden, not macOS's resource forks)."""
    return (len(parts) >= 2 and not any(p.startswith((".", "__MACOSX")) for p in parts)
            and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES)


def _zip_entries(archive: zipfile.ZipFile, name: str) -> list[tuple[tuple[str, ...], Callable[[], bytes]]]:
    """(path parts, read) of each image of a zip, every entry checked from its directory before any is inflated."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise ImageError(f"{name!r} lists {len(infos):,} entries; a labelled zip may have at most {MAX_ZIP_MEMBERS:,}")
    total = sum(i.file_size for i in infos)
    if total > MAX_ZIP_BYTES:
        raise ImageError(f"{name!r} would expand to {total / 1e6:,.0f} MB; at most {MAX_ZIP_BYTES // 10**6:,} MB")
    problems = [p for i in infos if (p := _zip_problem(i))]
    if problems:
        raise ImageError(f"{name!r} was refused: {problems[0]}")

    def reader(info: zipfile.ZipInfo) -> Callable[[], bytes]:
        def read() -> bytes:
            with archive.open(info) as f:  # at most the declared size is inflated, its CRC checked
                return f.read(MAX_UPLOAD_BYTES + 1)
        return read

    return [(PurePosixPath(i.filename).parts, reader(i)) for i in infos if not i.is_dir()]


def _folder_entries(root: Path) -> list[tuple[tuple[str, ...], Path]]:
    if not root.is_dir():
        raise ImageError(f"{root.name!r} is neither a folder nor a .zip file")
    return [(p.relative_to(root).parts, p) for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]


def _by_class(entries: list) -> tuple[tuple[str, ...], list[tuple[int, object]]]:
    """Class names (sorted sub-folder names) and (class index, source) per image. A zip of a folder holds
    ``folder/class/image``: the one folder every path starts with is dropped."""
    entries = [(parts, src) for parts, src in entries if _image_path(parts)]
    while entries and all(len(p) > 2 for p, _ in entries) and len({p[0] for p, _ in entries}) == 1:
        entries = [(p[1:], src) for p, src in entries]
    names = tuple(sorted({p[0] for p, _ in entries}))
    index = {n: i for i, n in enumerate(names)}
    return names, [(index[p[0]], src, p[-1]) for p, src in sorted(entries, key=lambda e: e[0])]


def _check_classes(names: tuple[str, ...], items: list, what: str) -> None:
    if len(names) < 2:
        raise ImageError(f"{what} holds {len(names)} class folder(s) with images; a classifier needs at least two: "
                         "one sub-folder per class, each with its images")
    if len(names) > MAX_CLASSES:
        raise ImageError(f"{what} holds {len(names):,} class folders; at most {MAX_CLASSES:,}")
    if len(items) > MAX_IMAGES:
        raise ImageError(f"{what} holds {len(items):,} images; at most {MAX_IMAGES:,} are read")
    long = [n for n in names if len(n) > MAX_CLASS_NAME_CHARS]
    if long:
        raise ImageError(f"{what}: the class folder name {long[0][:40]!r}... is longer than "
                         f"{MAX_CLASS_NAME_CHARS} characters")


def labelled_images(
        source: str | os.PathLike | bytes,
        *,
        img_size: int,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        name: str | None = None,
) -> Labelled:
    """The images of a folder with one sub-folder per class (its name is the class name), or of a zip of one (a path
    or its bytes), each fitted to ``img_size`` px as the analysis fits it (timm's eval crop). ``name`` names the
    source in messages (an upload's file name)."""
    if isinstance(source, bytes):
        what = repr(name or "the zip")
        with _open_zip(source, what) as archive:
            return _read(_zip_entries(archive, what), what, img_size, crop_pct, interpolation)
    path = Path(source)
    what = repr(name or path.name)
    if path.suffix.lower() == ".zip" and path.is_file():
        with _open_zip(path, what) as archive:
            return _read(_zip_entries(archive, what), what, img_size, crop_pct, interpolation)
    return _read(_folder_entries(path), what, img_size, crop_pct, interpolation)


def _open_zip(source: Path | bytes, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ImageError(f"{what} is not a readable zip archive ({exc})") from exc


def _read(entries: list, what: str, img_size: int, crop_pct: float, interpolation: str) -> Labelled:
    names, items = _by_class(entries)
    _check_classes(names, items, what)
    pixels, labels = [], []
    for label, src, file_name in items:
        image = load_image(src if isinstance(src, Path) else src(), name=file_name).image
        pixels.append(_fit(image, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation))
        labels.append(label)
    return Labelled(np.stack(pixels), np.array(labels, dtype=np.int64), names, what.strip("'"))
