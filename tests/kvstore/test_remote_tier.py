"""The shared remote tier against real redis-server processes (single node and a 3-master
Redis Cluster started here on free loopback ports)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from allocator.remote import FORM_KV, pack_block
from kvstore import KVStore, ModelLayout, StoreConfig
from kvstore.errors import BlockNotFoundError, ConfigError
from kvstore.remote_tier import RemoteTier
from tests.redisserver import RedisClusterProcs, RedisServer, require_redis

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
BT = 16
BLOCK_BYTES = LAYOUT.kv_block_bytes(BT)  # 2 KiB


def make_store(url: str, **kw) -> KVStore:
    cfg = dict(layout=LAYOUT, block_tokens=BT, device_bytes=0, host_bytes=64 * BLOCK_BYTES, namespace="ns",
               device="cpu", remote_url=url, remote_deadline_s=0.5)
    cfg.update(kw)
    return KVStore(StoreConfig(**cfg))


def sequence(seed: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and KV of one prompt, a pure function of ``seed`` (so another process makes the same)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (blocks * BT,), generator=g)
    kv = torch.randn(LAYOUT.kv_shape(blocks * BT), generator=g).to(LAYOUT.dtype)
    return tokens, kv


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.to(a.device)  # compared where the store returned it (CUDA when present)
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture
def server(redis_server_proc):
    """The module's server, emptied: tests share the process, never each other's blocks."""
    redis_server_proc.client().flushall()
    return redis_server_proc


@pytest.fixture
def cluster(redis_cluster_procs):
    for n in redis_cluster_procs.nodes:
        n.client().flushall()
    return redis_cluster_procs


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (dict(remote_url="http://x:1"), "scheme"), (dict(remote_url="redis://h:x"), "port"),
    (dict(remote_write="sometimes"), "remote_write"), (dict(remote_ttl_s=0), "remote_ttl_s"),
    (dict(remote_deadline_s=-1), "remote_deadline_s"), (dict(remote_queue_bytes=0), "remote_queue_bytes"),
    (dict(remote_url="redis://h:1?ssl_ca_certs=/x"), "needs rediss"),
    (dict(remote_url="rediss://h:1?ssl_ca_certs=/no/such/file"), "not a readable file"),
    (dict(remote_url="rediss://h:1?timeout=3"), "not one of")])
def test_bad_remote_config_fails_at_construction(bad, match):
    with pytest.raises(ConfigError, match=match):
        StoreConfig(layout=LAYOUT, **{"remote_url": "redis://127.0.0.1:1", **bad})


def test_toml_and_serve_flag_set_the_remote(tmp_path):
    from kvstore.cli.serve import build, configure
    import argparse

    path = tmp_path / "store.toml"
    path.write_text('remote_url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"\nremote_write = "back"\n')
    assert StoreConfig.from_toml(path).remote_write == "back"
    parser = argparse.ArgumentParser()
    configure(parser)
    _, cfg, _ = build(parser.parse_args(["--config", str(path), "--remote-url", "redis://127.0.0.1:7002",
                                         "--remote-ttl", "60"]))
    assert (cfg.remote_url, cfg.remote_write, cfg.remote_ttl_s) == ("redis://127.0.0.1:7002", "back", 60.0)


def test_wrong_password_is_a_clear_error_and_env_password_works(monkeypatch):
    require_redis()
    s = RedisServer(password="s3cret")
    try:
        monkeypatch.delenv("KVSTORE_REDIS_PASSWORD", raising=False)
        with pytest.raises(ConfigError, match="refused the credentials|needs a password"):
            make_store(f"redis://:nope@127.0.0.1:{s.port}")
        with pytest.raises(ConfigError, match="refused the credentials|needs a password"):
            make_store(f"redis://127.0.0.1:{s.port}")
        monkeypatch.setenv("KVSTORE_REDIS_PASSWORD", "s3cret")
        with make_store(f"redis://127.0.0.1:{s.port}") as st:
            tokens, kv = sequence(1, 2)
            st.put(tokens, kv)
            assert st.stats()["remote"]["written_blocks"] == 2
    finally:
        s.stop()


def test_tls_with_the_servers_ca(seed, caplog):
    require_redis()
    s = RedisServer(tls=True)
    try:
        tokens, kv = sequence(seed, 2)
        with make_store(s.url) as a:
            a.put(tokens, kv)
            assert a.stats()["remote"]["written_blocks"] == 2 and not a.stats()["remote"]["degraded"]
        with make_store(s.url) as b:
            assert same_bytes(b.get(tokens), kv)
        # without the CA the certificate is refused: no bytes move, the store serves locally
        caplog.set_level(logging.ERROR)
        with make_store(f"rediss://127.0.0.1:{s.port}") as c:
            assert c.put(tokens, kv) == len(tokens) and same_bytes(c.get(tokens), kv)
            assert c.stats()["remote"]["degraded"] and c.stats()["remote"]["written_blocks"] == 0
    finally:
        s.stop()


# -- sharing -----------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch
    from kvstore import KVStore, ModelLayout, StoreConfig
    from tests.kvstore.test_remote_tier import make_store, sequence
    url, seeds, blocks = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
    with make_store(url, remote_write=sys.argv[4]) as st:
        for seed in seeds:
            st.put(*sequence(seed, blocks))
        assert st.flush_remote(10)
        print(st.stats()["remote"]["written_blocks"])
""")


