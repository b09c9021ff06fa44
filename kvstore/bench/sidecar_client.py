"""The engine side of ``kvstore bench sidecar`` (run as ``python -m kvstore.bench.sidecar_client``).

Measures the client ops and, in this same process, the limits they are compared with
(bare zmq echo, zmq bulk transfer, memcpy); prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import xxhash
import zmq

from allocator.checksum import PIECE_BYTES, as_u8, copy_digests, row_pieces, usable_cpus

from clients import connect
from kvstore.layout import ModelLayout, as_block_rows
from kvstore.sidecar.protocol import request_frames

BT = 16
MiB = 1 << 20


def _layout(quick: bool) -> ModelLayout:
    # 32 layers x 8 KV heads x 128 dims fp16 = 128 KiB per token, 2 MiB per 16-token block
    return ModelLayout(num_layers=8 if quick else 32, num_kv_heads=8, head_dim=128, hidden_size=4096,
                       dtype=torch.float16)


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def _bulk(endpoint: str, nbytes: int, reps: int) -> tuple[float, float]:
    """Seconds (median) to fetch ``nbytes`` from the echo peer, and to send it there."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    data = bytearray(nbytes)
    gets, puts = [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        sock.send_multipart([b"GET", str(nbytes).encode()])
        sock.recv_multipart(copy=False)
        t1 = time.perf_counter()
        sock.send_multipart([b"PUT", data], copy=False)
        sock.recv_multipart()
        t2 = time.perf_counter()
        if i:
            gets.append(t1 - t0)
            puts.append(t2 - t1)
    sock.close(0)
    ctx.term()
    return statistics.median(gets), statistics.median(puts)


def _timed(fn, reps: int, before=None) -> float:
    """Median seconds of ``fn`` after one warm-up call; ``before`` runs untimed before each."""
    times = []
    for i in range(reps + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    return statistics.median(times)


def _paired(limit, fn, reps: int, before=None) -> tuple[float, float]:
    """Median seconds of ``limit`` and of ``fn``, measured alternately (limit, fn, limit, ...)
    after one warm-up each: on a shared machine both see the same load, so their ratio holds
    even when the absolute speed swings between samples. ``before`` runs untimed before
    each ``fn``."""
    lim, got = [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        limit()
        t1 = time.perf_counter()
        if before is not None:
            before()
        t2 = time.perf_counter()
        fn()
        t3 = time.perf_counter()
        if i:
            lim.append(t1 - t0)
            got.append(t3 - t2)
    return statistics.median(lim), statistics.median(got)


def _beside_echo(op, echo_endpoint: str, frames: list, n: int, warmup: int = 50) -> tuple[list, list]:
    """Seconds of ``n`` calls of ``op`` and of ``n`` bare echoes of ``frames``, alternately
    (so both see the same load on a shared machine), after ``warmup`` of each."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(echo_endpoint)
    ours, echo = [], []
    try:
        for i in range(n + warmup):
            t0 = time.perf_counter()
            op()
            t1 = time.perf_counter()
            sock.send_multipart(frames)
            sock.recv_multipart()
            t2 = time.perf_counter()
            if i >= warmup:
                ours.append(t1 - t0)
                echo.append(t2 - t1)
    finally:
        sock.close(0)
        ctx.term()
    return ours, echo


def _load(args) -> int:
    """One of the concurrent clients: lookups (or bare echoes) until told to stop."""
    lay = _layout(True)
    tokens = list(range(32 * BT))
    if args.load == "sidecar":
        c = connect(args.endpoint, layout=lay, namespace="bench-load", block_tokens=BT, timeout=30, shm=False)
        op = lambda: c.lookup(tokens)  # noqa: E731
    else:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(args.echo)
        frames = request_frames(1, "lookup", {"ns": "bench-load", "tokens": torch.tensor(tokens, dtype=torch.int32)
                                              .numpy().tobytes()}, 30000)

        def op():
            sock.send_multipart(frames)
            sock.recv_multipart()
    for _ in range(20):
        op()
    print("ready", flush=True)
    sys.stdin.readline()
    n, end = 0, time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        op()
        n += 1
    print(n, flush=True)
    return 0


def _concurrent(args, kind: str, clients: int = 8) -> float:
    cmd = [sys.executable, "-m", "kvstore.bench.sidecar_client", "--endpoint", args.endpoint, "--echo", args.echo,
           "--load", kind, "--seconds", str(args.seconds)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        total = sum(int(p.stdout.readline()) for p in procs)
    finally:
        for p in procs:
            p.wait(60)
    return total / args.seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--echo", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--load", choices=("sidecar", "echo"), default=None)
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 3.0
    if args.load:
        return _load(args)
    results = []

    def add(name, value, unit, limit, target, better):
        results.append({"name": name, "value": value, "unit": unit, "limit": limit, "target": target,
                        "better": better})
        print(f"  {name}: {value:.4g} {unit} (limit {limit:.4g})", file=sys.stderr, flush=True)

    lay = _layout(args.quick)
    nbytes = (16 if args.quick else 64) * MiB
    ntok = nbytes // lay.kv_bytes_per_token
    tokens = list(range(ntok))
    kv = torch.randn(lay.kv_shape(ntok)).to(lay.dtype)

    # -- lookup latency vs bare echo of the same request bytes
    small = _layout(True)
    ltoks = list(range(10_000, 10_000 + 32 * BT))
    n = 300 if args.quick else 3000
    frames = request_frames(1, "lookup", {"ns": "bench-lookup", "tokens": torch.tensor(ltoks, dtype=torch.int32)
                                          .numpy().tobytes()}, 30000)
    with connect(args.endpoint, layout=small, namespace="bench-lookup", block_tokens=BT, shm=False) as c:
        c.put(ltoks, torch.zeros(small.kv_shape(len(ltoks)), dtype=small.dtype))
        assert c.lookup(ltoks) == len(ltoks)
        lat, echo = _beside_echo(lambda: c.lookup(ltoks), args.echo, frames, n)
    add("lookup_p50_us", _pct(lat, 0.5) * 1e6, "us", _pct(echo, 0.5) * 1e6, 1.3, "lower")
    add("lookup_p99_us", _pct(lat, 0.99) * 1e6, "us", _pct(echo, 0.99) * 1e6, 1.5, "lower")
    # The same lookup of a prompt the sidecar has not seen (its block keys are not memoised:
    # the hashing is paid): 32 cached blocks, then a 33rd block unique to each request.
    with connect(args.endpoint, layout=small, namespace="bench-lookup", block_tokens=BT, shm=False) as c:
        cold = []
        for i in range(n + 50):
            fresh = ltoks + list(range(1_000_000 + i * BT, 1_000_000 + (i + 1) * BT))
            t0 = time.perf_counter()
            assert c.lookup(fresh) == len(ltoks)
            if i >= 50:
                cold.append(time.perf_counter() - t0)
    add("lookup_unseen_p50_us", _pct(cold, 0.5) * 1e6, "us", _pct(echo, 0.5) * 1e6, None, "lower")
    # The least a message to the sidecar costs: a health round trip (answered on its loop).
    with connect(args.endpoint, layout=small, namespace="bench-lookup", block_tokens=BT, shm=False) as c:
        rt, echo = _beside_echo(c.health, args.echo, frames, n)
    add("health_rt_us", _pct(rt, 0.5) * 1e6, "us", _pct(echo, 0.5) * 1e6, None, "lower")

    # -- 64 MiB via shared memory vs memcpy, each op timed alternately with its limit
    reps = 5 if args.quick else 11
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    clone = lambda: src.clone()  # noqa: E731
    copy = lambda: dst.copy_(src)  # noqa: E731
    gbps = lambda s: nbytes / s / 1e9  # noqa: E731
    with connect(args.endpoint, layout=lay, namespace="bench-kv", block_tokens=BT, device="cpu") as c:
        assert c.uses_shm, "the sidecar offered no shared memory"
        put_lim, put_s = _paired(copy, lambda: c.put(tokens, kv), reps, before=c.clear)
        assert c.lookup(tokens) == ntok
        get_lim, get_s = _paired(clone, lambda: c.get(tokens), reps)
        assert torch.equal(c.get(tokens), kv)
        # the engine's own paged pool (cross-layer blocks at scattered ids)
        nb = ntok // BT
        blocks = as_block_rows(kv, BT, nb)
        pool = torch.zeros_like(blocks.contiguous())
        ids = torch.randperm(nb, generator=torch.Generator().manual_seed(0))
        load_lim, load_s = _paired(copy, lambda: c.load_into(tokens, pool, ids), reps)
        assert torch.equal(pool[ids], blocks)
        save_lim, save_s = _paired(copy, lambda: c.save_from(tokens, pool, ids), reps, before=c.clear)
        assert torch.equal(c.get(tokens), kv)
        c.clear()
        # the same save without waiting: the caller's share of save_from_async (submit) and
        # the whole save (submit + wait), both vs the same copy
        async_lim, async_s = _paired(copy, lambda: c.save_from_async(tokens, pool, ids).wait(), reps,
                                     before=c.clear)
        assert torch.equal(c.get(tokens), kv)
        c.clear()
    # The integrity step alone: the client's copy-and-hash of a put's blocks into private
    # memory (no sidecar, no shared memory), and one core's xxh3 over a cache-resident piece.
    rows = as_u8(as_block_rows(kv, BT, nb))
    slots = np.empty_like(rows)
    jobs = [row_pieces(rows[i], slots[i]) for i in range(nb)]
    parts = min(4, usable_cpus())  # as the client splits its copies
    with ThreadPoolExecutor(max(1, parts - 1)) as pool:
        ch_lim, ch_s = _paired(copy, lambda: copy_digests(jobs, hash_dst=False, pool=pool, parts=parts), reps)
    piece = src[:PIECE_BYTES].numpy()
    reps_h = max(1, nbytes // PIECE_BYTES)
    hash_lim, hash_s = _paired(copy, lambda: [xxhash.xxh3_64_intdigest(piece) for _ in range(reps_h)], reps)
    add("copy_hash_gbps", gbps(ch_s), "GB/s", gbps(ch_lim), None, "higher")
    add("hash_cache_gbps", gbps(hash_s), "GB/s", gbps(hash_lim), None, "higher")
    add("shm_get_gbps", gbps(get_s), "GB/s", gbps(get_lim), 0.8, "higher")
    add("shm_put_gbps", gbps(put_s), "GB/s", gbps(put_lim), 0.8, "higher")
    add("shm_load_into_gbps", gbps(load_s), "GB/s", gbps(load_lim), 0.8, "higher")
    add("shm_save_from_gbps", gbps(save_s), "GB/s", gbps(save_lim), 0.8, "higher")
    add("shm_save_from_async_gbps", gbps(async_s), "GB/s", gbps(async_lim), None, "higher")

    # -- 64 MiB as zmq frames vs a bare zmq transfer
    reps = 3 if args.quick else 7
    bare_get_s, bare_put_s = _bulk(args.echo, nbytes, reps)
    with connect(args.endpoint, layout=lay, namespace="bench-kv", block_tokens=BT, device="cpu", shm=False) as c:
        put_s = _timed(lambda: c.put(tokens, kv), reps, before=c.clear)
        get_s = _timed(lambda: c.get(tokens), reps)
        assert torch.equal(c.get(tokens), kv)
        c.clear()
    add("tcp_get_gbps", gbps(get_s), "GB/s", gbps(bare_get_s), 0.7, "higher")
    add("tcp_put_gbps", gbps(put_s), "GB/s", gbps(bare_put_s), 0.7, "higher")

    # -- throughput with 8 concurrent clients (processes)
    with connect(args.endpoint, layout=_layout(True), namespace="bench-load", block_tokens=BT, shm=False) as c:
        c.put(list(range(32 * BT)), torch.zeros(_layout(True).kv_shape(32 * BT), dtype=torch.float16))
    ops = _concurrent(args, "sidecar")
    echo_ops = _concurrent(args, "echo")
    add("lookup_ops_per_s_8_clients", ops, "ops/s", echo_ops, None, "higher")
    print(json.dumps({"machine": {"kv_bytes": nbytes, "layout": lay.to_dict(), "block_tokens": BT,
                                  "torch_threads": torch.get_num_threads(), "copy_threads": parts},
                      "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
