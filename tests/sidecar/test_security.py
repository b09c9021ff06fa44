"""Sidecar security: bind policy, ipc socket mode, CurveZMQ admission (refusals logged and
counted), namespaces bound to keys, and the per-request limits."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
import zmq

from kvstore import ModelLayout, StoreConfig
from kvstore.errors import ConfigError
from kvstore.sidecar.security import write_keypair
from kvstore.sidecar.protocol import MAGIC, VERSION, pack, unpack
from kvstore.sidecar.security import InsecureBindError, is_local_endpoint, load_keys
from kvstore.sidecar.server import ServerOptions, SidecarServer

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
BT = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = StoreConfig(device_bytes=0, host_bytes=16 * LAYOUT.kv_block_bytes(BT), disk_bytes=0)


def call(sock, op, args, payload=(), rid=1, timeout_ms=3000):
    """One request; None when it could not be sent or was not answered within ``timeout_ms``."""
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        sock.send_multipart([MAGIC, pack({"v": VERSION, "id": rid, "op": op, "args": args, "deadline_ms": 5000}),
                             *payload])
    except zmq.Again:  # a refused handshake leaves the DEALER without a peer
        return None
    if not sock.poll(timeout_ms):
        return None
    return unpack(sock.recv_multipart()[1])


def dealer(ctx, endpoint, keys=None, server_key=None):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys.public, keys.secret, server_key
    s.connect(endpoint)
    return s


def hello_args(ns):
    return {"ns": ns, "layout": LAYOUT.to_dict(), "block_tokens": BT}


@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:*", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:1", True), ("ipc:///tmp/x.sock", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://10.1.2.3:5555", False), ("tcp://eth0:5555", False),
    ("tcp://[::]:5555", False)])
def test_which_endpoints_are_local(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_a_routable_bind_is_refused_without_curve(caplog):
    srv = SidecarServer("tcp://0.0.0.0:*", CFG, ServerOptions(workers=1))
    with pytest.raises(InsecureBindError, match="CurveZMQ is off"):
        srv.bind()
    srv.stop()
    caplog.set_level(logging.WARNING, logger="kvstore.sidecar.security")
    srv = SidecarServer("tcp://0.0.0.0:*", CFG, ServerOptions(workers=1, insecure_allow_remote=True)).start()
    srv.stop()
    assert any("INSECURE" in r.getMessage() for r in caplog.records)


def test_serve_command_refuses_a_routable_bind():
    out = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--endpoint", "tcp://0.0.0.0:0",
                          "--host-bytes", "64KiB"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to bind tcp://0.0.0.0:0" in out.stderr, out.stderr[-2000:]


def test_ipc_socket_file_is_private(tmp_path):
    path = tmp_path / "kvs.sock"
    old = os.umask(0o000)  # the worst umask: the file would be 0777 without the chmod
    try:
        srv = SidecarServer(f"ipc://{path}", CFG, ServerOptions(workers=1)).start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    write_keypair(d, "server")
    write_keypair(d / "allow", "alice")
    write_keypair(d / "allow", "bob")
    write_keypair(d, "mallory")  # a valid key pair, not on the allow-list
    return d


@pytest.fixture
def curve_server(keys, tmp_path):
    srv = SidecarServer("tcp://127.0.0.1:*", CFG,
                        ServerOptions(workers=2, curve_secret=str(keys / "server.key_secret"),
                                      curve_allow=str(keys / "allow"), metrics_port=0)).start()
    yield srv
    srv.stop(timeout=10)


def test_curve_admits_allowed_keys_and_refuses_others(curve_server, keys, caplog):
    caplog.set_level(logging.WARNING)
    srv, ctx = curve_server, zmq.Context()
    server_key = load_keys(keys / "server.key").public
    try:
        alice = dealer(ctx, srv.endpoint, load_keys(keys / "allow" / "alice.key_secret"), server_key)
        h = call(alice, "hello", hello_args("a"))
        assert h is not None and h["ok"], h
        refused = [dealer(ctx, srv.endpoint, load_keys(keys / "mallory.key_secret"), server_key),  # unknown key
                   dealer(ctx, srv.endpoint),  # no CURVE at all
                   dealer(ctx, srv.endpoint, load_keys(keys / "allow" / "bob.key_secret"),  # wrong server key
                          load_keys(keys / "mallory.key").public)]
        for s in refused:
            assert call(s, "health", {}, timeout_ms=700) is None  # never answered
        assert srv.counters["unauthorised"] >= 3, srv.counters
        st = call(alice, "stats", {})["result"]["server"]
        assert "unauthorised" not in st and "requests" not in st, st  # server-wide counts are no tenant's
        messages = [r.getMessage() for r in caplog.records]
        assert any("unknown client key" in m for m in messages), messages
        assert any("handshake failed" in m for m in messages), messages
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert 'kvstore_server_events_total{kind="unauthorised"}' in metrics
        for s in [alice, *refused]:
            s.close(0)
    finally:
        ctx.destroy(0)


def test_namespaces_are_bound_to_the_key_that_made_them(curve_server, keys):
    """Each key has namespaces of its own: bob naming alice's namespace reaches nothing of hers
    and learns nothing (not even that the name exists: no ``forbidden``, no layout error)."""
    srv, ctx = curve_server, zmq.Context()
    server_key = load_keys(keys / "server.key").public
    try:
        alice = dealer(ctx, srv.endpoint, load_keys(keys / "allow" / "alice.key_secret"), server_key)
        bob = dealer(ctx, srv.endpoint, load_keys(keys / "allow" / "bob.key_secret"), server_key)
        assert call(alice, "hello", hello_args("alice-ns"))["ok"]
        assert call(bob, "hello", hello_args("bob-ns"))["ok"]
        kv = torch.randn(LAYOUT.kv_shape(8)).to(LAYOUT.dtype)
        tokens = torch.arange(8, dtype=torch.int32).numpy().tobytes()
        put = call(alice, "put", {"ns": "alice-ns", "tokens": tokens, "kv": {"dtype": "float16", "shape": list(kv.shape)}},
                   payload=[kv.numpy().tobytes()])
        assert put["ok"] and put["result"] == 8, put
        never = call(bob, "lookup", {"ns": "no-such-ns", "tokens": tokens})["error"]
        for op, args in [("lookup", {"ns": "alice-ns", "tokens": tokens}),
                         ("get", {"ns": "alice-ns", "tokens": tokens}), ("clear", {"ns": "alice-ns"}),
                         ("stats", {"ns": "alice-ns"}),
                         ("lookup", {"ns": "alice-ns", "tokens": tokens, "@peer": "alice"})]:  # no forging
            h = call(bob, op, args)
            assert not h["ok"] and h["error"]["code"] == "unknown_namespace", (op, h)
            assert h["error"]["message"].replace("alice-ns", "no-such-ns") == never["message"], (op, h)
        other = {**hello_args("alice-ns"), "block_tokens": BT * 2}
        assert call(bob, "hello", other)["ok"]  # bob's own "alice-ns": no layout_mismatch reveals hers
        assert call(bob, "lookup", {"ns": "alice-ns", "tokens": tokens})["result"] == 0
        assert call(alice, "lookup", {"ns": "alice-ns", "tokens": tokens})["result"] == 8
        assert set(call(bob, "stats", {})["result"]["namespaces"]) == {"bob-ns", "alice-ns"}
        assert set(call(alice, "stats", {})["result"]["namespaces"]) == {"alice-ns"}
        assert call(alice, "health", {})["result"]["namespaces"] == 1
        assert call(bob, "health", {})["result"]["namespaces"] == 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert "alice-ns" not in metrics and "bob-ns" not in metrics
        alice.close(0)
        bob.close(0)
    finally:
        ctx.destroy(0)


def test_one_key_cannot_take_every_namespace(keys):
    srv = SidecarServer("tcp://127.0.0.1:*", CFG,
                        ServerOptions(workers=1, curve_secret=str(keys / "server.key_secret"),
                                      curve_allow=str(keys / "allow"), max_namespaces_per_key=2)).start()
    ctx = zmq.Context()
    try:
        server_key = load_keys(keys / "server.key").public
        alice = dealer(ctx, srv.endpoint, load_keys(keys / "allow" / "alice.key_secret"), server_key)
        bob = dealer(ctx, srv.endpoint, load_keys(keys / "allow" / "bob.key_secret"), server_key)
        assert call(alice, "hello", hello_args("a1"))["ok"] and call(alice, "hello", hello_args("a2"))["ok"]
        h = call(alice, "hello", hello_args("a3"))
        assert not h["ok"] and h["error"]["code"] == "capacity" and "per key" in h["error"]["message"], h
        assert call(alice, "hello", hello_args("a1"))["ok"]  # joining its own is fine
        assert call(bob, "hello", hello_args("b1"))["ok"]  # another key still has room
        alice.close(0)
        bob.close(0)
    finally:
        ctx.destroy(0)
        srv.stop(timeout=10)


def test_curve_needs_both_key_options(keys):
    srv = SidecarServer("tcp://127.0.0.1:*", CFG, ServerOptions(curve_secret=str(keys / "server.key_secret")))
    with pytest.raises(ConfigError, match="allow-list"):
        srv.bind()
    srv.stop()


# -- limits ------------------------------------------------------------------------------
@pytest.fixture
def limited():
    srv = SidecarServer("tcp://127.0.0.1:*", CFG, ServerOptions(workers=1, max_tokens=64,
                                                                 max_inflight_per_client=2,
                                                                 max_message_bytes=64 << 10)).start()
    ctx = zmq.Context()
    sock = dealer(ctx, srv.endpoint)
    assert call(sock, "hello", hello_args("lim"))["ok"]
    yield srv, sock
    sock.close(0)
    ctx.destroy(0)
    srv.stop(timeout=10)


@pytest.mark.parametrize("op", ["lookup", "get", "reserve", "plan"])
def test_tokens_per_request_are_limited(limited, op):
    _, sock = limited
    ok = call(sock, op, {"ns": "lim", "tokens": torch.arange(64, dtype=torch.int32).numpy().tobytes()})
    assert ok["ok"] or ok["error"]["code"] not in ("invalid_argument",), ok
    h = call(sock, op, {"ns": "lim", "tokens": list(range(65))})
    assert not h["ok"] and h["error"]["code"] == "invalid_argument" and "limit of 64" in h["error"]["message"]


def test_message_size_is_limited(limited):
    srv, sock = limited
    h = call(sock, "health", {}, payload=[b"\0" * (65 << 10)])
    assert not h["ok"] and h["error"]["code"] == "too_large"
    assert call(sock, "health", {})["ok"]


def test_in_flight_requests_per_connection_are_limited(limited):
    srv, sock = limited
    gate = threading.Event()
    real = srv._handlers["stats"]

    def slow_stats(args, payload):
        gate.wait(10)
        return real(args, payload)

    srv._handlers["stats"] = slow_stats
    try:
        for rid in range(5):
            sock.send_multipart([MAGIC, pack({"v": VERSION, "id": rid, "op": "stats", "args": {}})])
        replies = {}
        for _ in range(3):  # three refused at once, while two are held
            assert sock.poll(3000)
            h = unpack(sock.recv_multipart()[1])
            replies[h["id"]] = h
        assert all(not h["ok"] and h["error"]["code"] == "busy" for h in replies.values()), replies
        # another connection is not limited by this one's requests
        ctx2 = zmq.Context()
        other = dealer(ctx2, srv.endpoint)
        assert call(other, "health", {})["ok"]
        other.close(0)
        ctx2.destroy(0)
        gate.set()
        for _ in range(2):
            assert sock.poll(5000)
            h = unpack(sock.recv_multipart()[1])
            assert h["ok"], h
        assert srv.counters["busy"] == 3
        assert call(sock, "stats", {})["ok"]  # the slots were given back
        assert srv._inflight == {}
    finally:
        gate.set()
        srv._handlers["stats"] = real
