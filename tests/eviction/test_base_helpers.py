"""A policy that only states its order (``_victims``) or its priority (``PriorityPolicy``)
gets the base's victim search: pinned keys skipped in place, never chosen, nothing else."""

from __future__ import annotations

import pytest

from eviction.base import EvictionPolicy, NoVictimError, PriorityPolicy


class MRU(EvictionPolicy):
    """Most recently used first: a policy that is nothing but its order."""

    name = "mru-test"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: dict = {}

    def _on_insert(self, key, size, cost, parent) -> None:
        self._order[key] = None

    def _on_access(self, key) -> None:
        del self._order[key]
        self._order[key] = None

    def _on_remove(self, key) -> None:
        del self._order[key]

    def _victims(self):
        return reversed(self._order)


class BySize(PriorityPolicy):
    """Smallest first; equal sizes go in the order their priority was set."""

    name = "bysize-test"

    def _on_insert(self, key, size, cost, parent) -> None:
        self._set_priority(key, size)

    def _on_access(self, key) -> None:
        self._set_priority(key, self._sizes[key])

    def _on_remove(self, key) -> None:
        self._forget(key)


def test_an_order_only_policy_skips_pinned_keys_and_keeps_their_place():
    p = MRU(10)
    for k in "abcd":
        p.insert(k)
    p.pin("d")
    p.pin("c")
    assert p.evict() == "b"           # d and c are newer but pinned
    p.unpin("c")
    assert p.evict() == "c"           # c kept its place: it is the newest unpinned
    p.unpin("d")
    assert p.evict() == "d"
    assert p.evict() == "a"
    with pytest.raises(NoVictimError):
        p.evict()
    p._check()


def test_every_resident_key_pinned_is_no_victim_and_changes_nothing():
    p = MRU(10)
    for k in "ab":
        p.insert(k)
        p.pin(k)
    with pytest.raises(NoVictimError):
        p.evict()
    assert set(p._order) == {"a", "b"} and p.used == 2


def test_a_priority_policy_evicts_the_lowest_unpinned_priority_ties_oldest_first(rng):
    p = BySize(1000)
    sizes = {f"k{i}": rng.randint(1, 4) for i in range(40)}
    for k, s in sizes.items():
        p.insert(k, s)
    pinned = set(rng.sample(sorted(sizes), 10))
    for k in pinned:
        p.pin(k)
    expected = sorted((k for k in sizes if k not in pinned), key=lambda k: (sizes[k], int(k[1:])))
    got = [p.evict() for _ in expected]
    assert got == expected
    with pytest.raises(NoVictimError):
        p.evict()
    p._check()
    assert set(p._sizes) == pinned   # pinned entries were pushed back, still evictable later
    for k in pinned:
        p.unpin(k)
    assert sorted(p.evict() for _ in pinned) == sorted(pinned)
