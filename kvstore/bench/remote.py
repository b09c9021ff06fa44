"""``kvstore bench remote``: the shared remote tier beside bare redis-py on the same server.

Results (the bench shape, docs/decisions.md), each with its limit measured in the same run against the
same Redis:

* ``put_gbps_<size>`` / ``get_gbps_<size>``: ``--blocks`` blocks (default 1000) of 64 KiB and
  1 MiB through the remote tier (:class:`kvstore.remote_tier.RemoteTier`: value packing
  with checksum, one pipelined round trip per shard per batch; get verifies every value
  and lands the bytes in one tensor) against a bare redis-py ``pipeline(transaction=False)``
  of plain SETs / GETs of the same bytes, in batches of ``--batch`` blocks (a prompt's
  worth) for both (target ratio >= 0.8); get lands the bytes in preallocated memory, as an
  engine's KV pool is;
* ``lookup_us``: a store's ``lookup`` of a 32-block prompt that only the remote tier holds
  (one batched existence check) against one bare round trip of the same 32 EXISTS;
* ``shared_prefix_remote_hits``: two processes that share only the Redis: the first serves
  ``--users`` prompts (a shared system prefix plus a per-user part), the second serves the
  same users and as many new ones; blocks the second reads from Redis against the blocks
  it could have found there (the rest it must recompute; ``recomputed_blocks``).

The server: ``--url`` (an existing Redis / Valkey / Cluster), else a ``redis-server``
started here on a free loopback port (``--cluster N``: N masters joined with
``redis-cli --cluster create``), stopped at the end. Ours and the bare client alternate batch
by batch (the order alternating too), so both see the same moments of a busy machine;
figures are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from kvstore.bench.report import Report, machine_info

KiB, MiB = 1 << 10, 1 << 20
BT = 16
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="an existing redis://, rediss:// or redis+cluster:// server "
                                                    "(default: start redis-server here)")
    parser.add_argument("--cluster", type=int, default=0, help="start a cluster of N masters instead of one node")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per size (default 1000, --quick 200)")
    parser.add_argument("--sizes", default=None, help="block sizes, e.g. 64KiB,1MiB (the default)")
    parser.add_argument("--batch", type=int, default=64, help="blocks per call (one prompt's worth)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 5, --quick 3)")
    parser.add_argument("--users", type=int, default=8, help="users of the first process (shared-prefix run)")


# -- servers -----------------------------------------------------------------------------------
class _Servers:
    """redis-server processes on free loopback ports (one node or a cluster), for this run."""

    def __init__(self, masters: int) -> None:
        if not shutil.which("redis-server") or not shutil.which("redis-cli"):
            raise SystemExit("kvstore bench remote: redis-server/redis-cli not found; install redis-server "
                             "or pass --url")
        self.dir = tempfile.mkdtemp(prefix="kvstore-bench-redis-")
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        cluster = masters > 0
        for i in range(max(masters, 1)):
            port = self._free_port()
            d = os.path.join(self.dir, str(i))
            os.mkdir(d)
            args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", d, "--loglevel", "warning", "--protected-mode", "yes"]
            if cluster:
                args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(d, "nodes.conf"),
                         "--cluster-require-full-coverage", "no"]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.ports.append(port)
        for port in self.ports:
            self._wait(port)
        if cluster:
            out = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                                  "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True,
                                 timeout=60)
            if out.returncode != 0:
                self.stop()
                raise SystemExit(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            for port in self.ports:
                end = time.monotonic() + 30
                while "cluster_state:ok" not in subprocess.run(
                        ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True).stdout:
                    if time.monotonic() > end:
                        self.stop()
                        raise SystemExit("the cluster did not come up")
                    time.sleep(0.1)
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.url = f"redis+cluster://{hosts}" if cluster else f"redis://{hosts}"

    @staticmethod
    def _free_port() -> int:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port + 10000 <= 65535:
                return port

    @staticmethod
    def _wait(port: int) -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"redis-server on port {port} did not start")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- helpers ---------------------------------------------------------------------------------------
def _size(text: str) -> int:
    t = text.strip().lower()
    for unit, mult in (("kib", KiB), ("mib", MiB), ("k", KiB), ("m", MiB)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def layout_for(block_bytes: int):
    """A layout whose 16-token fp16 block is ``block_bytes``: head_dim 128, 2 heads per 64 KiB."""
    import torch

    from kvstore.layout import ModelLayout

    units = block_bytes // (64 * KiB)  # 64 KiB = 4 layers x 2 heads x 128 dims x 2 (K,V) x 16 tokens x 2 bytes
    if units < 1 or block_bytes % (64 * KiB):
        raise SystemExit(f"block size {block_bytes} must be a multiple of 64 KiB")
    layers = 4 * min(units, 8)
    heads = 2 * max(1, units // 8)
    return ModelLayout(num_layers=layers, num_kv_heads=heads, head_dim=128, hidden_size=heads * 128 * 4,
                       dtype=torch.float16)


def _bare_client(url: str):
    from allocator.remote import parse_remote_url

    import redis
    from redis.cluster import ClusterNode, RedisCluster

    a = parse_remote_url(url)
    if a.cluster:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in a.nodes], username=a.username,
                            password=a.password, ssl=a.tls)
    return redis.Redis(host=a.nodes[0][0], port=a.nodes[0][1], db=a.db, username=a.username, password=a.password,
                       ssl=a.tls)


def _flush(bare, url: str) -> None:
    """Drop this run's keys (ours and the bare ones) so each phase starts from the same memory."""
    for prefix in (b"kvs1:*", b"bare:*"):
        batch = []
        for k in bare.scan_iter(match=prefix, count=1000):
            batch.append(k)
            if len(batch) >= 1000:
                _del(bare, batch)
                batch = []
        if batch:
            _del(bare, batch)


