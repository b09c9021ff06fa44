"""Least recently used (libCacheSim ``LRU``)."""

from __future__ import annotations

from collections import OrderedDict

from eviction.base import EvictionPolicy, Key


class LRUPolicy(EvictionPolicy):
    """Evicts the least recently inserted-or-accessed key.

    Complexity: insert/access/remove O(1); evict O(1 + p) where p is the number of pinned
    keys at the cold end (they are skipped, not reordered, so pinning does not change
    recency). ``request`` is an inlined O(1) path for the simulator.
    """

    name = "lru"

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def _on_insert(self, key, size, cost, parent) -> None:
        self._order[key] = None

    def _on_access(self, key) -> None:
        self._order.move_to_end(key)

    def _on_remove(self, key) -> None:
        del self._order[key]

    def _victims(self):
        return iter(self._order)

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        sizes = self._sizes
        order = self._order
        if key in sizes:
            order.move_to_end(key)
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        cap = self.capacity
        if size > cap:
            return False
        used = self.used + size
        while used > cap:
            k, _ = order.popitem(last=False)
            used -= sizes.pop(k)
        order[key] = None
        sizes[key] = size
        self.used = used
        return False

    def _check(self) -> None:
        super()._check()
        assert set(self._order) == set(self._sizes)
