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
and the victim search, so a concrete policy is little more than its ordering (as in SGLang,
where a policy is its priority). Subclasses implement the ``_on_*`` hooks and one of:

* :meth:`_victims` -- the resident keys coldest first; the base takes the first unpinned
  one (:meth:`_first_unpinned`) and drops it with :meth:`_on_evict` (LRU, FIFO, LFU, ARC);
* :class:`PriorityPolicy` -- a priority per key; the lowest unpinned one goes (GDSF, Belady);
* :meth:`_evict_one` itself, where the walk changes what it walks over (second chances in
  CLOCK, SIEVE and S3-FIFO, LIRS's stack pruning, ``kv``'s tree).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
import heapq
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

    def _victims(self) -> Iterable[Key]:
        """Resident keys in eviction order, coldest first, pinned ones included (skipped by
        :meth:`_evict_one`). Lazy: only the prefix up to the victim is walked."""
        raise NotImplementedError(f"{type(self).__name__} defines neither _victims nor _evict_one")

    def _on_evict(self, key: Key) -> None:
        """Drop the chosen victim from the policy's own structures. Default: as
        :meth:`remove` does; policies that remember victims (ghosts) override it."""
        self._on_remove(key)

    def _first_unpinned(self, order: Iterable[Key]) -> Key | None:
        """The first key of ``order`` that is not pinned, or None. O(1 + p), p = pinned
        keys passed over (they are skipped in place, so pinning never reorders)."""
        pins = self._pins
        for key in order:
            if key not in pins:
                return key
        return None

    def _evict_one(self) -> Key:
        """Remove the victim from the policy's own structures and return it: by default the
        first unpinned key of :meth:`_victims`, dropped by :meth:`_on_evict`.

        An override must skip pinned keys (``self._pins``); the base guarantees one
        unpinned key exists.
        """
        key = self._first_unpinned(self._victims())
        if key is None:
            raise AssertionError("unreachable: base checked for an unpinned key")
        self._on_evict(key)
        return key

    def _check(self) -> None:
        """Assert the shared invariants; subclasses extend with their own."""
        assert self.used == sum(self._sizes.values()), "used out of sync with sizes"
        assert all(k in self._sizes for k in self._pins), "pin on a non-resident key"
        assert all(n > 0 for n in self._pins.values()), "non-positive pin count"


class PriorityPolicy(EvictionPolicy):
    """A policy that is its priority: the unpinned key with the lowest priority goes first,
    ties to the key whose priority was set earliest.

    Subclasses call :meth:`_set_priority` from their hooks and :meth:`_forget` from
    ``_on_remove``; ``_prio[key]`` is ``(priority, stamp)``. Structure: a binary heap of
    ``(priority, stamp, key)`` with lazy deletion (an entry is live only if it equals
    ``_prio[key]``), rebuilt when stale entries outnumber live ones. Complexity: set
    O(log n); forget O(1) (lazy); evict amortised O(log n), plus p log n for pinned keys
    popped and pushed back.
    """

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._stamp = 0
        self._prio: dict[Key, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, Key]] = []

    def _set_priority(self, key: Key, priority: float) -> None:
        self._stamp += 1
        self._prio[key] = (priority, self._stamp)
        heapq.heappush(self._heap, (priority, self._stamp, key))
        if len(self._heap) > 2 * len(self._prio) + 64:
            self._heap = [(p, s, k) for k, (p, s) in self._prio.items()]
            heapq.heapify(self._heap)

    def _forget(self, key: Key) -> None:
        del self._prio[key]

    def _evict_one(self) -> Key:
        """Pop the lowest live unpinned entry; pinned ones are pushed back unchanged."""
        heap, prio, pins = self._heap, self._prio, self._pins
        held = []
        try:
            while True:
                p, s, key = heapq.heappop(heap)
                cur = prio.get(key)
                if cur is None or cur[1] != s:
                    continue  # stale
                if key in pins:
                    held.append((p, s, key))
                    continue
                self._on_evict(key)
                return key
        finally:
            for e in held:
                heapq.heappush(heap, e)

    def _check(self) -> None:
        super()._check()
        assert set(self._prio) == set(self._sizes), "priorities out of sync with residents"
        live = {(p, s, k) for k, (p, s) in self._prio.items()}
        assert live <= set(self._heap), "a live priority is missing from the heap"
