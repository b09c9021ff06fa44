"""Adaptive Replacement Cache (Megiddo & Modha, FAST'03), as libCacheSim ``ARC``.

Sizes are counted in the capacity unit (bytes or blocks) for all four lists, as
libCacheSim does, so with unit sizes this is the published algorithm.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import chain

from eviction.base import EvictionPolicy, Key


class ARCPolicy(EvictionPolicy):
    """T1 (seen once), T2 (seen twice+), ghosts B1/B2, and the adaptive target ``p`` for T1.

    Each list is an ``OrderedDict`` key -> size, first item = LRU end.
    ``request`` follows libCacheSim exactly (float ``p``, delta = ratio of ghost sizes,
    REPLACE's tie rule, its handling of variable sizes). The tier-manager path does the
    same bookkeeping but learns of ghost hits at ``insert`` (the store evicts before it
    inserts) and skips pinned keys when replacing.

    Complexity: every operation O(1) amortised (ghost trimming pops at most what inserts
    pushed); evict O(1 + p) with p pinned keys skipped at the LRU end of a list.
    """

    name = "arc"

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._t1: OrderedDict[Key, int] = OrderedDict()
        self._t2: OrderedDict[Key, int] = OrderedDict()
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._s_t1 = self._s_t2 = self._s_b1 = self._s_b2 = 0
        self.p = 0.0
        self._in_b1 = self._in_b2 = False
        self._n_req = 0
        self._vtime_ghost = -1

    # -- shared pieces ------------------------------------------------------------------
    def _ghost_hit(self, key: Key) -> bool:
        """Adapt ``p`` for a request of a ghost key and drop it from its ghost list."""
        if key in self._b1:
            self._in_b1, self._in_b2 = True, False
            delta = max(self._s_b2 / self._s_b1, 1)
            self.p = min(self.p + delta, self.capacity)
            self._s_b1 -= self._b1.pop(key)
            return True
        if key in self._b2:
            self._in_b1, self._in_b2 = False, True
            delta = max(self._s_b1 / self._s_b2, 1)
            self.p = max(self.p - delta, 0)
            self._s_b2 -= self._b2.pop(key)
            return True
        return False

    def _hit(self, key: Key) -> None:
        s = self._t1.pop(key, None)
        if s is not None:
            self._s_t1 -= s
            self._s_t2 += s
            self._t2[key] = s
        else:
            self._t2.move_to_end(key)

    def _to_ghost(self, from_t1: bool, key: Key) -> None:
        if from_t1:
            s = self._t1.pop(key)
            self._s_t1 -= s
            self._b1[key] = s
            self._s_b1 += s
        else:
            s = self._t2.pop(key)
            self._s_t2 -= s
            self._b2[key] = s
            self._s_b2 += s

    def _replace_from_t1(self) -> bool:
        return (self._s_t1 > 0 and (self._s_t1 > self.p or (self._s_t1 == self.p and self._in_b2))) \
            or self._s_t2 == 0

    # -- libCacheSim-exact simulator path -------------------------------------------------
    def _lcs_replace(self) -> Key:
        if self._replace_from_t1():
            key = next(iter(self._t1))
            self._to_ghost(True, key)
        else:
            key = next(iter(self._t2))
            self._to_ghost(False, key)
        return key

    def _lcs_evict(self, size: int) -> Key:
        c = self.capacity
        if self._vtime_ghost == self._n_req and (self._in_b1 or self._in_b2):
            return self._lcs_replace()
        if self._s_t1 + self._s_b1 + size > c:
            if self._s_b1 > 0:
                k, s = self._b1.popitem(last=False)
                self._s_b1 -= s
                return self._lcs_replace()
            key, s = self._t1.popitem(last=False)
            self._s_t1 -= s
            return key
        if self._s_t1 + self._s_b1 + self._s_t2 + self._s_b2 >= 2 * c and self._s_b2 > 0:
            k, s = self._b2.popitem(last=False)
            self._s_b2 -= s
        return self._lcs_replace()

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        self._n_req += 1
        sizes = self._sizes
        if key in sizes:
            self._in_b1 = self._in_b2 = False
            self._hit(key)
            return True
        if key in self._b1 or key in self._b2:
            self._vtime_ghost = self._n_req
            self._ghost_hit(key)
        if size > self.capacity:
            return False
        cap = self.capacity
        while self.used + size > cap:
            k = self._lcs_evict(size)
            self.used -= sizes.pop(k)
        if self._vtime_ghost == self._n_req and (self._in_b1 or self._in_b2):
            self._t2[key] = size
            self._s_t2 += size
            self._in_b1 = self._in_b2 = False
            self._vtime_ghost = -1
        else:
            self._t1[key] = size
            self._s_t1 += size
        sizes[key] = size
        self.used += size
        return False

    # -- tier-manager path ------------------------------------------------------------------
    def _on_insert(self, key, size, cost, parent) -> None:
        if self._ghost_hit(key):
            self._t2[key] = size
            self._s_t2 += size
        else:
            self._in_b1 = self._in_b2 = False
            self._t1[key] = size
            self._s_t1 += size
        c = self.capacity
        while self._s_t1 + self._s_b1 > c and self._b1:
            self._s_b1 -= self._b1.popitem(last=False)[1]
        while self._s_t1 + self._s_b1 + self._s_t2 + self._s_b2 > 2 * c and self._b2:
            self._s_b2 -= self._b2.popitem(last=False)[1]

    def _on_access(self, key) -> None:
        self._in_b1 = self._in_b2 = False
        self._hit(key)

    def _on_remove(self, key) -> None:
        s = self._t1.pop(key, None)
        if s is not None:
            self._s_t1 -= s
        else:
            self._s_t2 -= self._t2.pop(key)

    def _victims(self):
        """REPLACE's list first, then the other (when all of the first is pinned)."""
        first, second = (self._t1, self._t2) if self._replace_from_t1() else (self._t2, self._t1)
        return chain(first, second)

    def _on_evict(self, key) -> None:
        self._to_ghost(key in self._t1, key)

    def _check(self) -> None:
        super()._check()
        lists = (self._t1, self._t2, self._b1, self._b2)
        sums = (self._s_t1, self._s_t2, self._s_b1, self._s_b2)
        for lst, s in zip(lists, sums):
            assert sum(lst.values()) == s
        assert set(self._t1) | set(self._t2) == set(self._sizes)
        allkeys = [k for lst in lists for k in lst]
        assert len(allkeys) == len(set(allkeys)), "key in two ARC lists"
        assert 0 <= self.p <= self.capacity
