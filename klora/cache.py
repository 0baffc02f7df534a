"""The one small LRU mapping every in-memory cache of K-LoRA uses (scores, per-file statistics, prepared
factors, files read by the webui)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """A thread-safe mapping of at most ``size`` entries (0: keeps nothing), least recently used dropped
    first; ``on_evict(key, value)`` is called for each entry dropped by size, ``resize`` or ``clear``."""

    def __init__(self, size: int, on_evict: Callable[[Hashable, V], None] | None = None) -> None:
        self.size = max(int(size), 0)
        self._d: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.RLock()
        self._on_evict = on_evict
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._d.get(key)
            if value is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            self._shrink(self.size)

    def setdefault(self, key: Hashable, make: Callable[[], V]) -> V:
        """The entry for ``key`` (refreshed), made and stored if missing; with size 0 a new, unstored one."""
        with self._lock:
            value = self.get(key)
            if value is None:
                value = make()
                if self.size > 0:
                    self.put(key, value)
            return value

    def _shrink(self, size: int) -> None:
        while len(self._d) > size:
            key, value = self._d.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(key, value)

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = max(int(size), 0)
            self._shrink(self.size)

    def clear(self) -> None:
        with self._lock:
            self._shrink(0)
            self.hits = self.misses = 0

    def values(self) -> list[V]:
        with self._lock:
            return list(self._d.values())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        return len(self._d)
