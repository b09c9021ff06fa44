"""CLOCK / FIFO-reinsertion (libCacheSim ``Clock``: 1-bit counter, objects enter at 0)."""

from __future__ import annotations

from collections import OrderedDict

from eviction.base import EvictionPolicy, Key


class ClockPolicy(EvictionPolicy):
    """FIFO queue with an n-bit reference counter per key.

    A hit raises the counter (saturating at ``2**n_bit_counter - 1``); eviction looks at the
    oldest key: a non-zero counter is decremented and the key is reinserted at the new end,
    a zero counter is evicted. Defaults are libCacheSim's (``init_freq=0``, 1 bit).

    Complexity: insert/access/remove O(1); evict amortised O(1): every reinsertion consumes
    one counter unit that a hit paid for (pinned keys are rotated without that cost, so
    O(1 + p) with p pinned keys).
    """

    name = "clock"

    def __init__(self, capacity: int, *, n_bit_counter: int = 1, init_freq: int = 0, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._max_freq = (1 << n_bit_counter) - 1
        self._init_freq = init_freq
        self._q: OrderedDict[Key, int] = OrderedDict()  # key -> counter; first = oldest

    def _on_insert(self, key, size, cost, parent) -> None:
        self._q[key] = self._init_freq

    def _on_access(self, key) -> None:
        f = self._q[key]
        if f < self._max_freq:
            self._q[key] = f + 1

    def _on_remove(self, key) -> None:
        del self._q[key]

    def _evict_one(self) -> Key:
        q, pins = self._q, self._pins
        spins = 0
        while True:
            key = next(iter(q))
            f = q[key]
            if key in pins:
                q.move_to_end(key)
                spins += 1
                assert spins <= 2 * len(q) * (self._max_freq + 1) + 2, "no unpinned victim"
            elif f >= 1:
                q[key] = f - 1
                q.move_to_end(key)
            else:
                del q[key]
                return key

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        q = self._q
        f = q.get(key)
        if f is not None:
            if f < self._max_freq:
                q[key] = f + 1
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        cap = self.capacity
        if size > cap:
            return False
        sizes = self._sizes
        used = self.used + size
        while used > cap:
            k = next(iter(q))
            f = q[k]
            if f >= 1:
                q[k] = f - 1
                q.move_to_end(k)
            else:
                del q[k]
                used -= sizes.pop(k)
        q[key] = self._init_freq
        sizes[key] = size
        self.used = used
        return False

    def _check(self) -> None:
        super()._check()
        assert set(self._q) == set(self._sizes)
        assert all(0 <= f <= self._max_freq for f in self._q.values())