def run_writer(url: str, seeds: list[int], blocks: int, write: str = "through") -> int:
    out = subprocess.run([sys.executable, "-c", WRITER, url, ",".join(map(str, seeds)), str(blocks), write],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("write", ["through", "back"])
def test_two_processes_share_the_prefix_cache_byte_exact(cluster, write, seed):
    seeds = [seed * 10 + i for i in range(4)]
    assert run_writer(cluster.url, seeds, blocks=5, write=write) == 20
    with make_store(cluster.url) as reader:  # shares nothing with the writer but the cluster
        for s in seeds:
            tokens, kv = sequence(s, 5)
            assert reader.lookup(tokens) == len(tokens)
            assert same_bytes(reader.get(tokens), kv)
        st = reader.stats()
        assert st["remote"]["hit_blocks"] == 20 and st["blocks"] == 20  # promoted into the local tiers
        # a longer prompt sharing the prefix: the prefix is found, the rest is not
        tokens, kv = sequence(seeds[0], 5)
        longer = torch.cat([tokens, torch.arange(2 * BT)])
        assert reader.lookup(longer) == len(tokens)
        assert same_bytes(reader.get(longer[: len(tokens)]), kv)
        with pytest.raises(BlockNotFoundError):
            reader.get(longer)
    with make_store(cluster.url) as fresh:  # a get that misses still keeps the blocks it found
        tokens, kv = sequence(seeds[1], 5)
        with pytest.raises(BlockNotFoundError):
            fresh.get(torch.cat([tokens, torch.arange(BT)]))
        assert fresh.stats()["blocks"] == 5 and fresh.stats()["remote"]["hit_blocks"] == 5
        assert same_bytes(fresh.get(tokens), kv) and fresh.stats()["remote"]["hit_blocks"] == 5  # now local
    # another namespace with the same prompt never sees these blocks
    with make_store(cluster.url, namespace="other-tenant") as other:
        tokens, _ = sequence(seeds[0], 5)
        assert other.lookup(tokens) == 0


def test_local_then_remote_continuation_and_load(server, seed):
    tokens, kv = sequence(seed, 6)
    with make_store(server.url) as a:
        a.put(tokens, kv)
    with make_store(server.url) as b:
        b.put(tokens[: 2 * BT], kv[:, :, : 2 * BT])  # b holds the first two blocks itself
        assert b.lookup(tokens) == len(tokens)
        assert b.locate(tokens) == ["host"] * 2  # local tiers only (the planner's tiers)
        assert same_bytes(b.get(tokens), kv)
        assert b.stats()["remote"]["hit_blocks"] == 4  # only the missing four came from Redis
        assert b.locate(tokens) == ["host"] * 6  # promoted
    with make_store(server.url) as c:
        res = c.load(tokens)
        assert res.tokens_restored == len(tokens) and same_bytes(res.kv, kv)
        out = torch.empty_like(kv)
        layers: list[int] = []
        with make_store(server.url) as d:
            assert same_bytes(d.get(tokens, out=out, on_layer=layers.append), kv) and same_bytes(out, kv)
            assert layers == list(range(LAYOUT.num_layers))


def test_lookup_nowait_defers_only_when_the_remote_must_be_asked(server, seed):
    tokens, kv = sequence(seed, 3)
    with make_store(server.url) as a:
        a.put(tokens, kv)
        assert a.port.lookup_nowait(tokens) == len(tokens)  # all local: answered at once
    with make_store(server.url) as b:
        assert b.port.lookup_nowait(tokens) is None  # needs a round trip: the sidecar hands it to a worker
        assert b.lookup(tokens) == len(tokens)


def test_ttl_per_namespace(server, seed):
    tokens, kv = sequence(seed, 1)
    with make_store(server.url, namespace="ttl-ns", remote_ttl_s=30) as st:
        st.put(tokens, kv)
    rc = server.client()
    keys = [k for k in rc.keys(b"kvs1:*") if 0 < rc.pttl(k) <= 30_000]
    assert len(keys) == 1


# -- damage ------------------------------------------------------------------------------------
def test_damaged_or_mismatched_values_are_misses(server, seed):
    tokens, kv = sequence(seed, 3)
    with make_store(server.url) as a:
        a.put(tokens, kv)
        keys = a._keys(tokens)[1]
    rc = server.client()
    k1, k2 = RemoteTier.redis_key(keys[1]), RemoteTier.redis_key(keys[2])
    v1 = bytearray(rc.get(k1))
    v1[-5] ^= 0x01  # one flipped payload bit
    rc.set(k1, bytes(v1))
    with make_store(server.url) as b:
        assert b.lookup(tokens) == 3 * BT  # existence only; the bytes are checked when read
        with pytest.raises(BlockNotFoundError):
            b.get(tokens)
        assert same_bytes(b.get(tokens[:BT]), kv[:, :, :BT])
        assert b.stats()["remote"]["damaged_blocks"] == 1
        assert rc.exists(k1) == 0  # a damaged value is removed so a fresh put can replace it
    # a value written for another layout under the right key is a miss as well
    raw = bytes(BLOCK_BYTES)
    rc.set(k2, pack_block(keys[2], FORM_KV, b"another-layout!!", raw))
    rc.set(k1, pack_block(keys[1], FORM_KV, b"x" * 16, raw))
    with make_store(server.url) as c:
        with pytest.raises(BlockNotFoundError):
            c.get(tokens[: 2 * BT])
        assert c.stats()["remote"]["damaged_blocks"] == 1


def test_redis_eviction_gives_clean_misses_and_drops_the_local_view(seed):
    require_redis()
    s = RedisServer(maxmemory=2 << 20, policy="allkeys-lru")
    try:
        seqs = [sequence(seed * 100 + i, 4) for i in range(150)]  # 150 x 4 x 2 KiB = 1.2 MiB payload + overhead
        with make_store(s.url, host_bytes=4 * BLOCK_BYTES) as a:
            for tokens, kv in seqs:
                a.put(tokens, kv)
            big = [sequence(seed * 100 + 1000 + i, 4) for i in range(150)]
            for tokens, kv in big:
                a.put(tokens, kv)
            assert int(s.client().info("stats")["evicted_keys"]) > 0
            known = a.stats()["remote"]["known_blocks"]
            gone_before = a.stats()["remote"]["vanished_blocks"]
            results = []
            for tokens, kv in seqs + big:
                n = a.lookup(tokens)
                results.append(n)
                if n:
                    assert same_bytes(a.get(tokens[:n]), kv[:, :, :n])  # what is found is exact
                if n < len(tokens):
                    with pytest.raises(BlockNotFoundError):
                        a.get(tokens)
            st = a.stats()["remote"]
            assert min(results) < 4 * BT and max(results) == 4 * BT
            assert st["vanished_blocks"] > gone_before and st["known_blocks"] < known
            assert st["errors"] == 0  # eviction is not a fault
    finally:
        s.stop()


# -- faults -----------------------------------------------------------------------------------
def test_full_redis_is_a_counted_fault_and_puts_still_land_locally(seed, caplog):
    require_redis()
    s = RedisServer(maxmemory=2 << 20, policy="noeviction")  # full, and told not to evict
    try:
        caplog.set_level(logging.ERROR, logger="allocator.remote")
        seqs = [sequence(seed * 100 + i, 4) for i in range(200)]  # ~1.7 MiB of values: past maxmemory
        with make_store(s.url, host_bytes=1024 * BLOCK_BYTES) as st:
            for tokens, kv in seqs:
                assert st.put(tokens, kv) == len(tokens)  # the local tiers take every put
            r = st.stats()["remote"]
            assert r["full_errors"] >= 1 and r["degraded"] and r["write_failed_blocks"] > 0
            assert 0 < r["written_blocks"] < 4 * len(seqs)
            # logged once per degraded episode, not per block: under load a backoff retry can
            # land while Redis dips under maxmemory (recovered), then the next write is refused
            logged = sum(1 for x in caplog.records if "degraded" in x.getMessage())
            assert logged == r["degraded_episodes"] >= 1, (logged, r)
            assert r["write_failed_blocks"] > r["degraded_episodes"], r
            for tokens, kv in seqs:  # served locally, exact
                assert same_bytes(st.get(tokens), kv)
    finally:
        s.stop()


def test_killed_shard_gives_misses_for_its_blocks_exact_bytes_for_the_rest(seed, caplog):
    require_redis()
    c = RedisClusterProcs(3)
    try:
        seqs = [sequence(seed * 1000 + i, 1) for i in range(60)]  # one block each: one shard each
        with make_store(c.url) as writer:
            for tokens, kv in seqs:
                writer.put(tokens, kv)
            keys = [writer._keys(t)[1][0] for t, _ in seqs]
        owner = [c.node_of(RemoteTier.redis_key(k)).port for k in keys]
        victim = c.nodes[1]
        assert 0 < owner.count(victim.port) < len(seqs)
        with make_store(c.url, host_bytes=64 * BLOCK_BYTES) as local, make_store(c.url) as reader:
            for tokens, kv in seqs[:20]:
                local.put(tokens, kv)  # held locally as well
            victim.kill()
            caplog.set_level(logging.ERROR, logger="allocator.remote")
            worst = 0.0
            for (tokens, kv), port in zip(seqs, owner):
                t0 = time.monotonic()
                n = reader.lookup(tokens)
                assert n == (0 if port == victim.port else BT)
                if n:
                    assert same_bytes(reader.get(tokens), kv)
                else:
                    with pytest.raises(BlockNotFoundError):
                        reader.get(tokens)
                worst = max(worst, time.monotonic() - t0)
            assert worst < 2 * 0.5 + 0.5  # lookup + get, each bounded by the deadline
            st = reader.stats()["remote"]
            assert st["degraded"] and st["errors"] >= 1 and st["shards"][victim.addr]["degraded"]
            assert st["vanished_blocks"] == 0  # a shard that does not answer has not lost its blocks
            assert sum(1 for r in caplog.records if "degraded" in r.getMessage() and victim.addr in r.getMessage()) == 1
            for tokens, kv in seqs[:20]:  # the local tiers keep serving everything they hold
                assert same_bytes(local.get(tokens), kv)
    finally:
        c.stop()


def test_failover_to_a_replica_serves_the_shard_again(seed):
    require_redis()
    c = RedisClusterProcs(3, replicas=1)
    try:
        seqs = [sequence(seed * 1000 + i, 1) for i in range(30)]
        with make_store(c.url) as writer:
            for tokens, kv in seqs:
                writer.put(tokens, kv)
            keys = [RemoteTier.redis_key(writer._keys(t)[1][0]) for t, _ in seqs]
        masters = {c.node_of(k).port for k in keys}
        for n in c.nodes:  # every write has reached its replica
            if n.port in masters:
                n.client().execute_command("WAIT", 1, 5000)
        victim = c.node_of(keys[0])
        mine = [i for i, k in enumerate(keys) if c.node_of(k) is victim]
        with make_store(c.url) as reader:
            victim.kill()
            tokens, kv = seqs[mine[0]]
            assert reader.lookup(tokens) == 0  # its master is gone: a miss, not an error
            end = time.monotonic() + 20
            while reader.lookup(tokens) == 0:  # the cluster promotes the replica; the store follows
                assert time.monotonic() < end, "the store never followed the failover"
                time.sleep(0.2)
            for i in mine:
                assert same_bytes(reader.get(seqs[i][0]), seqs[i][1])
            assert reader.stats()["remote"]["degraded_episodes"] >= 1
    finally:
        c.stop()


def test_hung_server_never_blocks_past_the_deadline_and_recovers(seed):
    require_redis()
    s = RedisServer()
    try:
        tokens, kv = sequence(seed, 3)
        deadline = 0.3
        with make_store(s.url, remote_deadline_s=deadline) as a:
            a.put(tokens, kv)
        with make_store(s.url, remote_deadline_s=deadline) as b:
            b.put(tokens[:BT], kv[:, :, :BT])
            s.pause()  # a shard that accepts connections and never answers
            t0 = time.monotonic()
            assert b.lookup(tokens) == BT  # the local prefix; the remote part timed out
            with pytest.raises(BlockNotFoundError):
                b.get(tokens)
            more, more_kv = sequence(seed + 1, 2)
            b.put(more, more_kv)  # write-through to a hung server: bounded too, and the put lands locally
            assert same_bytes(b.get(more), more_kv)
            assert time.monotonic() - t0 < 3 * deadline + 0.5
            st = b.stats()["remote"]
            assert st["degraded"] and st["timeouts"] >= 1
            s.resume()
            time.sleep(1.0)  # past the backoff
            assert b.lookup(tokens) == len(tokens)
            assert same_bytes(b.get(tokens), kv)
            assert not b.stats()["remote"]["degraded"]
    finally:
        s.stop()


def test_hung_cluster_shard_costs_at_most_the_deadline(seed):
    require_redis()
    c = RedisClusterProcs(3)
    deadline = 0.3
    try:
        seqs = [sequence(seed * 1000 + i, 4) for i in range(8)]
        with make_store(c.url) as writer:
            for tokens, kv in seqs:
                writer.put(tokens, kv)
            keys = [[RemoteTier.redis_key(k) for k in writer._keys(t)[1]] for t, _ in seqs]
        victim = c.nodes[2]
        with make_store(c.url, remote_deadline_s=deadline) as reader:
            victim.pause()
            try:
                for (tokens, kv), ks in zip(seqs, keys):
                    owners = [c.node_of(k) is victim for k in ks]
                    expect = owners.index(True) if True in owners else len(ks)
                    t0 = time.monotonic()
                    n = reader.lookup(tokens)
                    assert time.monotonic() - t0 < deadline + 0.4
                    assert n == expect * BT
                    if n:
                        assert same_bytes(reader.get(tokens[:n]), kv[:, :, :n])
                more, more_kv = sequence(seed + 1, 8)
                t0 = time.monotonic()
                assert reader.put(more, more_kv) == len(more)  # write-through to a hung shard: bounded
                assert time.monotonic() - t0 < deadline + 0.4
                st = reader.stats()["remote"]
                assert st["timeouts"] >= 1 and st["shards"][victim.addr]["degraded"]
            finally:
                victim.resume()
    finally:
        c.stop()


def test_unreachable_at_start_serves_locally_then_connects(seed):
    require_redis()
    s = RedisServer()
    port = s.port
    s.stop()
    with make_store(f"redis://127.0.0.1:{port}", remote_deadline_s=0.2) as st:
        tokens, kv = sequence(seed, 2)
        assert st.put(tokens, kv) == len(tokens)
        assert same_bytes(st.get(tokens), kv)
        assert st.stats()["remote"]["degraded"]


# -- write-behind --------------------------------------------------------------------------------
def test_write_behind_is_bounded_and_says_what_is_queued(server, seed):
    tokens, kv = sequence(seed, 10)
    limit = 3 * (BLOCK_BYTES + 56)  # three values
    with make_store(server.url, remote_write="back", remote_queue_bytes=limit, remote_deadline_s=5.0) as st:
        server.pause()  # the writer's first batch waits on the server: the queue is seen as it is
        try:
            t0 = time.monotonic()
            assert st.put(tokens, kv) == len(tokens)  # the put itself never waits for Redis
            assert time.monotonic() - t0 < 1.0
            r = st.stats()["remote"]
            assert r["queued_blocks"] == 3 and r["written_blocks"] == 0 and r["queue_dropped_blocks"] == 7
            assert 0 < r["queued_bytes"] <= limit
        finally:
            server.resume()
        assert st.flush_remote(5)
        r = st.stats()["remote"]
        assert r["queued_blocks"] == 0 and r["queued_bytes"] == 0 and r["written_blocks"] == 3
    with make_store(server.url) as reader:
        assert reader.lookup(tokens) == 3 * BT
        assert same_bytes(reader.get(tokens[: 3 * BT]), kv[:, :, : 3 * BT])


# -- planning --------------------------------------------------------------------------------------
def _profile(remote_bw: float, prefill_flops: float):
    from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost

    return CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e10),
                              "remote->host": LinkCost(remote_bw, 1e-4)},
                       recompute=ComputeCost(1e12), prefill=ComputeCost(prefill_flops))


