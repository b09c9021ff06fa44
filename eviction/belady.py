"""Belady's MIN: evict the key whose next access is farthest (offline; needs the future)."""

from __future__ import annotations

import heapq

from eviction.base import EvictionPolicy, Key

NEVER = float("inf")


class BeladyPolicy(EvictionPolicy):
    """Offline optimal for unit sizes (and libCacheSim ``Belady`` for any sizes: always
    admits, evicts the farthest next access; keys never accessed again go first).

    The simulator passes ``next_access`` (position of the key's next access in the trace,
    ``None``/inf for never). Through the tier-manager API there is no future, so keys
    inserted by ``insert`` count as never re-accessed.

    Structure: a max-heap on next access with lazy deletion. Complexity: insert/access
    O(log n); evict amortised O(log n); remove O(1) (lazy).
    """

    name = "belady"
    offline = True

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._next: dict[Key, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._stamp = 0
        self._pending: float = NEVER

    def _push(self, key: Key, nxt: float) -> None:
        self._stamp += 1
        self._next[key] = (nxt, self._stamp)
        heapq.heappush(self._heap, (-nxt, self._stamp, key))
        if len(self._heap) > 2 * len(self._next) + 64:
            self._heap = [(-n, s, k) for k, (n, s) in self._next.items()]
            heapq.heapify(self._heap)

    def _on_insert(self, key, size, cost, parent) -> None:
        self._push(key, self._pending)

    def _on_access(self, key) -> None:
        self._push(key, self._pending)

    def _on_remove(self, key) -> None:
        del self._next[key]

    def _evict_one(self) -> Key:
        heap, nxt, pins = self._heap, self._next, self._pins
        held = []
        try:
            while True:
                n, s, key = heapq.heappop(heap)
                cur = nxt.get(key)
                if cur is None or cur[1] != s:
                    continue
                if key in pins:
                    held.append((n, s, key))
                    continue
                del nxt[key]
                return key
        finally:
            for e in held:
                heapq.heappush(heap, e)

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        self._pending = NEVER if next_access is None or next_access < 0 else next_access
        try:
            return super().request(key, size, cost, parent, next_access)
        finally:
            self._pending = NEVER

    def _check(self) -> None:
        super()._check()
        assert set(self._next) == set(self._sizes)
