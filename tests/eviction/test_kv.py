"""The KV-aware policy: chain structure respected, and better than the classics on
generated chat-like prefix workloads."""

from __future__ import annotations

import json
import random

import pytest

from eviction import make_policy
from eviction.simulator import simulate
from eviction.traces import read_mooncake

from .conftest import chat_requests, seeds


def test_alias_and_leaf_first():
    p = make_policy("kvtree", 4)
    assert p.name == "kv"
    for k, parent in ((1, None), (2, 1), (3, 2), (4, 3)):
        p.insert(k, parent=parent)
    # only the leaf of the chain may go; then its parent, and so on
    assert [p.evict() for _ in range(4)] == [4, 3, 2, 1]


def test_pinned_leaf_protects_chain_then_falls_back():
    p = make_policy("kv", 3)
    for k, parent in ((1, None), (2, 1), (3, 2)):
        p.insert(k, parent=parent)
    p.pin(3)
    v = p.evict()  # the only leaf is pinned: an inner block must go rather than fail
    assert v in (1, 2) and 3 in p
    p._check()


@pytest.mark.parametrize("seed", seeds())
def test_never_breaks_a_chain_while_a_leaf_is_free(seed, seed_note):
    seed_note(seed)
    p = make_policy("kv", 30)
    parent_of = {}
    for ids in chat_requests(seed, n_req=300):
        prev = None
        for k in ids:
            parent_of[k] = prev
            if k not in p:
                while p.used + 1 > p.capacity:
                    v = p.evict()
                    assert not any(parent_of.get(c) == v for c in p._sizes), \
                        f"evicted {v} while a child of it was resident"
            p.request(k, 1, None, prev)
            prev = k
        p._check()


@pytest.mark.parametrize("seed", [11, 12])
def test_kv_beats_classics_on_generated_chat(tmp_path, seed):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"hash_ids": r}) + "\n"
                            for r in chat_requests(seed, n_conv=150, n_req=3000)))
    tr = read_mooncake(path)
    for cap in (100, 300):
        kv = simulate(tr, "kv", cap, "prefix")["hit_ratio"]
        best = max(simulate(tr, p, cap, "prefix")["hit_ratio"]
                   for p in ("lru", "fifo", "clock", "lfu", "arc", "s3fifo", "sieve", "lirs", "gdsf"))
        assert kv > best, f"cap={cap}: kv {kv:.4f} <= best classic {best:.4f}"


def test_broken_block_goes_first():
    """A block whose parent is not resident cannot be served as a prefix: first victim."""
    p = make_policy("kv", 10)
    p.insert(1)
    p.insert(2, parent=1)
    p.insert(7, parent=99)   # parent never seen: broken
    p.insert(8, parent=7)    # hangs off a broken block: broken too
    p.insert(3, parent=2)
    assert p.evict() == 8 and p.evict() == 7
    assert p.evict() == 3
    p._check()


def test_trace_generator_is_seeded_and_chained():
    from dataclasses import replace

    from eviction.kv_tracegen import PRESETS, generate

    for name, mix in PRESETS.items():
        small = replace(mix, duration_s=120.0)
        a, b = generate(small, 5), generate(small, 5)
        assert a == b and a, name
        ts = [r["timestamp"] for r in a]
        assert ts == sorted(ts)
        parent: dict = {}
        for r in a:  # equal ids mean equal prefixes: a block always has the same parent
            prev = None
            for h in r["hash_ids"]:
                assert parent.setdefault(h, prev) == prev, name
                prev = h


def test_kv_beats_lru_on_generated_mixes(tmp_path):
    from dataclasses import replace

    from eviction.kv_tracegen import PRESETS, generate, write

    for name in ("chat", "mixed"):
        path = tmp_path / f"{name}.jsonl"
        write(str(path), generate(replace(PRESETS[name], duration_s=600.0), 3))
        tr = read_mooncake(path)
        for cap in (300, 1000):
            kv = simulate(tr, "kv", cap, "prefix")["hit_ratio"]
            lru = simulate(tr, "lru", cap, "prefix")["hit_ratio"]
            assert kv > lru, f"{name} cap={cap}: kv {kv:.4f} <= lru {lru:.4f}"
