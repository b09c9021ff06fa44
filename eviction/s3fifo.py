"""S3-FIFO (Yang et al., SOSP'23), as libCacheSim ``S3FIFO`` (its current S3FIFO.c)."""

from __future__ import annotations

from collections import OrderedDict

from eviction.base import EvictionPolicy, Key


class S3FIFOPolicy(EvictionPolicy):
    """A small FIFO (10%), a main FIFO (90%, 2-bit CLOCK) and a ghost FIFO (90%, keys only).

    New keys enter the small queue, or the main queue if they are in the ghost. Evicting
    from small: a key hit at least ``move_to_main_threshold`` (2) times moves to main,
    otherwise it is evicted into the ghost. Evicting from main: a key with a non-zero
    counter is reinserted with ``min(freq, 3) - 1``, otherwise evicted. Main is evicted
    when it is over its share or small is empty. libCacheSim details kept in ``request``:
    until the first eviction, keys overflowing the small queue go to main; an object as
    large as the small queue is not admitted (so with fewer than 10 unit-size blocks
    nothing is cached by ``request``; the tier path always admits, see ``_on_insert``).

    Complexity: insert/access/remove O(1); evict amortised O(1) (each move to main or
    reinsertion consumes counter units paid by hits); pinned keys are rotated, O(1 + p).
    """

    name = "s3fifo"

    def __init__(self, capacity: int, *, small_size_ratio: float = 0.1, ghost_size_ratio: float = 0.9,
                 move_to_main_threshold: int = 2, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        # libCacheSim refuses a configuration whose small queue is 0 (capacity < 10 units);
        # we give it one unit instead so tiny tiers still cache. Identical otherwise.
        self._small_cap = max(int(self.capacity * small_size_ratio), min(1, self.capacity - 1))
        self._main_cap = self.capacity - self._small_cap
        self._ghost_cap = int(self.capacity * ghost_size_ratio)
        self._threshold = move_to_main_threshold
        self._small: OrderedDict[Key, int] = OrderedDict()  # key -> size; first = oldest
        self._main: OrderedDict[Key, int] = OrderedDict()
        self._ghost: OrderedDict[Key, int] = OrderedDict()
        self._s_small = self._s_main = self._s_ghost = 0
        self._freq: dict[Key, int] = {}
        self._has_evicted = False

    # -- pieces --------------------------------------------------------------------------
    def _ghost_add(self, key: Key, size: int) -> None:
        g = self._ghost
        if key in g or size > self._ghost_cap:
            return
        while self._s_ghost + size > self._ghost_cap:
            self._s_ghost -= g.popitem(last=False)[1]
        g[key] = size
        self._s_ghost += size

    def _ghost_take(self, key: Key) -> bool:
        s = self._ghost.pop(key, None)
        if s is None:
            return False
        self._s_ghost -= s
        return True

    def _evict_small(self) -> Key:
        small, main, freq, pins = self._small, self._main, self._freq, self._pins
        spins = 0
        while small:
            key = next(iter(small))
            s = small.pop(key)
            self._s_small -= s
            if freq[key] >= self._threshold or key in pins:
                main[key] = s
                self._s_main += s
                freq[key] = 0
                spins += 1
            else:
                self._ghost_add(key, s)
                del freq[key]
                return key
        return self._evict_main(allow_small=False) if spins or self._main else None  # type: ignore[return-value]

    def _evict_main(self, allow_small: bool = True) -> Key:
        main, freq, pins = self._main, self._freq, self._pins
        rotations = 0
        limit = 4 * len(main) + 4
        while main:
            key = next(iter(main))
            f = freq[key]
            if key in pins:
                main.move_to_end(key)
                rotations += 1
                if rotations > limit:
                    break
            elif f >= 1:
                main.move_to_end(key)
                freq[key] = min(f, 3) - 1
            else:
                self._s_main -= main.pop(key)
                del freq[key]
                return key
        if allow_small and self._small:
            return self._evict_small()
        raise AssertionError("unreachable: base checked for an unpinned key")

    def _evict(self) -> Key:
        self._has_evicted = True
        if self._s_main > self._main_cap or self._s_small == 0:
            return self._evict_main()
        return self._evict_small()

    # -- simulator path (libCacheSim semantics) -------------------------------------------
    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        freq = self._freq
        f = freq.get(key)
        if f is not None:
            freq[key] = f + 1
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        hit_on_ghost = self._ghost_cap > 0 and self._ghost_take(key)
        if size > self._small_cap or size > self.capacity:
            return False
        sizes = self._sizes
        cap = self.capacity
        while self.used + size > cap:
            self.used -= sizes.pop(self._evict())
        if hit_on_ghost:
            self._main[key] = size
            self._s_main += size
        else:
            if size >= self._small_cap:
                return False
            if not self._has_evicted and self._s_small >= self._small_cap:
                self._main[key] = size
                self._s_main += size
            else:
                self._small[key] = size
                self._s_small += size
        freq[key] = 0
        sizes[key] = size
        self.used += size
        return False

    # -- tier-manager path ------------------------------------------------------------------
    def _on_insert(self, key, size, cost, parent) -> None:
        if self._ghost_take(key) or size >= self._small_cap or (
                not self._has_evicted and self._s_small >= self._small_cap):
            self._main[key] = size
            self._s_main += size
        else:
            self._small[key] = size
            self._s_small += size
        self._freq[key] = 0

    def _on_access(self, key) -> None:
        self._freq[key] += 1

    def _on_remove(self, key) -> None:
        del self._freq[key]
        s = self._small.pop(key, None)
        if s is not None:
            self._s_small -= s
        else:
            self._s_main -= self._main.pop(key)

    def _evict_one(self) -> Key:
        return self._evict()

    def _check(self) -> None:
        super()._check()
        assert not (set(self._small) & set(self._main))
        assert set(self._small) | set(self._main) == set(self._sizes) == set(self._freq)
        assert self._s_small == sum(self._small.values())
        assert self._s_main == sum(self._main.values())
        assert all(self._sizes[k] == s for q in (self._small, self._main) for k, s in q.items())
        assert self._s_ghost == sum(self._ghost.values()) <= max(self._ghost_cap, 0)
        assert not (set(self._ghost) & set(self._sizes))
