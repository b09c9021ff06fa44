"""SidecarClient specifics: deadlines, retries, absent/other-version sidecars, restarts,
several processes sharing one cache, and clients that die holding leases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
import zmq

from clients import SidecarClient, connect
from kvstore import ConfigError, ModelLayout
from kvstore.sidecar.protocol import (MAGIC, LayoutMismatchError, SidecarUnavailableError, VersionMismatchError, pack,
                              unpack)
from tests.clients.conftest import BT, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_kv(layout, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def wait_until(pred, timeout=10.0, what="condition"):
    """Bounded wait for a state the server reaches on its own clock (lease expiry)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class FakeSidecar:
    """A ROUTER answering with ``respond(n, header) -> header | None`` (None: stay silent)."""

    def __init__(self, respond):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.respond = respond
        self.seen: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, _magic, raw, *_ = self.sock.recv_multipart()
            header = unpack(raw)
            self.seen.append(header)
            reply = self.respond(len(self.seen), header)
            if reply is not None:
                self.sock.send_multipart([ident, MAGIC, pack(reply)])

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def hello_ok(header):
    return {"v": 1, "id": header["id"], "ok": True,
            "result": {"server_version": 1, "shm": None, "lease_timeout_s": 30.0}}


def test_absent_sidecar_is_a_clear_error(layout):
    t0 = time.monotonic()
    with pytest.raises(SidecarUnavailableError, match="no reply from the sidecar .* is `kvstore serve` running"):
        connect("tcp://127.0.0.1:9", layout=layout, connect_timeout=0.3, retries=1)
    assert time.monotonic() - t0 < 3.0


def test_other_protocol_version_is_a_clear_error(layout):
    fake = FakeSidecar(lambda n, h: {"v": 2, "id": h["id"], "ok": False,
                                     "error": {"code": "bad_version", "message": "this server speaks v2"}})
    try:
        with pytest.raises(VersionMismatchError, match="speaks protocol v2, this client v1"):
            connect(fake.endpoint, layout=layout, connect_timeout=2)
    finally:
        fake.close()


def test_timeout_retries_idempotent_ops_only(layout):
    """The fake drops the first lookup and the first put: lookup is retried on a fresh
    socket and succeeds; put is not retried and raises."""
    drops = {"lookup": 1, "put": 1}

    def respond(n, h):
        if h["op"] == "hello":
            return hello_ok(h)
        if drops.get(h["op"], 0) > 0:
            drops[h["op"]] -= 1
            return None
        return {"v": 1, "id": h["id"], "ok": True, "result": 4}

    fake = FakeSidecar(respond)
    try:
        c = SidecarClient(fake.endpoint, layout, block_tokens=BT, timeout=0.3, retries=1)
        assert c.lookup(list(range(8))) == 4
        assert [h["op"] for h in fake.seen].count("lookup") == 2
        with pytest.raises(SidecarUnavailableError, match="'put' within 0.3 s \\(1 attempt\\)"):
            c.put(list(range(8)), make_kv(layout, 8, 0))
        assert [h["op"] for h in fake.seen].count("put") == 1
        assert c.put(list(range(8)), make_kv(layout, 8, 0)) == 4  # the socket works again
        assert all(0 < h["deadline_ms"] <= 300 for h in fake.seen if h["op"] != "hello")
        c.close()
    finally:
        fake.close()


def test_layout_mismatch_through_connect(tcp_server, layout):
    a = connect(tcp_server.endpoint, layout=layout, namespace="mismatch", block_tokens=BT)
    other = ModelLayout(num_layers=3, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=layout.dtype)
    with pytest.raises(LayoutMismatchError, match="fixed to layout") as info:
        connect(tcp_server.endpoint, layout=other, namespace="mismatch", block_tokens=BT)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(LayoutMismatchError, match="block_tokens=8"):
        connect(tcp_server.endpoint, layout=layout, namespace="mismatch", block_tokens=2 * BT)
    a.close()


def test_client_survives_a_sidecar_restart(tmp_path, layout):
    endpoint = f"ipc://{tmp_path}/restart.sock"
    srv = start_server(endpoint, tmp_path / "a")
    c = connect(endpoint, layout=layout, namespace="r", block_tokens=BT, timeout=5)
    kv = make_kv(layout, 8, 1)
    assert c.put(list(range(8)), kv) == 8
    srv.stop()
    srv = start_server(endpoint, tmp_path / "b")
    try:
        assert c.lookup(list(range(8))) == 0  # a fresh sidecar: the client re-joined by itself
        assert c.put(list(range(8)), kv) == 8
        assert torch.equal(c.get(list(range(8)), device="cpu"), kv)
    finally:
        c.close()
        srv.stop()


def test_many_clients_at_once(tmp_path, layout):
    """Eight clients (half on shared memory) put and read back concurrently; room for all."""
    srv = start_server("tcp://127.0.0.1:*", tmp_path, scale=8)
    errors = []

    def worker(i):
        try:
            with connect(srv.endpoint, layout=layout, namespace="crowd", block_tokens=BT,
                         shm=bool(i % 2)) as c:
                shared = list(range(8))
                for j in range(5):
                    tokens = shared + [1000 * i + j] * BT
                    kv = make_kv(layout, 12, 7)
                    kv[:, :, 8:] = make_kv(layout, 4, 100 * i + j)
                    assert c.put(tokens, kv) == 12
                    assert torch.equal(c.get(tokens, device="cpu"), kv)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    srv.stop()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


