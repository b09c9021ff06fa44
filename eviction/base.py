"""The contract every eviction policy implements.

A policy tracks *resident* keys (hashable, opaque) with a size and an optional cost, and
answers one question: which resident key goes next. It never owns data. Two callers drive
it:

* the tier manager (``kvstore``), which moves the bytes itself: it calls :meth:`insert`,
  :meth:`access`, :meth:`remove`, and :meth:`evict` when it needs room, and pins keys
  whose blocks are being read so they are never chosen;
* the trace simulator, which calls :meth:`request` -- a whole cache step (hit, or miss
  followed by evictions and admission) with the semantics of libCacheSim's ``get``.

The base class keeps the bookkeeping every policy shares (sizes, used bytes, pin counts)
so a concrete policy is little more than its ordering; subclasses implement the ``_on_*``
hooks and :meth:`_evict_one`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
import time
from typing import ClassVar

Key = Hashable


class NoVictimError(RuntimeError):
    """Raised when every resident key is pinned (or the policy is empty)."""


class EvictionPolicy(ABC):
    """Base of all policies. ``capacity`` is in the same unit as the sizes (bytes or blocks).

    Subclasses must keep every hook O(1) or O(log n) amortised and say which in their
    docstring. ``clock`` is injectable (a zero-argument callable returning seconds) for
    policies that use wall time; none of the classic ones do.
    """

    name: ClassVar[str] = ""

    def __init__(self, capacity: int, *, clock: Callable[[], float] | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.used = 0
        self._sizes: dict[Key, int] = {}
        self._pins: dict[Key, int] = {}
        self._clock = clock or time.monotonic

    # -- queries -----------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def size_of(self, key: Key) -> int:
        return self._sizes[key]

    def is_pinned(self, key: Key) -> bool:
        return key in self._pins

    # -- tier-manager API --------------------------------------------------------------
    def insert(self, key: Key, size: int = 1, cost: float | None = None,
               parent: Key | None = None) -> None:
        """Make ``key`` resident. Does not evict: the caller makes room first.

        ``parent`` is the key this one extends (the previous block of a prefix chain);
        policies that do not use structure ignore it.
        """
        if key in self._sizes:
            raise KeyError(f"key already resident: {key!r}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self._sizes[key] = size
        self.used += size
        self._on_insert(key, size, cost, parent)

    def access(self, key: Key) -> None:
        """Record a hit on a resident key."""
        if key not in self._sizes:
            raise KeyError(key)
        self._on_access(key)

    def remove(self, key: Key) -> None:
        """Forget a resident key without recording it as evicted (no ghost entry)."""
        size = self._sizes.pop(key)
        self.used -= size
        self._pins.pop(key, None)
        self._on_remove(key)

    def evict(self) -> Key:
        """Choose a victim among unpinned resident keys, drop it and return it."""
        if len(self._pins) >= len(self._sizes):
            raise NoVictimError("no evictable key: all resident keys are pinned"
                                if self._sizes else "no evictable key: policy is empty")
        key = self._evict_one()
        size = self._sizes.pop(key)
        self.used -= size
        return key

    def pin(self, key: Key) -> None:
        """Protect a resident key from eviction; pins nest (counted)."""
        if key not in self._sizes:
            raise KeyError(key)
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        n = self._pins.get(key)
        if n is None:
            raise KeyError(f"key not pinned: {key!r}")
        if n == 1:
            del self._pins[key]
        else:
            self._pins[key] = n - 1

    # -- simulator API -----------------------------------------------------------------
    def request(self, key: Key, size: int = 1, cost: float | None = None,
                parent: Key | None = None, next_access: float | None = None) -> bool:
        """One cache request with libCacheSim semantics; returns True on a hit.

        On a miss, an object larger than the whole cache is not admitted; otherwise keys
        are evicted until it fits, then it is inserted. ``next_access`` is only used by
        offline policies (Belady).
        """
        if key in self._sizes:
            self.access(key)
            return True
        if size > self.capacity:
            return False
        while self.used + size > self.capacity:
            self.evict()
        self.insert(key, size, cost, parent)
        return False

    # -- hooks -------------------------------------------------------------------------
    @abstractmethod
    def _on_insert(self, key: Key, size: int, cost: float | None, parent: Key | None) -> None: ...

    @abstractmethod
    def _on_access(self, key: Key) -> None: ...

    @abstractmethod
    def _on_remove(self, key: Key) -> None: ...

    @abstractmethod
    def _evict_one(self) -> Key:
        """Remove the victim from the policy's own structures and return it.

        Must skip pinned keys (``self._pins``); the base guarantees one unpinned key exists.
        """

    def _check(self) -> None:
        """Assert the shared invariants; subclasses extend with their own."""
        assert self.used == sum(self._sizes.values()), "used out of sync with sizes"
        assert all(k in self._sizes for k in self._pins), "pin on a non-resident key"
        assert all(n > 0 for n in self._pins.values()), "non-positive pin count"
