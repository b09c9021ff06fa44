"""First in, first out (libCacheSim ``FIFO``)."""

from __future__ import annotations

from collections import OrderedDict

from eviction.base import EvictionPolicy, Key


class FIFOPolicy(EvictionPolicy):
    """Evicts the earliest inserted key; hits change nothing.

    Complexity: insert/access/remove O(1); evict O(1 + p), p = pinned keys at the old end
    (skipped in place). ``request`` is an inlined O(1) path (one call per request) for the
    simulator, identical in behaviour to the generic insert/evict path.
    """

    name = "fifo"

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._q: OrderedDict[Key, None] = OrderedDict()

    def _on_insert(self, key, size, cost, parent) -> None:
        self._q[key] = None

    def _on_access(self, key) -> None:
        pass

    def _on_remove(self, key) -> None:
        del self._q[key]

    def _victims(self):
        return iter(self._q)

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        sizes = self._sizes
        if key in sizes:
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        cap = self.capacity
        if size > cap:
            return False
        used = self.used + size
        q = self._q
        while used > cap:
            k, _ = q.popitem(last=False)
            used -= sizes.pop(k)
        q[key] = None
        sizes[key] = size
        self.used = used
        return False

    def _check(self) -> None:
        super()._check()
        assert list(self._q) == [k for k in self._q if k in self._sizes]
        assert set(self._q) == set(self._sizes)
