"""Greedy-Dual-Size-Frequency (libCacheSim ``GDSF``)."""

from __future__ import annotations

import heapq

from eviction.base import Key, PriorityPolicy

#: libCacheSim's numerator for an object of unknown cost.
DEFAULT_COST = 1.0e6


class GDSFPolicy(PriorityPolicy):
    """Priority ``H = L + freq * cost / size``; evicts the lowest H and sets L to it (aging).

    ``cost`` defaults to 1e6 per object (libCacheSim); a cost passed to ``insert`` is used
    instead, so recompute-expensive blocks live longer. Ties go to the key whose priority
    was set earliest (libCacheSim orders equal priorities by request time).

    Structure and complexity: :class:`~eviction.base.PriorityPolicy` (a lazy heap):
    insert/access O(log n); evict amortised O(log n) (+ p log n for pinned keys popped and
    pushed back); remove O(1) (lazy).
    """

    name = "gdsf"

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._L = 0.0
        self._freq: dict[Key, int] = {}
        self._cost: dict[Key, float] = {}

    def _on_insert(self, key, size, cost, parent) -> None:
        c = DEFAULT_COST if cost is None else float(cost)
        self._freq[key] = 1
        self._cost[key] = c
        self._set_priority(key, self._L + c / size)

    def _on_access(self, key) -> None:
        f = self._freq[key] + 1
        self._freq[key] = f
        self._set_priority(key, self._L + f * self._cost[key] / self._sizes[key])

    def _on_remove(self, key) -> None:
        self._forget(key)
        del self._freq[key], self._cost[key]

    def _on_evict(self, key) -> None:
        self._L = self._prio[key][0]
        self._on_remove(key)

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        """libCacheSim's GDSF order: insert first, then evict lowest priorities until the
        cache fits -- so a newcomer whose priority is the lowest is itself evicted."""
        if key in self._sizes:
            self._on_access(key)
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        cap = self.capacity
        if size > cap:
            return False
        sizes, heap, pri = self._sizes, self._heap, self._prio
        sizes[key] = size
        used = self.used + size
        self._on_insert(key, size, cost, parent)
        while used > cap:
            p, s, k = heapq.heappop(heap)
            cur = pri.get(k)
            if cur is None or cur[1] != s:
                continue
            self._L = p
            del pri[k], self._freq[k], self._cost[k]
            used -= sizes.pop(k)
        self.used = used
        return False

    def _check(self) -> None:
        super()._check()
        assert set(self._prio) == set(self._freq)
        assert all(p >= 0 for p, _ in self._prio.values())
