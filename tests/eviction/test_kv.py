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


def _replay(tr, cap, **kw):
    p = make_policy("kv", cap, **kw)
    for k, parent in zip(tr.keys, tr.parents):
        p.request(k, 1, None, parent)
    p._check()
    return p


def test_experts_follow_the_workload(tmp_path):
    """Agentic sessions at a fifth of the working set: chain recency stays (no switch);
    at 2% the kv score earns the switch; generated chat ends on a kv-score expert."""
    from .slices import shipped

    tr = read_mooncake(shipped("agentic", tmp_path))
    ws = tr.working_set()[0]
    big = _replay(tr, int(ws * 0.2))
    assert big.expert == 1 and big.switches == 0, big.score
    small = _replay(tr, int(ws * 0.02))
    assert small.expert in (0, 2) and small.switches >= 1, small.score
    for seed in (11, 12):
        path = tmp_path / f"chat{seed}.jsonl"
        path.write_text("".join(json.dumps({"hash_ids": r}) + "\n"
                                for r in chat_requests(seed, n_conv=150, n_req=3000)))
        p = _replay(read_mooncake(path), 300)
        assert p.expert in (0, 2), (seed, p.score)
        d = p.score  # the expert followed is not significantly behind chain recency
        lead = d[1][p.expert] - d[p.expert][1]
        assert lead <= 0 or lead * lead <= 4 * (d[1][p.expert] + d[p.expert][1]), (seed, d)


def test_experts_off_is_expert_zero_alone():
    """``experts=False`` keeps no miniatures and no recency heap (the miniatures' own mode)."""
    p = make_policy("kv", 50, experts=False)
    for ids in chat_requests(4, n_req=200):
        prev = None
        for k in ids:
            p.request(k, 1, None, prev)
            prev = k
    assert p.expert == 0 and not p._minis and not p._rheap
    p._check()


_BYTES_RUN = """
from eviction import make_policy
from tests.eviction.conftest import chat_requests
p = make_policy("kv", 40, min_mini=0, sample=0.25)
out = []
for ids in chat_requests(5, n_req=400):
    prev = None
    for k in ids:
        key = k.to_bytes(16, "little")
        if key not in p:
            while p.used + 1 > p.capacity:
                out.append(p.evict())
            p.insert(key, 1, None, prev)
        else:
            p.access(key)
        prev = key
p._check()
assert sum(map(sum, p.score)) > 0, "the miniatures saw no sampled bytes key"
print(hash(b"x"), [v.hex() for v in out])
"""


def test_bytes_keys_sample_independently_of_the_hash_seed():
    """Store keys are digests: their sample must not depend on Python's hash seed, so
    processes with different seeds choose the same victims (tier-manager call order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    outs = []
    for hs in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        r = subprocess.run([sys.executable, "-c", _BYTES_RUN], cwd=root, env=env,
                           capture_output=True, text=True, timeout=120, check=True)
        outs.append(r.stdout.split(" ", 1))
    assert outs[0][0] != outs[1][0], "the two processes did not get different hash seeds"
    assert outs[0][1] == outs[1][1]
