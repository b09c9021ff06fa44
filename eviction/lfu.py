"""Least frequently used (libCacheSim ``LFU``: ties go to the key that reached its count first)."""

from __future__ import annotations

from collections import OrderedDict
from itertools import chain

from sortedcontainers import SortedDict

from eviction.base import EvictionPolicy, Key


class LFUPolicy(EvictionPolicy):
    """Evicts the key with the fewest hits since insertion; among equals, the one whose
    count was reached earliest (FIFO inside a frequency bucket, as libCacheSim's LFU.c).
    Counts are not remembered after eviction: a re-inserted key starts at 1.

    Structure: ``SortedDict`` freq -> ``OrderedDict`` bucket of keys, only non-empty
    buckets kept, so the minimum frequency is ``peekitem(0)``.
    Complexity: insert O(1) (bucket 1 usually exists; O(log F) to create it); access
    O(log F) worst case (creating/dropping a bucket), O(1) otherwise; evict O(1 + p) plus
    O(log F) when a bucket empties; F = distinct live frequencies, p = pinned keys skipped.
    """

    name = "lfu"

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._freq: dict[Key, int] = {}
        self._buckets: SortedDict = SortedDict()

    def _on_insert(self, key, size, cost, parent) -> None:
        self._freq[key] = 1
        b = self._buckets.get(1)
        if b is None:
            b = self._buckets[1] = OrderedDict()
        b[key] = None

    def _on_access(self, key) -> None:
        buckets = self._buckets
        f = self._freq[key]
        self._freq[key] = f + 1
        b = buckets[f]
        del b[key]
        if not b:
            del buckets[f]
        nb = buckets.get(f + 1)
        if nb is None:
            nb = buckets[f + 1] = OrderedDict()
        nb[key] = None

    def _on_remove(self, key) -> None:
        f = self._freq.pop(key)
        b = self._buckets[f]
        del b[key]
        if not b:
            del self._buckets[f]

    def _victims(self):
        return chain.from_iterable(self._buckets.values())

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        if key in self._sizes:
            self._on_access(key)
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        cap = self.capacity
        if size > cap:
            return False
        sizes, buckets, freq = self._sizes, self._buckets, self._freq
        used = self.used + size
        while used > cap:
            f, b = buckets.peekitem(0)
            k, _ = b.popitem(last=False)
            if not b:
                del buckets[f]
            del freq[k]
            used -= sizes.pop(k)
        sizes[key] = size
        self.used = used
        self._on_insert(key, size, cost, parent)
        return False

    def _check(self) -> None:
        super()._check()
        assert set(self._freq) == set(self._sizes)
        n = 0
        for f, b in self._buckets.items():
            assert b, "empty bucket kept"
            for k in b:
                assert self._freq[k] == f
            n += len(b)
        assert n == len(self._freq)
