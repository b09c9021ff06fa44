"""allocator.remote: URL parsing, the self-checking value format, and batches against real
redis-server processes (one node and a 3-master cluster)."""

from __future__ import annotations

import os

import pytest

from allocator.remote import (FORM_ACT, FORM_KV, HEADER_BYTES, RemoteAuthError, RemoteBackend, RemoteURLError,
                              pack_block, parse_remote_url, unpack_block)
from tests.redisserver import RedisClusterProcs, RedisServer, require_redis


# -- URLs ------------------------------------------------------------------------------------
def test_parse_urls():
    a = parse_remote_url("redis://127.0.0.1:7000/3", env={})
    assert (a.cluster, a.nodes, a.db, a.tls, a.password) == (False, (("127.0.0.1", 7000),), 3, False, None)
    a = parse_remote_url("rediss://bob:s%40cret@h:6380", env={})
    assert (a.tls, a.username, a.password, a.nodes) == (True, "bob", "s@cret", (("h", 6380),))
    a = parse_remote_url("redis+cluster://a:1,b:2,c", env={"KVSTORE_REDIS_PASSWORD": "pw"})
    assert a.cluster and a.nodes == (("a", 1), ("b", 2), ("c", 6379)) and a.password == "pw"
    assert "pw" not in a.describe() and "pw" not in repr(a)


def test_tls_options_from_the_query(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    a = parse_remote_url(f"rediss://h:1?ssl_ca_certs={ca}&ssl_cert_reqs=required&ssl_check_hostname=false", env={})
    assert a.tls and dict(a.tls_options) == {"ssl_ca_certs": str(ca), "ssl_cert_reqs": "required",
                                             "ssl_check_hostname": False}
    with pytest.raises(RemoteURLError, match="ssl_cert_reqs"):
        parse_remote_url("rediss://h:1?ssl_cert_reqs=maybe", env={})


@pytest.mark.parametrize("url", ["http://x:1", "redis://", "redis://h:notaport", "redis://a:1,b:2",
                                 "redis+cluster://a:1/2", "redis://h:1/db", "localhost:6379"])
def test_bad_urls_are_clear_errors(url):
    with pytest.raises(RemoteURLError):
        parse_remote_url(url, env={})


# -- values ------------------------------------------------------------------------------------
def test_value_round_trip_and_every_mismatch_is_a_miss(rng):
    key, fp = bytes(rng.getrandbits(8) for _ in range(16)), bytes(range(16))
    payload = bytes(rng.getrandbits(8) for _ in range(1000))
    v = pack_block(key, FORM_KV, fp, payload)
    assert len(v) == HEADER_BYTES + len(payload)
    assert bytes(unpack_block(v, key, FORM_KV, fp, len(payload))) == payload
    assert unpack_block(v, key, FORM_ACT, fp, len(payload)) is None            # other form
    assert unpack_block(v, key[::-1], FORM_KV, fp, len(payload)) is None       # stored under another key
    assert unpack_block(v, key, FORM_KV, fp[::-1], len(payload)) is None       # other layout
    assert unpack_block(v, key, FORM_KV, fp, len(payload) - 1) is None         # other block size
    assert unpack_block(v[:-1], key, FORM_KV, fp, len(payload)) is None        # truncated
    assert unpack_block(None, key, FORM_KV, fp, len(payload)) is None
    for pos in (0, 20, HEADER_BYTES + rng.randrange(len(payload))):            # any flipped byte
        bad = bytearray(v)
        bad[pos] ^= 0x40
        assert unpack_block(bytes(bad), key, FORM_KV, fp, len(payload)) is None


# -- real servers -------------------------------------------------------------------------------
def _kv(n: int, size: int, rng) -> tuple[list[bytes], list[bytes]]:
    keys = [b"t:" + bytes(rng.getrandbits(8) for _ in range(8)) for _ in range(n)]
    return keys, [os.urandom(size) for _ in range(n)]


def test_single_node_batches_are_one_round_trip(redis_server_proc, rng):
    server = redis_server_proc
    b = RemoteBackend(server.url)
    b.connect()
    keys, values = _kv(50, 4096, rng)
    assert all(b.set_many(keys, values))
    assert b.counters.round_trips == 1
    assert b.get_many(keys + [b"absent"]) == values + [None]
    assert b.exists_many([keys[0], b"absent"]) == [True, False]
    assert b.counters.round_trips == 3
    b.close()


def test_cluster_batches_are_one_round_trip_per_shard(redis_cluster_procs, rng):
    cluster = redis_cluster_procs
    b = RemoteBackend(cluster.url)
    b.connect()
    assert len(b.shards()) == 3
    keys, values = _kv(60, 1024, rng)
    assert len({cluster.node_of(k).port for k in keys}) == 3  # the batch spans every shard
    assert all(b.set_many(keys, values, ttl_s=60))
    assert b.counters.round_trips == 3
    assert b.get_many(keys) == values
    assert b.counters.round_trips == 6
    node = cluster.node_of(keys[0])
    assert 0 < node.client().pttl(keys[0]) <= 60_000
    b.close()


def test_wrong_password_is_a_clear_error():
    require_redis()
    s = RedisServer(password="right-pw")
    try:
        for url in (f"redis://:wrong@127.0.0.1:{s.port}", f"redis://127.0.0.1:{s.port}"):
            b = RemoteBackend(parse_remote_url(url, env={}))
            with pytest.raises(RemoteAuthError, match="password|credentials"):
                b.connect()
        good = RemoteBackend(parse_remote_url(f"redis://127.0.0.1:{s.port}", env={"KVSTORE_REDIS_PASSWORD": "right-pw"}))
        good.connect()
        assert good.set_many([b"k"], [b"v"]) == [True]
        good.close()
    finally:
        s.stop()


def test_cluster_wrong_password_is_a_clear_error():
    require_redis()
    c = RedisClusterProcs(3, password="cluster-pw")
    try:
        hosts = ",".join(n.addr for n in c.nodes)
        for url in (f"redis+cluster://:wrong@{hosts}", f"redis+cluster://{hosts}"):
            with pytest.raises(RemoteAuthError, match="credentials"):
                RemoteBackend(parse_remote_url(url, env={})).connect()
        good = RemoteBackend(parse_remote_url(f"redis+cluster://{hosts}", env={"KVSTORE_REDIS_PASSWORD": "cluster-pw"}))
        good.connect()
        keys = [b"k%d" % i for i in range(30)]
        assert all(good.set_many(keys, keys)) and good.get_many(keys) == keys
        good.close()
    finally:
        c.stop()
