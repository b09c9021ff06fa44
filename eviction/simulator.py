"""Trace-driven simulation of eviction policies (the engine behind ``kvstore simulate``).

Two metrics:

* ``block``: every access is a libCacheSim-style get; a hit is a hit.
* ``prefix``: a request (a run of chained blocks) scores only its leading run of hits,
  as a prefix cache serves it; every block is still accessed and inserted.

One (policy, capacity) pair is a job; jobs run in worker processes (fork: the trace is
inherited, not pickled), heaviest first. The per-access loop is a single bound-method
call (``policy.request``), which every policy implements as an inlined fast path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat

from eviction.registry import OFFLINE, make_policy
from eviction.traces import Trace

METRICS = ("block", "prefix")

#: relative cost per access, to start the slow jobs first
_WEIGHT = {"lirs": 3.0, "arc": 2.0, "s3fifo": 2.0, "kv": 3.0, "belady": 2.5, "gdsf": 2.0,
           "lfu": 1.5, "sieve": 1.2}


def simulate(trace: Trace, policy: str, capacity: int, metric: str = "block",
             **policy_kwargs) -> dict:
    """Run one policy at one capacity over ``trace``; returns a result row (docs/decisions.md).

    O(n) requests, each O(1)/O(log n) in the policy.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    pol = make_policy(policy, capacity, **policy_kwargs)
    req = pol.request
    keys = trace.keys
    sizes = trace.sizes if trace.sizes is not None else repeat(1)
    parents = trace.parents if trace.parents is not None else repeat(None)
    nexts = trace.next_access() if policy.lower() in OFFLINE else repeat(None)
    hits = 0
    if metric == "block":
        for k, s, p, n in zip(keys, sizes, parents, nexts):
            if req(k, s, None, p, n):
                hits += 1
    else:
        starts = trace.starts
        it = zip(keys, sizes, parents, nexts)
        for i in range(len(starts) - 1):
            run = True
            for _ in range(starts[i + 1] - starts[i]):
                k, s, p, n = next(it)
                if req(k, s, None, p, n):
                    if run:
                        hits += 1
                else:
                    run = False
    n_acc = len(keys)
    return {"policy": policy, "capacity": int(capacity), "accesses": n_acc, "hits": hits,
            "misses": n_acc - hits, "hit_ratio": hits / n_acc if n_acc else 0.0}


# -- parallel driver -------------------------------------------------------------------
_worker_trace: Trace | None = None  # set once per worker process by _init (fork-inherited)


def _init(trace: Trace) -> None:
    global _worker_trace
    _worker_trace = trace


def _job(args: tuple) -> tuple[int, dict, float]:
    idx, policy, capacity, metric = args
    t0 = time.perf_counter()
    assert _worker_trace is not None
    res = simulate(_worker_trace, policy, capacity, metric)
    return idx, res, time.perf_counter() - t0


def simulate_many(trace: Trace, policies: Sequence[str], capacities: Sequence[int],
                  metric: str = "block", jobs: int | None = None,
                  progress: Callable[[int, int, dict], None] | None = None) -> list[dict]:
    """Run every (policy, capacity) pair; results in (policy, capacity) order.

    ``jobs`` worker processes (default: the cores this process may run on; 1 runs in this process). ``progress``
    is called after each finished job with (done, total, result).
    """
    tasks = [(i, p, c, metric) for i, (p, c) in
             enumerate((p, c) for p in policies for c in capacities)]
    if any(p.lower() in OFFLINE for p in policies):
        trace.next_access()  # computed once, inherited by the workers
    order = sorted(tasks, key=lambda t: -_WEIGHT.get(t[1], 1.0) * (1 + 0.1 * (t[2] > 0)))
    results: list[dict | None] = [None] * len(tasks)
    jobs = jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    jobs = max(1, min(jobs, len(tasks)))
    done = 0
    if jobs == 1:
        _init(trace)
        iterator: Iterable = map(_job, order)
        pool = None
    else:
        ctx = mp.get_context("fork")
        pool = ctx.Pool(jobs, initializer=_init, initargs=(trace,))
        iterator = pool.imap_unordered(_job, order, chunksize=1)
    try:
        for idx, res, secs in iterator:
            res["seconds"] = round(secs, 3)
            results[idx] = res
            done += 1
            if progress is not None:
                progress(done, len(tasks), res)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        else:
            _init(None)  # type: ignore[arg-type]
    return [r for r in results if r is not None]
