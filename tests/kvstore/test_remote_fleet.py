"""The remote tier as a fleet operator meets it (issue 27), against real redis-server
processes: one deadline per call under a slow link (a throttling proxy, tests/slowlink.py),
a local view that heals after FLUSHALL / restart / eviction / expiry, errors classified
(pool waits, ACL refusals), write-behind loss counted and drained at SIGTERM, and remote
settings refused at start. The sidecar cases run a real ``kvstore serve`` process."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.errors import BlockNotFoundError, ConfigError
from kvstore.remote_tier import RemoteTier
from tests.kvstore.test_remote_tier import BLOCK_BYTES, BT, LAYOUT, make_store, same_bytes, sequence
from tests.redisserver import RedisClusterProcs, RedisServer, require_redis
from tests.slowlink import SlowLink

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALUE_BYTES = BLOCK_BYTES + 56
RATE = 32 << 10  # the slow link: 32 KiB/s each way


@pytest.fixture
def server(redis_server_proc):
    redis_server_proc.client().flushall()
    return redis_server_proc


def remote_keys(store: KVStore, tokens: torch.Tensor) -> list[bytes]:
    return [RemoteTier.redis_key(k) for k in store._keys(tokens)[1]]


# -- 1. one deadline per call ---------------------------------------------------------------------
def test_single_node_get_and_put_hold_the_deadline_under_a_slow_link(server, seed):
    """A healthy Redis behind a 32 KiB/s link: every socket read returns within the socket
    timeout, yet the call must still end by its deadline (within 1.5x)."""
    deadline = 1.0
    tokens, kv = sequence(seed, 64)  # 64 x 2 KiB: 4 s over this link
    with make_store(server.url) as fast:
        fast.put(tokens, kv)
    with SlowLink(server.port, RATE, lifetime_s=60) as link:
        with make_store(f"redis://127.0.0.1:{link.port}", remote_deadline_s=deadline,
                            host_bytes=256 * BLOCK_BYTES) as slow:
            t0 = time.monotonic()
            try:
                slow.get(tokens)
                got = True
            except BlockNotFoundError:
                got = False
            took_get = time.monotonic() - t0
            assert took_get < 1.5 * deadline, f"get took {took_get:.2f}s for a {deadline}s deadline"
            assert not got  # 4 s of bytes cannot arrive within 1 s
            more, more_kv = sequence(seed + 1, 64)
            time.sleep(0.3)  # past the backoff the timeout started: the put really tries the link
            t0 = time.monotonic()
            assert slow.put(more, more_kv) == len(more)  # the local copy lands whatever the remote does
            took_put = time.monotonic() - t0
            assert same_bytes(slow.get(more), more_kv)
            st = slow.stats()["remote"]
    assert took_get < 1.5 * deadline, f"get took {took_get:.2f}s for a {deadline}s deadline"
    assert took_put < 1.5 * deadline, f"put took {took_put:.2f}s for a {deadline}s deadline"
    assert st["timeouts"] >= 1


def test_cluster_calls_hold_the_deadline_and_nothing_outlives_them(seed):
    """Every master behind its own slow link (the nodes announce the proxies' ports): a
    call returns by its deadline and its traffic stops then too (no send left running)."""
    require_redis()
    c = RedisClusterProcs(3)
    links = [SlowLink(n.port, RATE, lifetime_s=90) for n in c.nodes]
    try:
        for n, link in zip(c.nodes, links):
            n.cli("config", "set", "cluster-announce-port", str(link.port))
        end = time.monotonic() + 20
        while not all(str(links[0].port) in n.cli("cluster", "slots") for n in c.nodes):
            assert time.monotonic() < end, "the announced ports never spread"
            time.sleep(0.1)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{link.port}" for link in links)
        deadline = 1.0
        with make_store(url, remote_deadline_s=deadline, host_bytes=256 * BLOCK_BYTES) as st:
            tokens, kv = sequence(seed, 96)  # 96 x 2 KiB over three 32 KiB/s links: 2 s
            t0 = time.monotonic()
            assert st.put(tokens, kv) == len(tokens)
            took = time.monotonic() - t0
            before = sum(link.sent for link in links)
            time.sleep(0.5)
            after = sum(link.sent for link in links)  # (a slot map refresh may send a few commands)
            assert took < 1.5 * deadline, f"put took {took:.2f}s for a {deadline}s deadline"
            assert after - before < 4096, f"{after - before} bytes still flowed after the call returned"
            assert same_bytes(st.get(tokens), kv)  # the local copy
    finally:
        for link in links:
            link.close()
        c.stop()


def test_concurrent_write_behind_puts_stay_within_the_queue_bound(server, seed):
    """Four puts at once against a paused Redis: the memory they hold for the queue (encoded
    values, measured by tracemalloc) stays within the byte limit, not four times it."""
    limit = 256 * VALUE_BYTES  # 526 KiB
    seqs = [sequence(seed * 10 + i, 256) for i in range(4)]
    with make_store(server.url, remote_write="back", remote_queue_bytes=limit, remote_deadline_s=5.0,
                    host_bytes=2048 * BLOCK_BYTES) as st:
        server.pause()
        try:
            barrier = threading.Barrier(4)
            keys = [st._keys(tokens)[1] for tokens, _ in seqs]
            blocks = [kv.unflatten(2, (256, BT)).permute(2, 0, 1, 3, 4, 5) for _, kv in seqs]

            def put(i: int) -> None:  # the tier's put, as KVStore.put calls it
                barrier.wait()
                st._remote.put(keys[i], blocks[i])

            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            threads = [threading.Thread(target=put, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            r = st.stats()["remote"]
            assert r["queued_bytes"] <= limit
            assert peak < 1.5 * limit, f"puts held {peak / 2**20:.2f} MiB for a {limit / 2**20:.2f} MiB queue"
            assert r["queue_dropped_blocks"] >= 3 * 256 - 1
        finally:
            server.resume()


# -- 2. a view that heals ---------------------------------------------------------------------------
@pytest.mark.parametrize("event", ["flushall", "restart", "eviction"])
def test_the_next_put_refills_what_redis_lost(event, seed):
    require_redis()
    s = RedisServer(maxmemory=(4 << 20) if event == "eviction" else None)
    try:
        tokens, kv = sequence(seed, 8)
        with make_store(s.url) as writer:
            writer.put(tokens, kv)
            keys = remote_keys(writer, tokens)
            if event == "flushall":
                s.client().flushall()
            elif event == "restart":
                s.restart()  # same port, nothing persisted
            else:  # LRU: other data pushes our blocks out
                r = s.client()
                for i in range(400):  # up to 400 x 500 x 1 KiB of other data through a 4 MiB Redis
                    pipe = r.pipeline(transaction=False)
                    for j in range(500):
                        pipe.set(f"junk:{i}:{j}", b"x" * 1024)
                    pipe.execute()
                    if not any(r.exists(k) for k in keys):
                        break
                # room for the refill: Redis' LRU clock ticks once a second, so the refilled
                # blocks would tie with the last junk and could be sampled out again
                r.config_set("maxmemory", 0)
            assert not any(s.client().exists(k) for k in keys), "the blocks were not lost"
            checks_before = writer.stats()["remote"]["round_trips"]
            assert writer.put(tokens, kv) == len(tokens)
            with make_store(s.url) as peer:
                assert peer.lookup(tokens) == len(tokens)
                assert same_bytes(peer.get(tokens), kv)
            st = writer.stats()["remote"]
            assert st["written_blocks"] == 16 and st["refilled_blocks"] == 8
            assert st["round_trips"] - checks_before == 2  # one check, one write
    finally:
        s.stop()


def test_a_re_put_keeps_a_ttl_prefix_alive(server, seed):
    """TTL 1 s, the prefix re-put every 0.25 s for 3.5 s: each put refreshes the expiry (the
    documented choice: refresh on re-put, not on reads), so a peer finds it all."""
    tokens, kv = sequence(seed, 8)
    with make_store(server.url, remote_ttl_s=1.0) as writer:
        end = time.monotonic() + 3.5
        while time.monotonic() < end:
            writer.put(tokens, kv)
            time.sleep(0.25)
        with make_store(server.url) as peer:
            assert peer.lookup(tokens) == len(tokens)
            assert same_bytes(peer.get(tokens), kv)
        ttl = server.client().pttl(remote_keys(writer, tokens)[0])
        assert 0 < ttl <= 1000


def test_a_wrong_type_key_is_deleted_counted_and_replaced(server, seed):
    tokens, kv = sequence(seed, 4)
    with make_store(server.url) as writer:
        writer.put(tokens, kv)
        keys = remote_keys(writer, tokens)
        r = server.client()
        r.delete(keys[2])
        r.rpush(keys[2], b"planted")  # a list where a block should be
        with make_store(server.url) as peer:
            assert peer.lookup(tokens) == 2 * BT  # not 64: the list is no block
            assert peer.stats()["remote"]["wrong_type_blocks"] == 1
            assert r.type(keys[2]) == b"none"  # deleted
        r.delete(keys[3])
        r.hset(keys[3], b"f", b"v")  # a hash this time, then the writer re-puts
        r.delete(keys[2])
        writer.put(tokens, kv)
        assert writer.stats()["remote"]["wrong_type_blocks"] == 1
    with make_store(server.url) as peer:
        assert peer.lookup(tokens) == len(tokens)
        assert same_bytes(peer.get(tokens), kv)


# -- 3. errors classified ---------------------------------------------------------------------------
@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_24_threads_on_a_16_connection_pool_never_miss(topology, request, seed):
    """24 threads on one store, each reading prompts only Redis holds (every lookup and
    get is a remote round trip): the 16-connection pool (per shard) makes them wait,
    never miss."""
    if topology == "single":
        url = request.getfixturevalue("server").url
    else:
        procs = request.getfixturevalue("redis_cluster_procs")
        for n in procs.nodes:
            n.client().flushall()
        url = procs.url
    seqs = [[sequence(seed * 1000 + t * 100 + i, 4) for i in range(15)] for t in range(24)]
    with make_store(url, host_bytes=16 * BLOCK_BYTES) as writer:
        for mine in seqs:
            for tokens, kv in mine:
                writer.put(tokens, kv)
    errors: list[str] = []
    with make_store(url, host_bytes=2048 * BLOCK_BYTES) as reader:  # keeps all: no local races
        barrier = threading.Barrier(24)

        def work(t: int) -> None:
            barrier.wait()
            for tokens, kv in seqs[t]:
                try:
                    if reader.lookup(tokens) != len(tokens) or not same_bytes(reader.get(tokens), kv):
                        errors.append(f"thread {t}: wrong or short")
                except BlockNotFoundError:
                    errors.append(f"thread {t}: miss")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(24)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        st = reader.stats()["remote"]
    assert errors == [], str((errors[:5], {k: v for k, v in st.items() if k not in ("url", "queue_limit_bytes") and v}))
    assert st["hit_blocks"] == 24 * 15 * 4
    assert not st["degraded"] and st["errors"] == 0 and st["skipped_keys"] == 0, st


def test_a_read_only_user_reads_shared_blocks_and_a_user_without_ping_connects(server, seed, caplog):
    import logging

    r = server.client()
    r.execute_command("ACL", "SETUSER", "reader", "on", ">rpw", "~*", "+@read", "+@connection", "-@write")
    r.execute_command("ACL", "SETUSER", "noping", "on", ">npw", "~*", "+@all", "-ping")
    seqs = [sequence(seed * 100 + i, 2) for i in range(20)]
    with make_store(server.url) as writer:
        for tokens, kv in seqs:
            writer.put(tokens, kv)
    caplog.set_level(logging.ERROR, logger="allocator.remote")
    with make_store(f"redis://reader:rpw@127.0.0.1:{server.port}") as ro:
        own, own_kv = sequence(seed + 7, 3)
        assert ro.put(own, own_kv) == len(own)  # refused remotely, kept locally
        found = sum(ro.lookup(t) == len(t) and same_bytes(ro.get(t), kv) for t, kv in seqs)
        st = ro.stats()["remote"]
    assert found == 20
    assert st["denied"] >= 3 and not st["degraded"] and st["degraded_episodes"] == 0
    refusals = [x.getMessage() for x in caplog.records if "refused SET" in x.getMessage()]
    assert len(refusals) == 1, refusals  # clear, and once, not per block
    with make_store(f"redis://noping:npw@127.0.0.1:{server.port}") as np_:
        assert not np_.stats()["remote"]["degraded"]
        tokens, kv = seqs[0]
        assert np_.lookup(tokens) == len(tokens) and same_bytes(np_.get(tokens), kv)
        more, more_kv = sequence(seed + 8, 2)
        np_.put(more, more_kv)
        assert np_.stats()["remote"]["written_blocks"] == 2


# -- 4. write-behind durability (embedded) ----------------------------------------------------------
def test_write_behind_waits_out_an_outage_and_counts_what_close_drops(server, seed):
    tokens, kv = sequence(seed, 8)
    with make_store(server.url, remote_write="back", remote_deadline_s=0.2) as st:
        server.pause()
        try:
            st.put(tokens, kv)
            time.sleep(1.5)  # several timed-out attempts: the blocks stay queued, not lost
            r = st.stats()["remote"]
            assert r["queued_blocks"] == 8 and r["dropped_unsent_blocks"] == 0
        finally:
            server.resume()
        assert st.flush_remote(10)
        assert st.stats()["remote"]["written_blocks"] == 8
    more, more_kv = sequence(seed + 1, 8)
    store = make_store(server.url, remote_write="back", remote_deadline_s=0.2, remote_drain_s=0.5)
    server.pause()
    try:
        store.put(more, more_kv)
        t0 = time.monotonic()
        store.close()  # the grace period passes with Redis still hung: dropped, and counted
        assert time.monotonic() - t0 < 0.5 + 2 * 0.2 + 1.5
        r = store._remote.stats()
        assert r["close_dropped_blocks"] == 8 and r["dropped_unsent_blocks"] == 8
    finally:
        server.resume()


# -- 5. validation ------------------------------------------------------------------------------------
BAD = [("remote_ttl_s", float("inf")), ("remote_ttl_s", float("nan")), ("remote_ttl_s", 0.0004),
       ("remote_ttl_s", 1e17), ("remote_deadline_s", float("inf")), ("remote_deadline_s", float("nan")),
       ("remote_drain_s", float("inf")), ("remote_drain_s", -1.0)]


@pytest.mark.parametrize("field, value", BAD)
def test_bad_ttl_or_deadline_is_refused_at_start(field, value, tmp_path):
    with pytest.raises(ConfigError, match=field):
        StoreConfig(layout=LAYOUT, remote_url="redis://127.0.0.1:1", **{field: value})
    text = "inf" if value == float("inf") else "nan" if value != value else repr(value)
    path = tmp_path / "store.toml"
    path.write_text(f'remote_url = "redis://127.0.0.1:1"\n{field} = {text}\n')
    with pytest.raises(ConfigError, match=field):
        StoreConfig.from_toml(path)
    out = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--check", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and field in out.stderr, out.stderr


def test_a_remote_failure_never_costs_the_local_copy(server, seed, monkeypatch):
    tokens, kv = sequence(seed, 3)
    with make_store(server.url) as st:
        def broken(*a, **k):
            raise OverflowError("what a bad TTL used to raise inside redis-py")

        monkeypatch.setattr(st._remote.backend, "set_many", broken)
        assert st.put(tokens, kv) == len(tokens)
        assert same_bytes(st.get(tokens), kv)
        assert st.stats()["remote"]["put_errors"] == 1


# -- through a real `kvstore serve` ---------------------------------------------------------------------
class Sidecar:
    """A ``kvstore serve`` process on an ipc endpoint in ``tmp``; stderr kept for asserts."""

    def __init__(self, tmp: pathlib.Path, *args: str, metrics: bool = False) -> None:
        self.endpoint = f"ipc://{tmp}/kvs.sock"
        self.log_path = tmp / "serve.log"
        self.log = open(self.log_path, "w")
        extra = ["--metrics-port", "0"] if metrics else []
        self.proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--endpoint", self.endpoint,
                                      "--device-bytes", "0", "--host-bytes", "16MiB", "--device", "cpu",
                                      "--shm-dir", str(tmp / "shm"), *extra, *args],
                                     cwd=ROOT, stderr=self.log, stdout=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # SIGABRT: stacks
        end = time.monotonic() + 60
        while "serving on" not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < end, self.text()
            time.sleep(0.1)

    def text(self) -> str:
        return self.log_path.read_text()

    def metrics_port(self) -> int:
        return int(self.text().split("metrics on http://")[1].split(":")[1].split("/")[0])

    def client(self, namespace: str = "ns"):
        from clients import connect

        return connect(self.endpoint, layout=LAYOUT, namespace=namespace, block_tokens=BT, timeout=30.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # its threads' stacks land in the log
            self.proc.wait(10)
            raise AssertionError(f"kvstore serve did not exit within {timeout}s:\n{self.text()[-8000:]}") from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def test_sidecar_holds_the_deadline_and_heals(server, tmp_path, seed):
    tokens, kv = sequence(seed, 64)
    with make_store(server.url) as fast:
        fast.put(tokens, kv)
    deadline = 1.0
    with SlowLink(server.port, RATE, lifetime_s=60) as link:
        sc = Sidecar(tmp_path, "--remote-url", f"redis://127.0.0.1:{link.port}", "--remote-deadline", str(deadline))
        try:
            with sc.client() as c:
                t0 = time.monotonic()
                try:
                    c.get(tokens)
                    got = True
                except BlockNotFoundError:
                    got = False
                took = time.monotonic() - t0
        finally:
            sc.stop()
    assert took < 1.5 * deadline, f"a sidecar get took {took:.2f}s for a {deadline}s deadline"
    assert not got
    other, other_kv = sequence(seed + 1, 8)
    sc = Sidecar(tmp_path, "--remote-url", server.url)
    try:
        with sc.client() as c:
            c.put(other, other_kv)
            server.client().flushall()
            c.put(other, other_kv)  # the sidecar's view is checked: it sends the blocks again
            with make_store(server.url) as peer:
                assert peer.lookup(other) == len(other)
                assert same_bytes(peer.get(other), other_kv)
            assert c.stats()["remote"]["refilled_blocks"] == 8
    finally:
        sc.stop()


def test_sidecar_counts_dropped_write_behind_blocks(server, tmp_path, seed):
    sc = Sidecar(tmp_path, "--remote-url", server.url, "--remote-write", "back", "--remote-deadline", "0.2",
                 "--remote-queue-bytes", str(4 * VALUE_BYTES), "--remote-drain", "0.5", metrics=True)
    server.pause()
    try:
        tokens, kv = sequence(seed, 12)
        with sc.client() as c:
            assert c.put(tokens, kv) == len(tokens)  # acknowledged: held locally, 8 of them not queued
        out = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--endpoint", sc.endpoint, "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        remote = (doc.get("namespaces") or {})["ns"]["remote"]
        assert remote["dropped_unsent_blocks"] == 8 and remote["queued_blocks"] == 4
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{sc.metrics_port()}/metrics", timeout=10).read().decode()
        assert 'kvstore_remote_dropped_unsent_blocks_total{namespace="ns"} 8.0' in body
        assert sc.stop() == 0  # SIGTERM: 0.5 s of grace with Redis hung, then the 4 queued are dropped
        assert "4 queued block(s) dropped unsent at close" in sc.text()
    finally:
        server.resume()
        sc.stop()


def test_sigterm_drains_the_write_behind_queue_within_the_grace_period(server, tmp_path, seed):
    sc = Sidecar(tmp_path, "--remote-url", server.url, "--remote-write", "back", "--remote-deadline", "0.3")
    tokens, kv = sequence(seed, 32)
    server.pause()
    resumed = threading.Timer(2.0, server.resume)
    try:
        with sc.client() as c:
            assert c.put(tokens, kv) == len(tokens)
        t0 = time.monotonic()
        sc.proc.send_signal(signal.SIGTERM)  # Redis still hung: the sidecar must wait for it, bounded
        resumed.start()
        assert sc.stop() == 0
        took = time.monotonic() - t0
        assert 1.5 < took < 5 + 3, took  # the default grace period: 5 s
    finally:
        resumed.join()
        server.resume()
        sc.stop()
    with make_store(server.url) as peer:
        assert peer.lookup(tokens) == len(tokens)
        assert same_bytes(peer.get(tokens), kv)


def test_sigterm_grace_is_per_sidecar_not_per_namespace(server, tmp_path, seed):
    """Two namespaces with queued blocks and Redis hung: SIGTERM waits one grace period
    (the namespaces drain side by side), then drops and reports each one's queue."""
    grace = 2.0
    sc = Sidecar(tmp_path, "--remote-url", server.url, "--remote-write", "back", "--remote-deadline", "0.2",
                 "--remote-drain", str(grace))
    server.pause()
    try:
        for ns in ("a", "b"):
            tokens, kv = sequence(seed + ord(ns), 4)
            with sc.client(ns) as c:
                assert c.put(tokens, kv) == len(tokens)
        t0 = time.monotonic()
        assert sc.stop() == 0
        took = time.monotonic() - t0
        assert grace <= took < 1.75 * grace, took
        assert sc.text().count("4 queued block(s) dropped unsent at close") == 2, sc.text()[-2000:]
    finally:
        server.resume()
        sc.stop()


def test_close_during_an_in_flight_batch_counts_it_and_leaves_no_bytes_behind(server, seed):
    """The writer holds a batch when close's grace period ends: that batch is counted
    as dropped too, and the queue's accounting ends at zero, not below."""
    tokens, kv = sequence(seed, 6)
    store = make_store(server.url, remote_write="back", remote_deadline_s=0.5, remote_drain_s=0.2)
    server.pause()
    try:
        store.put(tokens, kv)
        time.sleep(0.05)  # the writer has taken the batch and waits on the hung server
        store.close()
        r = store._remote.stats()
        assert r["close_dropped_blocks"] == 6 and r["dropped_unsent_blocks"] == 6, r
        assert r["queued_bytes"] == 0 and r["queued_blocks"] == 0, r
    finally:
        server.resume()



def test_calls_that_must_open_a_connection_to_a_hung_server_hold_the_deadline(seed):
    """Three lookups at once against a hung Redis: one takes the pooled connection, the
    others must open new ones (connect, then an AUTH that never gets an answer);
    every one of them returns by its deadline."""
    require_redis()
    s = RedisServer(password="pw")  # a new connection's first exchange is AUTH
    try:
        tokens, kv = sequence(seed, 2)
        deadline = 1.0
        with make_store(s.url, remote_deadline_s=deadline) as st:
            s.pause()
            barrier = threading.Barrier(3)
            took: list[float] = []

            def lookup() -> None:
                barrier.wait()
                t0 = time.monotonic()
                st.lookup(tokens)
                took.append(time.monotonic() - t0)

            threads = [threading.Thread(target=lookup) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(took) == 3 and max(took) < 1.5 * deadline, took
    finally:
        s.stop()