def test_planner_weighs_the_remote_link_against_prefill():
    from kvstore.restore.planner import remote_worth_reading

    assert remote_worth_reading(_profile(1e9, 1e9), LAYOUT, BT, 8)        # fast link, slow prefill: read
    assert not remote_worth_reading(_profile(1e3, 1e15), LAYOUT, BT, 8)   # slow link, fast prefill: prefill
    # no remote->host in the profile: the store's own observation decides
    from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost
    bare = CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e10)},
                       recompute=ComputeCost(1e12), prefill=ComputeCost(1e9))
    prefill_s = bare.prefill_s(LAYOUT, 8 * BT)
    assert not remote_worth_reading(bare, LAYOUT, BT, 8, observed=(2 * prefill_s, 1e12))  # latency alone loses
    assert remote_worth_reading(bare, LAYOUT, BT, 8, observed=(prefill_s / 4, 1e12))


@pytest.mark.parametrize("remote_bw, prefill_flops, restored_blocks", [(1e9, 1e9, 4), (1e3, 1e15, 1)])
def test_load_reads_remote_blocks_only_when_the_cost_model_says_so(server, seed, remote_bw, prefill_flops,
                                                                    restored_blocks):
    from kvstore.restore.costmodel import CostModel

    tokens, kv = sequence(seed + int(remote_bw), 4)
    with make_store(server.url) as a:
        a.put(tokens, kv)
    cfg = StoreConfig(layout=LAYOUT, block_tokens=BT, device_bytes=0, host_bytes=64 * BLOCK_BYTES, device="cpu",
                      namespace="ns", remote_url=server.url)
    with KVStore(cfg, cost_model=CostModel(_profile(remote_bw, prefill_flops))) as b:
        b.put(tokens[:BT], kv[:, :, :BT])
        res = b.load(tokens)
        assert res.tokens_restored == restored_blocks * BT
        assert same_bytes(res.kv, kv[:, :, : restored_blocks * BT])