def _del(bare, keys) -> None:
    pipe = bare.pipeline(transaction=False)
    for k in keys:
        pipe.delete(k)
    pipe.execute()


def _throughput(report: Report, url: str, block_bytes: int, blocks: int, batch: int, repeats: int) -> None:
    import numpy as np
    import torch

    from kvstore.remote_tier import RemoteTier

    layout = layout_for(block_bytes)
    shape = layout.block_shape(BT)
    tier = RemoteTier(url, layout_desc=repr(sorted(layout.to_dict().items())), block_tokens=BT, block_shape=shape,
                      dtype=layout.dtype, deadline_s=30.0)
    bare = _bare_client(url)
    label = f"{block_bytes // KiB}KiB" if block_bytes < MiB else f"{block_bytes // MiB}MiB"
    total = blocks * block_bytes
    data = torch.randint(-30000, 30000, (blocks, *shape), dtype=torch.int16).view(torch.float16)
    data_u8 = data.view(blocks, -1).view(torch.uint8).numpy()
    raw = [memoryview(data_u8[i]) for i in range(blocks)]  # the bare client's bytes: the same memory
    landing = torch.empty_like(data)
    landing.view(torch.uint8).numpy().fill(0)  # touched once, as an engine's KV pool is
    runs = {"put": [], "bare_put": [], "get": [], "bare_get": []}
    for rep in range(repeats):
        keys = [os.urandom(16) for _ in range(blocks)]  # fresh keys: nothing is skipped as known
        bare_keys = [b"bare:" + k for k in keys]
        def put(s: int) -> None:
            tier.put(keys[s:s + batch], data[s:s + batch])

        def bare_put(s: int) -> None:
            pipe = bare.pipeline(transaction=False)
            for k, v in zip(bare_keys[s:s + batch], raw[s:s + batch]):
                pipe.set(k, v)
            pipe.execute()

        def get(s: int) -> None:  # into the engine's preallocated KV memory
            if tier.fetch(keys[s:s + batch], out=landing[s:s + batch])[1] != len(keys[s:s + batch]):
                raise SystemExit("the remote tier lost blocks (is the server's maxmemory too small?)")

        def bare_get(s: int) -> None:
            nonlocal values
            pipe = bare.pipeline(transaction=False)
            for k in bare_keys[s:s + batch]:
                pipe.get(k)
            values = pipe.execute()

        values: list = []
        spent = dict.fromkeys(runs, 0.0)
        # Ours and the bare client alternate batch by batch (who goes first alternates too),
        # so both see the same moment of a busy machine.
        for pair in ((("put", put), ("bare_put", bare_put)), (("get", get), ("bare_get", bare_get))):
            for j, s in enumerate(range(0, blocks, batch)):
                for name, fn in (pair if (j + rep) % 2 == 0 else pair[::-1]):
                    t0 = time.perf_counter()
                    fn(s)
                    spent[name] += time.perf_counter() - t0
        for name, t in spent.items():
            runs[name].append(t)
        if rep == 0:  # the bytes that came back are the bytes that went in
            assert torch.equal(landing.view(torch.int16), data.view(torch.int16)), "remote bytes differ"
            assert values[-1] == raw[-1]
            landing.view(torch.uint8).numpy().fill(0)
        _flush(bare, url)
        tier._view.clear()
    med = {k: statistics.median(v) for k, v in runs.items()}
    for op in ("put", "get"):
        report.add(f"{op}_gbps_{label}", total / med[op] / 1e9, "GB/s", limit=total / med[f"bare_{op}"] / 1e9,
                   target=0.8)
    tier.close()
    bare.close()
    del np