ENGINE = """
import sys, torch
from clients import connect
from kvstore import ModelLayout
endpoint, role = sys.argv[1], sys.argv[2]
layout = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
g = torch.Generator().manual_seed(1234)
kv = torch.randn(layout.kv_shape(16), generator=g).to(torch.float16)
tokens = list(range(500, 516))
with connect(endpoint, layout=layout, namespace="shared", block_tokens=4, timeout=20) as c:
    if role == "put":
        print("put", c.put(tokens, kv), c.uses_shm, flush=True)
    elif role == "hit":
        n = c.lookup(tokens)
        print("hit", n, torch.equal(c.get(tokens[:n], device="cpu"), kv[:, :, :n]), c.uses_shm, flush=True)
    elif role == "reserve-and-hang":
        res, _ = c._request("reserve", {"ns": c.namespace, "tokens": torch.tensor(tokens, dtype=torch.int32).numpy().tobytes()})
        print("reserved", res["mode"], len(res.get("blocks", [])), flush=True)
        sys.stdin.read()
    elif role == "lease-and-hang":
        res, _ = c._request("get", {"ns": c.namespace, "tokens": torch.tensor(tokens, dtype=torch.int32).numpy().tobytes(), "shm": True})
        print("leased", res["mode"], flush=True)
        sys.stdin.read()
"""


def engine(endpoint, role, **kw):
    return subprocess.Popen([sys.executable, "-c", ENGINE, endpoint, role], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, **kw)


def test_two_processes_share_one_cache(tcp_server):
    p = engine(tcp_server.endpoint, "put")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and out.split() == ["put", "16", "True"]
    h = engine(tcp_server.endpoint, "hit")
    out, _ = h.communicate(timeout=60)
    assert h.returncode == 0 and out.split() == ["hit", "16", "True", "True"]


@pytest.fixture
def quick_lease_server(tmp_path):
    srv = start_server("tcp://127.0.0.1:*", tmp_path, lease_timeout_s=0.5)
    yield srv
    srv.stop()


def test_client_killed_mid_put_leaks_no_reservation(quick_lease_server, layout):
    srv = quick_lease_server
    p = engine(srv.endpoint, "reserve-and-hang")
    line = p.stdout.readline().split()
    assert line == ["reserved", "shm", "4"], line
    ns = next(n for n in srv.namespaces() if n.name == "shared")
    top = ns.store._tiers.tiers[0]
    assert top.pool.used_count == 4 and srv.open_claims() == 1  # four slots held, invisible
    assert ns.store.lookup(list(range(500, 516))) == 0
    p.kill()
    p.wait(10)
    wait_until(lambda: srv.open_claims() == 0, what="the reservation to be reclaimed")
    assert top.pool.used_count == 0 and ns.store.stats()["blocks"] == 0
    ns.store._check()
    with connect(srv.endpoint, layout=layout, namespace="shared", block_tokens=BT) as c:
        kv = make_kv(layout, 16, 3)
        assert c.put(list(range(500, 516)), kv) == 16
        assert torch.equal(c.get(list(range(500, 516)), device="cpu"), kv)


def test_client_killed_holding_a_lease_leaks_no_pin(quick_lease_server, layout):
    srv = quick_lease_server
    with connect(srv.endpoint, layout=layout, namespace="shared", block_tokens=BT) as c:
        c.put(list(range(500, 516)), make_kv(layout, 16, 3))
        p = engine(srv.endpoint, "lease-and-hang")
        assert p.stdout.readline().split() == ["leased", "shm"]
        ns = next(n for n in srv.namespaces() if n.name == "shared")
        assert c.clear() == 0  # pinned blocks survive a clear while leased
        p.kill()
        p.wait(10)
        wait_until(lambda: srv.open_claims() == 1, what="the lease to be reclaimed")  # 1: c's staged slots
        assert c.clear() == 4 and c.stats()["blocks"] == 0
        ns.store._check()


def test_serve_command_sigterm_exits_zero_and_cleans_up(tmp_path, layout):
    sock = tmp_path / "serve.sock"
    cmd = [sys.executable, "-m", "kvstore", "serve", "--endpoint", f"ipc://{sock}", "--device-bytes", "64KiB",
           "--host-bytes", "64KiB", "--metrics-port", "0", "--lease-timeout", "5"]
    p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # skip log lines before it (e.g. a sweep of dead sidecars' arenas)
            line = p.stderr.readline()
            if "serving on " in line or not line:
                break
        assert "serving on ipc://" in line, line
        metrics_url = line.split("metrics on ")[1].strip()
        with connect(f"ipc://{sock}", layout=layout, namespace="cli", block_tokens=BT, timeout=10) as c:
            c.put(list(range(8)), make_kv(layout, 8, 0))
            assert c.lookup(list(range(8))) == 8
            assert c.uses_shm
            shm_paths = [s["path"] for s in c.server_info["shm"]["segments"]]
            assert all(os.path.exists(path) for path in shm_paths)
            out = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--endpoint", f"ipc://{sock}", "--json"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            import json

            stats = json.loads(out.stdout)
            assert stats["namespaces"]["cli"]["blocks"] == 2 and stats["namespaces"]["cli"]["lookups"] == 1
            body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
            assert 'kvstore_hits_total{namespace="cli"} 2.0' in body
            assert 'kvstore_request_seconds_count{op="put_shm"} 1.0' in body  # a shm put: one message
            assert 'kvstore_tier_used_bytes{namespace="cli",tier="device"}' in body
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert "stopped" in p.stderr.read()
        assert not any(os.path.exists(path) for path in shm_paths)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