def test_calibrate_measures_the_remote_link(server, tmp_path):
    import json as _json

    from kvstore.cli.main import main

    path = tmp_path / "profile.json"
    assert main(["calibrate", "--quick", "--json", "--profile", str(path), "--dir", str(tmp_path),
                 "--remote-url", server.url]) == 0
    link = _json.loads(path.read_text())["links"]["remote->host"]
    assert link["bandwidth_Bps"] > 1e6 and 0 <= link["latency_s"] < 0.5
    assert server.client().keys(b"kvs1:calibrate:*") == []


# -- a fleet of sidecars ------------------------------------------------------------------------------
@pytest.mark.parametrize("shm", [True, False])
def test_two_sidecars_share_one_redis(server, tmp_path, seed, shm):
    from clients import connect
    from kvstore.sidecar.server import ServerOptions, SidecarServer

    cfg = StoreConfig(device_bytes=0, host_bytes=32 * BLOCK_BYTES, device="cpu", remote_url=server.url)
    servers = [SidecarServer(f"ipc://{tmp_path}/s{i}.sock", cfg,
                             ServerOptions(workers=2, shm=shm, metrics_port=0 if i else None)).start()
               for i in range(2)]
    try:
        tokens, kv = sequence(seed, 3)
        ns = f"fleet-{shm}"
        with connect(servers[0].endpoint, layout=LAYOUT, namespace=ns, block_tokens=BT, timeout=10.0) as a:
            assert a.put(tokens, kv) == len(tokens)  # with shm: reserve/commit, the client writes in place
        with connect(servers[1].endpoint, layout=LAYOUT, namespace=ns, block_tokens=BT, timeout=10.0) as b:
            assert b.lookup(tokens) == len(tokens)
            assert same_bytes(b.get(tokens), kv)
            assert b.stats()["remote"]["hit_blocks"] == 3
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{servers[1].metrics_port}/metrics", timeout=10).read().decode()
        assert f'kvstore_remote_hit_blocks_total{{namespace="{ns}"}} 3.0' in body
        assert f'kvstore_remote_degraded{{namespace="{ns}"}} 0.0' in body
    finally:
        for s in servers:
            s.stop()
