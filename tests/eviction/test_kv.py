"""The KV-aware policy: chain structure respected, and better than the classics on
generated chat-like prefix workloads."""

from __future__ import annotations

import json

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


def _prefix_hits(p, requests) -> int:
    """Prefix hits of ``p`` over ``requests`` (block id lists), through ``request``."""
    hits = 0
    for ids in requests:
        run, prev = True, None
        for k in ids:
            run = p.request(k, 1, None, prev) and run
            hits += run
            prev = k
    return hits


def test_experts_follow_the_workload(tmp_path):
    """Agentic sessions: chain recency wins the race at 2% and 20% of the working set and
    the cache follows it; on generated chat a kv-score expert wins. The cache scores
    (almost) what the expert it follows scores: it converges to that expert's contents."""
    from .slices import shipped

    tr = read_mooncake(shipped("agentic", tmp_path))
    ws = tr.working_set()[0]
    for frac in (0.02, 0.2):
        p = _replay(tr, int(ws * frac))
        assert p.names[p.expert] == "chain-lru" and p.switches >= 1, (frac, p.score)
        lrui = p.names.index("chain-lru")
        assert all(p.score[lrui][j] > 0 for j in range(len(p.names)) if j != lrui), p.score
    for seed in (11, 12):
        reqs = chat_requests(seed, n_conv=150, n_req=3000)
        p = make_policy("kv", 300)
        hits = _prefix_hits(p, reqs)
        p._check()
        assert p.names[p.expert] in ("kv", "kv-quick", "kv-warm"), (seed, p.score)
        from eviction.kv import EXPERTS
        rule = {k: v for k, v in EXPERTS[p.names[p.expert]].items() if v is not None}
        alone = make_policy("kv", 300, experts=False, **rule,
                            **({"p0": 0.1} if p.names[p.expert] == "kv-quick" else {}))
        assert hits >= 0.99 * _prefix_hits(alone, reqs), seed


def test_a_half_size_probe_chooses_the_start(tmp_path):
    """A probe ensemble of half the capacity fills first and races the same experts; when
    the cache first evicts it starts on the expert the probe follows then, at no cost
    (until then it holds what every expert holds), and the probe is dropped. On the
    agentic slice at 20% of the working set the probe has left ``kv-lirs`` for chain-LRU
    by then, and that start scores more prefix hits than racing from ``kv-lirs``."""
    from .slices import shipped

    tr = read_mooncake(shipped("agentic", tmp_path))
    cap = int(tr.working_set()[0] * 0.2)
    p = make_policy("kv", cap)
    probe = p._probe
    assert probe is not None and probe.capacity == cap // 2 and probe._probe is None
    started = None
    hits = 0
    for r in range(len(tr.starts) - 1):
        run = True
        for i in range(tr.starts[r], tr.starts[r + 1]):
            run = p.request(tr.keys[i], 1, None, tr.parents[i]) and run
            hits += run
            if started is None and p._full:
                started = p.names[p.expert]
                assert p._probe is None and p.expert == probe.expert
                assert set(p._sizes) == set(p.shadows[p.expert]._sizes) and not p._surplus
                p._check()
    assert started == "chain-lru" and probe.switches >= 1, (started, probe.score)
    assert make_policy("kv", cap, probe=0.0)._probe is None
    cold = simulate(tr, "kv", cap, "prefix", probe=0.0)["hit_ratio"]
    assert hits / len(tr.keys) > cold, (hits / len(tr.keys), cold)


def test_experts_off_is_one_rule_alone():
    """``experts=False`` keeps no shadows; it evicts exactly as the ``kv`` expert inside an
    ensemble does on the same stream (the shadow is that policy)."""
    alone = make_policy("kv", 50, experts=False)
    team = make_policy("kv", 50)
    shadow = team.shadows[team.names.index("kv")]
    for ids in chat_requests(4, n_req=300):
        prev = None
        for k in ids:
            alone.request(k, 1, None, prev)
            team.request(k, 1, None, prev)
            prev = k
        assert set(alone._sizes) == set(shadow._sizes)
    assert alone.expert == 0 and not alone.shadows and alone.gone is None
    alone._check()
    team._check()


def test_unknown_expert_and_start_are_refused():
    with pytest.raises(ValueError, match="unknown kv expert"):
        make_policy("kv", 10, expert_names=("kv", "nope"))
    with pytest.raises(ValueError, match="start must be one of"):
        make_policy("kv", 10, expert_names=("kv", "chain-lru"), start="kv-lirs")
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="probe is a fraction"):
            make_policy("kv", 10, probe=bad)


@pytest.mark.parametrize("seed", seeds())
def test_store_call_order_stays_within_one_request_of_the_expert(seed, seed_note):
    """The store evicts before it inserts, so the cache cannot see the key its expert
    will drop for it: it evicts from its own order and catches up on the next miss. It
    ends holding what the expert it follows holds (to within one request's blocks), and
    the two call orders score about the same."""
    seed_note(seed)
    reqs = chat_requests(seed, n_conv=80, n_req=1500)
    fast = make_policy("kv", 120)
    fast_hits = _prefix_hits(fast, reqs)
    p = make_policy("kv", 120)
    hits = 0
    diffs = []  # cache vs followed expert, after each request
    for ids in reqs:
        run, prev = True, None
        for k in ids:
            if k in p:
                p.access(k)
                hits += run
            else:
                run = False
                while p.used + 1 > p.capacity:
                    p.evict()
                p.insert(k, 1, None, prev)
            prev = k
        held = p.shadows[p.expert]._sizes
        diffs.append(sum(1 for k in p._sizes if k not in held)
                     + sum(1 for k in held if k not in p._sizes))
    p._check()
    assert diffs[-1] <= 2 * (len(reqs[-1]) + 1), diffs[-10:]
    assert abs(hits - fast_hits) <= 0.01 * fast_hits, (hits, fast_hits)


_BYTES_RUN = """
from eviction import make_policy
from tests.eviction.conftest import chat_requests
p = make_policy("kv", 40)
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
assert any(map(any, p.score)), "the experts never disagreed"
print(hash(b"x"), p.switches, [v.hex() for v in out])
"""


def test_bytes_keys_choose_independently_of_the_hash_seed():
    """Store keys are digests: processes with different hash seeds must choose the same
    victims (tier-manager call order)."""
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
