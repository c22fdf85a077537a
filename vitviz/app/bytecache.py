"""A least-recently-used cache bounded by bytes, shared by every session's threads.

The app's decoded images differ in size by three orders of magnitude (a thumbnail: 100 kB; a 64-megapixel photo:
256 MB as RGB in PIL's 4-byte pixels), so a bound on the number of entries bounds nothing. This cache holds at most
``budget`` bytes: adding an entry evicts the least recently used ones until it fits, and an entry larger than the
whole budget is returned but not kept. One lock guards the table; a value is computed outside it, once per key even
when several threads ask for it at the same moment (the others wait for that result instead of decoding it again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ByteLRU"]

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """``get(key, make)``: the cached value for ``key``, else ``make()``'s, kept while the bytes allow.

    ``size(value)`` gives an entry's bytes; ``budget()`` the bytes allowed, read on every insertion (so an operator's
    setting, or a test's, takes effect without a restart). A failing ``make`` caches nothing: asking again retries.
    """

    def __init__(self, budget: Callable[[], int], size: Callable[[V], int]) -> None:
        self._budget, self._size = budget, size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._held = 0
        self._pending: dict[Hashable, threading.Lock] = {}

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._held = 0

    def _lookup(self, key: Hashable) -> tuple[bool, V | None]:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return False, None
            self._entries.move_to_end(key)
            return True, hit[0]

    def _insert(self, key: Hashable, value: V) -> None:
        nbytes = int(self._size(value))
        budget = int(self._budget())
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._held -= old[1]
            if nbytes > budget:  # larger than the whole cache: the caller has it, nobody keeps it
                return
            while self._entries and self._held + nbytes > budget:
                _key, (_value, freed) = self._entries.popitem(last=False)
                self._held -= freed
            self._entries[key] = (value, nbytes)
            self._held += nbytes

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        found, value = self._lookup(key)
        if found:
            return value  # type: ignore[return-value]
        with self._lock:
            gate = self._pending.setdefault(key, threading.Lock())
        try:
            with gate:  # one thread makes the value; the others find it in the cache when the gate opens
                found, value = self._lookup(key)
                if found:
                    return value  # type: ignore[return-value]
                value = make()
                self._insert(key, value)
                return value
        finally:
            with self._lock:
                if self._pending.get(key) is gate and not gate.locked():
                    del self._pending[key]
