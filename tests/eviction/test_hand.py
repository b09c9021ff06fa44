"""Small hand-computed sequences."""

from __future__ import annotations

import pytest

from eviction import make_policy

SEQ = [1, 2, 3, 3, 3, 3, 1, 4, 5, 6, 7, 8, 1]


def run(name, seq, cap=3):
    p = make_policy(name, cap)
    return [p.request(k) for k in seq], p


@pytest.mark.parametrize("name,last_hit", [("sieve", False), ("lru", False), ("lfu", True)])
def test_issue_sequence(name, last_hit):
    hits, _ = run(name, SEQ)
    assert hits[-1] is last_hit


def test_lru_exact_hits():
    hits, p = run("lru", SEQ)
    # 3,3,3 hit; 1 hits (resident); everything after 4 misses (each new key evicts the LRU)
    assert hits == [False, False, False, True, True, True, True] + [False] * 6
    assert set(p._sizes) == {7, 8, 1}


def test_fifo_ignores_hits():
    hits, p = run("fifo", [1, 2, 3, 1, 4, 1])
    assert hits == [False, False, False, True, False, False]  # 4 evicts 1 despite its hit


def test_sieve_keeps_visited_and_moves_hand():
    # 1,2,3 then hit 1; 4 arrives: hand starts at the tail (1, visited) -> clears it,
    # moves to 2 (unvisited) and evicts 2. 5 arrives: hand at 3 -> evicted.
    hits, p = run("sieve", [1, 2, 3, 1, 4, 5])
    assert hits == [False] * 3 + [True, False, False]
    assert set(p._sizes) == {1, 4, 5}


def test_clock_second_chance():
    hits, p = run("clock", [1, 2, 3, 1, 4])
    assert set(p._sizes) == {1, 3, 4}  # 1 had its bit set: reinserted, 2 went


def test_belady_is_optimal_on_small_sequence():
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    nxt = []
    for i, k in enumerate(seq):
        j = next((j for j in range(i + 1, len(seq)) if seq[j] == k), None)
        nxt.append(j)
    p = make_policy("belady", 3)
    hits = [p.request(k, 1, None, None, n) for k, n in zip(seq, nxt)]
    assert sum(not h for h in hits) == 7  # the textbook MIN answer for this string


def test_s3fifo_one_hit_wonders_go_to_ghost():
    p = make_policy("s3fifo", 100)  # small=10, main=90, ghost=90
    for k in range(120):
        p.request(k)
    assert 0 in p._ghost  # evicted from small without hits -> ghost
    p.request(0)  # ghost hit: admitted straight into main
    assert 0 in p._main


def test_lfu_tie_breaks_by_arrival_in_bucket():
    p = make_policy("lfu", 2)
    p.request("a"); p.request("b"); p.request("c")
    assert "a" not in p and "b" in p  # equal counts: the earliest to reach it goes


def test_arc_moves_second_hit_to_t2():
    p = make_policy("arc", 4)
    for k in (1, 2, 1):
        p.request(k)
    assert 1 in p._t2 and 2 in p._t1


def test_gdsf_prefers_small_objects():
    p = make_policy("gdsf", 10)
    p.request("big", 8); p.request("s1", 1); p.request("s2", 1)
    p.request("s3", 1)  # needs room: the big object has the lowest freq/size
    assert "big" not in p and {"s1", "s2", "s3"} <= set(p._sizes)


def test_s3fifo_libcachesim_small_queue_rule():
    # libCacheSim does not admit an object as large as the small queue: with unit sizes a
    # cache of 10..19 blocks (small queue of 1) admits nothing through request().
    p = make_policy("s3fifo", 15)
    assert not any(p.request(k % 3) for k in range(30)) and len(p) == 0