def _lookup(report: Report, url: str, repeats: int) -> None:
    import torch

    from kvstore import KVStore, StoreConfig

    layout = layout_for(64 * KiB)
    n_blocks = 32
    cfg = dict(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=8 * MiB, device="cpu",
               namespace="bench-lookup", remote_url=url, remote_deadline_s=5.0)
    tokens = torch.arange(n_blocks * BT)
    kv = torch.zeros(layout.kv_shape(n_blocks * BT), dtype=layout.dtype)
    with KVStore(StoreConfig(**cfg)) as writer:
        writer.put(tokens, kv)
        keys = [b"kvs1:" + k for k in writer._keys(tokens)[1]]
    bare = _bare_client(url)
    ours, limit = [], []
    with KVStore(StoreConfig(**cfg)) as reader:  # holds nothing locally: every block is remote
        for _ in range(max(50, repeats * 100)):
            t0 = time.perf_counter()
            n = reader.lookup(tokens)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pipe = bare.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            found = pipe.execute()
            limit.append(time.perf_counter() - t0)
        assert n == len(tokens) and all(found)
    report.add("lookup_us", statistics.median(ours) * 1e6, "us", limit=statistics.median(limit) * 1e6,
               better="lower")
    bare.close()


def _shared_prefix(report: Report, url: str, users: int) -> None:
    base = [sys.executable, "-m", "kvstore.bench.remote_client", "--url", url]
    first = subprocess.run(base + ["--role", "first", "--users", str(users)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    if first.returncode != 0:
        raise SystemExit(f"first process failed: {first.stderr[-2000:]}")
    second = subprocess.run(base + ["--role", "second", "--users", str(users)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    if second.returncode != 0:
        raise SystemExit(f"second process failed: {second.stderr[-2000:]}")
    res = json.loads(second.stdout)
    report.add("shared_prefix_remote_hits", res["remote_hits"], "blocks", limit=res["available"], target=1.0)
    report.add("shared_prefix_recomputed_blocks", res["recomputed"], "blocks", better="lower")
    report.add("shared_prefix_remote_get_ms", res["remote_get_ms"], "ms", better="lower")


def run(args: argparse.Namespace) -> Report:
    quick = bool(getattr(args, "quick", False))
    blocks = args.blocks or (200 if quick else 1000)
    repeats = args.repeats or (3 if quick else 5)
    sizes = [_size(s) for s in (args.sizes or ("64KiB,256KiB" if quick else "64KiB,1MiB")).split(",")]
    servers = None if args.url else _Servers(args.cluster)
    url = args.url or servers.url
    report = Report("remote", {**machine_info(), "redis": url.split("@")[-1], "blocks": blocks, "batch": args.batch})
    try:
        for size in sizes:
            print(f"remote: {blocks} blocks of {size} bytes", file=sys.stderr, flush=True)
            _throughput(report, url, size, blocks, args.batch, repeats)
        _lookup(report, url, repeats)
        _shared_prefix(report, url, args.users)
    finally:
        if servers is not None:
            servers.stop()
    return report
