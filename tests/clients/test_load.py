"""Load: 32 concurrent clients (threads; half on shared memory) do mixed put/get/lookup for
a bounded time against one sidecar whose cache is smaller than the working set, so blocks
are evicted and demoted throughout. Checks: every get returns exactly what was put or a
clean miss (no lost acknowledged data, no corruption), no tier ever over capacity, and
every client finishes within a deadline (no deadlock). Prints p50/p99 per op.

CI runs it for ~3 s; ``kvstore bench chaos`` and ``kvstore bench sidecar`` do the long runs.
"""

from __future__ import annotations

import random
import threading
import time

import torch

from clients import connect
from kvstore.errors import BlockNotFoundError
from tests.clients.conftest import BT, start_server
from tests.clients.test_sidecar_client import make_kv, wait_until

CLIENTS = 32
SECONDS = 3.0
SHARED = 4  # prompts every client puts with the same KV (dedup across clients)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def test_32_clients_mixed_ops(tmp_path, layout, seed):
    srv = start_server("tcp://127.0.0.1:*", tmp_path, scale=4, workers=4)
    shared = {i: (list(range(50_000 + 1000 * i, 50_000 + 1000 * i + 3 * BT)), make_kv(layout, 3 * BT, 9000 + i))
              for i in range(SHARED)}
    lat: dict[str, list[float]] = {"put": [], "get": [], "lookup": []}
    errors: list[str] = []
    counts = {"hits": 0, "misses": 0, "puts": 0}
    overruns: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        mine: dict[int, tuple[list[int], torch.Tensor]] = {}
        local = {"put": [], "get": [], "lookup": []}
        hits = misses = puts = 0
        try:
            with connect(srv.endpoint, layout=layout, namespace="load", block_tokens=BT, timeout=30,
                         shm=bool(i % 2)) as c:
                while not stop.is_set():
                    r = rng.random()
                    if r < 0.35:
                        if rng.random() < 0.3:
                            toks, kv = shared[rng.randrange(SHARED)]
                        else:
                            k = rng.randrange(6)
                            nb = rng.randint(1, 3)
                            # a prompt's KV is fixed: a shorter put is a prefix of the longer one
                            full = make_kv(layout, 3 * BT, seed + 7919 * i + k)
                            toks = [1_000_000 * (i + 1) + 100 * k + j for j in range(3 * BT)][:nb * BT]
                            kv = full[:, :, :nb * BT].contiguous()
                            mine[k] = (toks, kv)
                        t0 = time.perf_counter()
                        n = c.put(toks, kv)
                        local["put"].append(time.perf_counter() - t0)
                        assert n % BT == 0 and 0 <= n <= len(toks)
                        puts += 1
                    else:
                        if mine and rng.random() < 0.7:
                            toks, kv = mine[rng.choice(list(mine))]
                        else:
                            toks, kv = shared[rng.randrange(SHARED)]
                        t0 = time.perf_counter()
                        n = c.lookup(toks)
                        local["lookup"].append(time.perf_counter() - t0)
                        if r < 0.7 and n:
                            t0 = time.perf_counter()
                            try:
                                got = c.get(toks[:n], device="cpu")
                            except BlockNotFoundError:  # evicted between lookup and get: a clean miss
                                misses += 1
                            else:
                                if not torch.equal(got, kv[:, :, :n]):
                                    raise AssertionError(f"client {i}: get returned other bytes for {toks[:4]}")
                                hits += 1
                            local["get"].append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")
        with lock:
            for k, v in local.items():
                lat[k].extend(v)
            counts["hits"] += hits
            counts["misses"] += misses
            counts["puts"] += puts

    def watch_capacity() -> None:
        while not stop.wait(0.2):
            for ns in srv.namespaces():
                for tier, t in ns.store.stats()["tiers"].items():
                    if t["used_bytes"] > t["capacity_bytes"] or t["used_blocks"] > t["capacity_blocks"]:
                        overruns.append(f"{ns.name}/{tier}: {t}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
    watcher = threading.Thread(target=watch_capacity, daemon=True)
    try:
        for t in [*threads, watcher]:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        deadline = time.monotonic() + 60
        for t in [*threads, watcher]:
            t.join(max(0.1, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, f"seed {seed}: clients did not finish (deadlock?): {stuck}"
        assert not errors, f"seed {seed}: " + "\n".join(errors[:10])
        assert not overruns, overruns[:5]
        st = next(ns for ns in srv.namespaces() if ns.name == "load").store
        stats = st.stats()
        st._check()
        assert stats["evictions"] + stats["demotions"] > 0, "the working set should exceed the cache"
        assert counts["hits"] > 0 and counts["puts"] > CLIENTS
        # the last releases are one-way (sent, not waited for): the sidecar may still be
        # running them when the clients return, but it must run every one of them
        wait_until(lambda: srv.open_claims() == 0, timeout=4,  # < the 5 s lease timeout
                   what=f"seed {seed}: every claim given back ({srv.open_claims()} open)")
    finally:
        stop.set()
        srv.stop(timeout=30)
    ops = sum(len(v) for v in lat.values())
    print(f"\nload: {CLIENTS} clients, {SECONDS:g} s, {ops} ops ({ops / SECONDS:.0f}/s), "
          f"hits {counts['hits']}, clean misses {counts['misses']}")
    for op, xs in lat.items():
        print(f"  {op:6s} n={len(xs):6d}  p50 {_pct(xs, 0.5) * 1e3:7.2f} ms  p99 {_pct(xs, 0.99) * 1e3:7.2f} ms")
