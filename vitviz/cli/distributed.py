"""Past one process: a run launched by ``torchrun`` shares its inputs out across ranks and merges what they did.

The launcher (``torchrun`` / ``python -m torch.distributed.run``) starts one process per device and tells each its
place through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``);
:func:`world_from_env` reads them, :func:`process_group` joins the ranks (gloo on the CPU; on CUDA NCCL for device
tensors and gloo beside it for the small Python objects this module sends). The work itself needs no communication:

- :func:`shard` deals items out round-robin: item ``i`` goes to rank ``i mod world``, so for a given input list and
  world size every input always lands on the same rank;
- each rank works through its share alone and keeps ``(index, result)`` pairs;
- :func:`gather` brings them to rank 0 and :func:`merge_indexed` puts them back in input order, refusing a merge
  where an index is missing or came twice (loudly: a partial result is never passed off as complete).

Waiting for the other ranks (:func:`wait_all`) polls a non-blocking collective from Python, so SIGINT/SIGTERM still
reach a rank that is waiting; :func:`interruptible` turns those signals into :class:`Interrupted` so that ``finally``
blocks run (and temp files are removed) and the rank exits with 128 + the signal number. A rank that dies is seen by
the launcher, which stops the others and exits non-zero.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["World", "Interrupted", "MergeError", "world_from_env", "backend_for", "local_device", "process_group",
           "shard", "wait_all", "broadcast", "gather", "merge_indexed", "rank_path", "interruptible"]

T = TypeVar("T")
_POLL_S = 0.05  # how often a waiting rank looks again; short enough for a prompt exit on a signal


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size``, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (also when it started only one process)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which (the exit code is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class MergeError(RuntimeError):
    """The ranks' parts do not add up to the whole run (an input missing or done twice): a bug or a lost rank."""


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The :class:`World` torchrun describes in ``environ``; a single process when it is not there."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return World()
    try:
        rank, size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise RuntimeError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    if not 0 <= rank < size:
        raise RuntimeError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank, size, local, launched=True)


def backend_for(device: str) -> str:
    """gloo on the CPU; NCCL for CUDA tensors with gloo beside it (object collectives then travel on the CPU)."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def local_device(device: str, world: World) -> str:
    """One GPU per process: plain ``cuda`` becomes this rank's ``cuda:LOCAL_RANK`` in a distributed run."""
    if device == "cuda" and world.launched:
        return f"cuda:{world.local_rank}"
    return device


@contextmanager
def process_group(world: World, *, device: str, timeout_s: float) -> Iterator[None]:
    """Joined to the other ranks inside the block (nothing to do for a single process); left on the way out.

    ``timeout_s`` bounds every collective, the final wait for the slowest rank included.
    """
    if not world.distributed:
        yield
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend_for(device), rank=world.rank, world_size=world.size,
                            timeout=timedelta(seconds=timeout_s))
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not interrupted:  # after an interrupt the peers may be gone: leave the group to process exit
            dist.destroy_process_group()


def shard(items: Sequence[T], *, rank: int, world: int) -> list[T]:
    """Round-robin share of ``items`` for ``rank`` of ``world``: items ``rank, rank + world, ...``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world} is not a rank")
    return list(items[rank::world])


def wait_all(world: World, *, timeout_s: float) -> None:
    """Return when every rank got here; signals are handled while waiting (the collective is polled)."""
    if not world.distributed:
        return
    import torch
    import torch.distributed as dist

    work = dist.all_reduce(torch.zeros(1), async_op=True)  # a CPU tensor: gloo, whatever the device backend
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {world.rank}: the other ranks did not arrive within {timeout_s:.0f} s")
        time.sleep(_POLL_S)
    work.wait()  # raises if the collective failed


def broadcast(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T, world: World) -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_indexed(parts: Iterable[Iterable[tuple[int, T]]], *, total: int) -> list[T]:
    """The values of ``(index, value)`` pairs from every rank, in index order; every index in ``range(total)``
    exactly once, else :class:`MergeError` naming the first missing or repeated index."""
    merged: dict[int, T] = {}
    for rank, part in enumerate(parts):
        for index, value in part:
            if not 0 <= index < total:
                raise MergeError(f"rank {rank} reported input {index}, outside the run's {total} inputs")
            if index in merged:
                raise MergeError(f"input {index} was reported twice (again by rank {rank})")
            merged[index] = value
    missing = [i for i in range(total) if i not in merged]
    if missing:
        raise MergeError(f"{len(missing)} of {total} inputs were reported by no rank (first: input {missing[0]})")
    return [merged[i] for i in range(total)]


def rank_path(path: Path, world: World) -> Path:
    """This rank's own file beside ``path``: ``summary.csv`` -> ``summary.rank1-of-4.csv``."""
    return path.with_name(f"{path.stem}.rank{world.rank}-of-{world.size}{path.suffix}")


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block; further ones are ignored while it cleans up
    (torchrun repeats the signal to its workers), so the summary of what finished still gets written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, _frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
