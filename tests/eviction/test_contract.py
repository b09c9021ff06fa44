"""One contract suite, run against every registered policy."""

from __future__ import annotations

import random

import pytest

from eviction import NoVictimError, make_policy
from eviction.registry import POLICIES, online

from .conftest import seeds

ALL = sorted(POLICIES)


@pytest.mark.parametrize("name", ALL)
def test_empty_cache(name):
    p = make_policy(name, 4)
    assert len(p) == 0 and p.used == 0
    with pytest.raises(NoVictimError):
        p.evict()
    p._check()


@pytest.mark.parametrize("name", ALL)
def test_registry_name_case_and_unknown(name):
    assert make_policy(name.upper(), 3).name == name
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("no-such-policy", 3)


@pytest.mark.parametrize("name", ALL)
def test_insert_access_remove_reinsert(name):
    p = make_policy(name, 10)
    for k in range(5):
        p.insert(k, size=2, parent=k - 1 if k else None)
    assert len(p) == 5 and p.used == 10
    with pytest.raises(KeyError):
        p.insert(3)
    p.access(2)
    p.remove(4)
    assert 4 not in p and p.used == 8
    p.insert(4, size=2, parent=3)
    assert 4 in p and p.used == 10
    with pytest.raises(KeyError):
        p.access(99)
    p._check()
    victims = [p.evict() for _ in range(5)]
    assert sorted(victims) == [0, 1, 2, 3, 4]
    assert len(p) == 0 and p.used == 0
    p._check()


@pytest.mark.parametrize("name", ALL)
def test_pinned_never_evicted_and_all_pinned(name):
    p = make_policy(name, 6)
    for k in range(6):
        p.insert(k, parent=k - 1 if k else None)
    for k in (0, 2, 4):
        p.pin(k)
    p.pin(2)  # pins nest
    out = {p.evict() for _ in range(3)}
    assert out == {1, 3, 5}
    with pytest.raises(NoVictimError):
        p.evict()
    p.unpin(2)
    with pytest.raises(NoVictimError):
        p.evict()  # still pinned once
    p.unpin(2)
    assert p.evict() == 2
    with pytest.raises(KeyError):
        p.unpin(2)
    p._check()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", seeds())
def test_stress_tier_manager_path(name, seed, seed_note):
    """Random insert/access/remove/evict/pin with mixed sizes, the way the store drives a
    policy; capacity is never exceeded, pinned keys never leave, invariants hold."""
    seed_note(seed)
    rng = random.Random(seed * 1000 + len(name))
    cap = 40
    p = make_policy(name, cap)
    pinned: dict[int, int] = {}
    last = None
    for step in range(1500):
        op = rng.random()
        key = rng.randrange(60)
        if key in p:
            if op < 0.5:
                p.access(key)
            elif op < 0.6 and key not in pinned:
                p.remove(key)
            elif op < 0.75:
                p.pin(key)
                pinned[key] = pinned.get(key, 0) + 1
            elif key in pinned:
                p.unpin(key)
                pinned[key] -= 1
                if not pinned[key]:
                    del pinned[key]
        else:
            size = rng.choice((1, 1, 2, 3, 5))
            while p.used + size > cap:
                try:
                    v = p.evict()
                except NoVictimError:
                    break
                assert v not in pinned, f"pinned key {v} evicted at step {step}"
                assert v not in p
            if p.used + size <= cap:
                parent = last if (last in p and rng.random() < 0.6) else None
                p.insert(key, size=size, parent=parent)
                last = key
        assert p.used <= cap
        if step % 50 == 0:
            p._check()
    p._check()
    assert all(k in p for k in pinned)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", seeds())
def test_stress_request_path(name, seed, seed_note):
    """The simulator path (``request``): capacity respected, invariants hold, and a hit is
    reported exactly when the key was resident."""
    seed_note(seed)
    rng = random.Random(seed)
    cap = rng.choice((7, 20, 64))
    p = make_policy(name, cap)
    size_of: dict[int, int] = {}
    for step in range(3000):
        k = int(rng.paretovariate(1.1)) % 150
        s = size_of.setdefault(k, rng.choice((1, 1, 2, 4)))
        was = k in p
        nxt = rng.randrange(step + 1, step + 500)
        hit = p.request(k, s, None, None, nxt)
        if not getattr(p, "quirks", 0):  # LIRS: libCacheSim corner cases, see LIRSPolicy
            assert hit == was
        assert p.used <= cap
        if step % 100 == 0:
            p._check()
    p._check()


@pytest.mark.parametrize("name", online())
def test_fast_request_path_equals_generic_path(name):
    """Each policy's inlined ``request`` gives the same hits and the same resident set as the
    base-class request built from access/evict/insert (where those are meant to agree)."""
    from eviction.base import EvictionPolicy

    if name in ("arc", "lirs", "s3fifo", "gdsf"):
        pytest.skip(f"{name}: request() follows libCacheSim's order (ghost hit before eviction, "
                    "or insert-then-evict), which the store's evict-then-insert path cannot see")
    if name == "kv":
        pytest.skip("kv: request() lets its experts see the missed key before the cache evicts "
                    "(the victim is one the followed expert dropped for it); the store's "
                    "evict-then-insert path evicts first (tests/eviction/test_kv.py compares them)")
    rng = random.Random(7)
    a, b = make_policy(name, 25), make_policy(name, 25)
    for _ in range(4000):
        k = int(rng.paretovariate(1.2)) % 120
        assert a.request(k, 1) == EvictionPolicy.request(b, k, 1)
    assert set(a._sizes) == set(b._sizes)
