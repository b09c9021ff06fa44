from __future__ import annotations

import pytest

from allocator import OutOfSlotsError, SlotPool


def test_allocate_free_and_exhaustion():
    pool = SlotPool(3)
    slots = pool.allocate_many(3)
    assert sorted(slots) == [0, 1, 2] and pool.free_count == 0
    with pytest.raises(OutOfSlotsError, match="in use"):
        pool.allocate()
    pool.free(slots[1])
    assert pool.allocate() == slots[1]
    pool._check()


def test_allocate_many_is_all_or_nothing_and_contiguous_when_fresh():
    pool = SlotPool(8)
    assert pool.allocate_many(5) == [0, 1, 2, 3, 4]
    with pytest.raises(OutOfSlotsError):
        pool.allocate_many(4)
    assert pool.free_count == 3
    pool._check()


def test_refcount_keeps_slot_until_last_reference():
    pool = SlotPool(2)
    s = pool.allocate()
    pool.incref(s)
    assert not pool.decref(s)
    assert pool.free_count == 1
    assert pool.decref(s)
    assert pool.free_count == 2
    with pytest.raises(ValueError):
        pool.decref(s)
    with pytest.raises(ValueError):
        pool.incref(s)
    pool._check()


def test_free_of_shared_slot_is_refused():
    pool = SlotPool(1)
    s = pool.allocate()
    pool.incref(s)
    with pytest.raises(ValueError, match="refcount 2"):
        pool.free(s)


def test_seeded_stress_keeps_invariants(rng):
    pool = SlotPool(64)
    held: dict[int, int] = {}
    for _ in range(3000):
        op = rng.random()
        if op < 0.4 and pool.free_count:
            n = rng.randint(1, pool.free_count)
            for s in pool.allocate_many(n):
                assert s not in held
                held[s] = 1
        elif op < 0.6 and held:
            s = rng.choice(list(held))
            pool.incref(s)
            held[s] += 1
        elif held:
            s = rng.choice(list(held))
            held[s] -= 1
            freed = pool.decref(s)
            assert freed == (held[s] == 0)
            if not held[s]:
                del held[s]
        assert pool.used_count == len(held)
        pool._check()


def test_batched_refcounts_match_one_at_a_time(rng):
    from allocator import SlotPool

    a, b = SlotPool(32), SlotPool(32)
    sa, sb = a.allocate_many(20), b.allocate_many(20)
    assert sa == sb
    picks = [rng.choice(sa) for _ in range(40)]  # with repeats
    a.incref_many(picks)
    for s in picks:
        b.incref(s)
    assert [a.refcount(s) for s in range(32)] == [b.refcount(s) for s in range(32)]
    decs = picks + sa[:5]
    freed = a.decref_many(decs)
    want = [s for s in set(decs) if decs.count(s) == b.refcount(s)]  # the last reference goes
    for s in decs:
        b.decref(s)
    assert sorted(freed) == sorted(want) and a.free_count == b.free_count
    assert [a.refcount(s) for s in range(32)] == [b.refcount(s) for s in range(32)]
    with pytest.raises(ValueError):
        a.incref_many([sorted(set(range(32)) - set(sa))[0]])
    with pytest.raises(ValueError):
        a.decref_many(freed[:1] or [31])
    a._check()
