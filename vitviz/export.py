"""What vitviz writes: the ``.npz`` array format (one for the app's download and the CLI) and atomic file writes.

Every file vitviz writes goes through :func:`write_atomic`: a private temp file in the destination folder, then
``os.replace``, so a reader (or an interrupted run) never sees a half-written file under the final name, and the temp
file is removed when anything fails, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXPORT_SETTINGS", "ATTENTION_MAP_KEY", "export_arrays", "npz_bytes", "read_attention_map", "write_atomic",
           "write_atomic_group", "write_npz"]

# the settings every export records as arrays of their own (besides the full JSON under ``settings``)
EXPORT_SETTINGS = ("start_layer", "end_layer", "head_fusion", "discard_ratio")
# the CLS-attention map the settings select (rollout, or one layer's raw attention), and what it is; files written
# before 0.3 kept it under "rollout" whatever it was
ATTENTION_MAP_KEY = "attention_map"
_OLD_ATTENTION_MAP_KEY = "rollout"


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = _temp_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _temp_copy(path: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are recorded and delivered after it, to the handlers there were.

    A Python handler, not a blocked signal mask: a mask holds back only the calling thread, and the kernel hands a
    process's signal to any thread that does not block it (torch's, a DataLoader's), whose arrival Python then acts
    on in the main thread at once. Off the main thread (no handlers can be set there) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: got.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(got):
            signal.raise_signal(s)  # now handled as it would have been: KeyboardInterrupt, the CLI's stop, ...


_HELD = (signal.SIGINT, signal.SIGTERM)


def write_atomic_group(files: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Write several files as one: every temp file first, then the renames with SIGINT and SIGTERM held back (in
    the main thread), so an interrupted run leaves all of them or none under their final names."""
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            temps[Path(path)] = _temp_copy(Path(path), data)
        with _signals_held():
            for path, tmp in temps.items():
                os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)  # only those not renamed (on failure) still exist
    return list(temps)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` of ``arrays``, in memory."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    return write_atomic(path, npz_bytes(arrays))


def read_attention_map(arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The CLS-attention map of an ``.npz`` written by any version (``attention_map``, before 0.3 ``rollout``)."""
    for key in (ATTENTION_MAP_KEY, _OLD_ATTENTION_MAP_KEY):
        if key in arrays:
            return arrays[key]
    return None


def export_arrays(res: Any, heat: np.ndarray, *, settings: Mapping[str, Any], attention: bool = False,
                  extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one :class:`~vitviz.analysis.Analysis` and the CLS-attention map ``heat`` drawn from it (the
    rollout, or one layer's raw attention: ``attention_map_kind``), as saved in ``.npz``.

    ``settings`` holds what produced ``heat`` (at least :data:`EXPORT_SETTINGS`; ``view`` "rollout" or "raw"); it is
    stored as JSON under ``settings`` and those four also as arrays of their own. ``extra`` adds named arrays (an
    explanation map, ...).
    """
    missing = [k for k in EXPORT_SETTINGS if k not in settings]
    assert not missing, f"export settings lack {missing}"
    info = res.info
    arrays = dict(
        attention_map=np.asarray(heat, dtype=np.float32),
        attention_map_kind=np.array(str(settings.get("view", "rollout"))),
        **({} if res.pos_sim is None else {"pos_sim": res.pos_sim.astype(np.float32)}),  # none without pos_embed
        grid=np.array(info.grid, dtype=np.int32),
        patch_size=np.int32(info.patch_size),
        img_size=np.array(info.img_size, dtype=np.int32),
        num_prefix_tokens=np.int32(info.num_prefix_tokens),
        box=np.array(res.box, dtype=np.float64),
        pixels=res.pixels,
        start_layer=np.int32(settings["start_layer"]),
        end_layer=np.int32(settings["end_layer"]),
        head_fusion=np.array(str(settings["head_fusion"])),
        discard_ratio=np.float32(settings["discard_ratio"]),
        model=np.array(info.name),
        settings=np.array(json.dumps(dict(settings), default=str)),
    )
    if attention:
        arrays["attention"] = res.attention
    arrays.update(extra or {})
    return arrays
