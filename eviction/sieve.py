"""SIEVE (Zhang et al., NSDI'24), with libCacheSim ``Sieve``'s hand rules."""

from __future__ import annotations

from eviction.base import EvictionPolicy, Key


class SievePolicy(EvictionPolicy):
    """A FIFO list with a visited bit and a hand that sweeps from old to new.

    New keys enter at the head (newest end) with visited=0; a hit sets visited=1 and does
    not move the key. To evict, the hand (starting at the tail, or where it stopped last)
    clears visited bits while moving towards the head, wrapping to the tail, and evicts the
    first key whose bit is clear; the hand then rests on that key's newer neighbour.

    The list is two dicts of neighbour links (``_newer``/``_older``) because the hand needs
    O(1) unlink in the middle. Complexity: insert/access/remove O(1); evict amortised O(1)
    (each bit cleared was set by one hit); pinned keys are stepped over (O(p)).
    """

    name = "sieve"

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._newer: dict[Key, Key | None] = {}
        self._older: dict[Key, Key | None] = {}
        self._visited: dict[Key, int] = {}
        self._head: Key | None = None  # newest
        self._tail: Key | None = None  # oldest
        self._hand: Key | None = None

    # -- list plumbing -----------------------------------------------------------------
    def _link_head(self, key: Key) -> None:
        head = self._head
        self._older[key] = head
        self._newer[key] = None
        if head is not None:
            self._newer[head] = key
        else:
            self._tail = key
        self._head = key
        self._visited[key] = 0

    def _unlink(self, key: Key) -> None:
        newer = self._newer.pop(key)
        older = self._older.pop(key)
        del self._visited[key]
        if newer is None:
            self._head = older
        else:
            self._older[newer] = older
        if older is None:
            self._tail = newer
        else:
            self._newer[older] = newer

    # -- hooks -------------------------------------------------------------------------
    def _on_insert(self, key, size, cost, parent) -> None:
        self._link_head(key)

    def _on_access(self, key) -> None:
        self._visited[key] = 1

    def _on_remove(self, key) -> None:
        if key == self._hand:
            self._hand = self._newer[key]
        self._unlink(key)

    def _evict_one(self) -> Key:
        visited, newer, pins = self._visited, self._newer, self._pins
        obj = self._hand if self._hand is not None else self._tail
        steps = 0
        while visited[obj] or obj in pins:
            if obj not in pins:
                visited[obj] = 0
            nxt = newer[obj]
            obj = self._tail if nxt is None else nxt
            steps += 1
            assert steps <= 2 * len(visited) + 2, "no unpinned victim"
        self._hand = newer[obj]
        self._unlink(obj)
        return obj

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        visited = self._visited
        if key in visited:
            visited[key] = 1
            return True
        if self._pins:
            return super().request(key, size, cost, parent, next_access)
        cap = self.capacity
        if size > cap:
            return False
        sizes = self._sizes
        used = self.used + size
        if used > cap:
            newer = self._newer
            unlink = self._unlink
            obj = self._hand
            while used > cap:
                if obj is None:
                    obj = self._tail
                while visited[obj]:
                    visited[obj] = 0
                    obj = newer[obj]
                    if obj is None:
                        obj = self._tail
                nxt = newer[obj]
                unlink(obj)
                used -= sizes.pop(obj)
                obj = nxt
            self._hand = obj
        self._link_head(key)
        sizes[key] = size
        self.used = used
        return False

    def _check(self) -> None:
        super()._check()
        seen = []
        k = self._tail
        while k is not None:
            seen.append(k)
            k = self._newer[k]
        assert seen and seen[-1] == self._head or not seen and self._head is None
        assert len(seen) == len(self._sizes) and set(seen) == set(self._sizes)
        assert self._hand is None or self._hand in self._sizes
