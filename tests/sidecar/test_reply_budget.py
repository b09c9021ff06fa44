"""Issue 23: replies are bounded in bytes, not messages. Peers that request large KV over
TCP and never read it -- one connection with many requests, many connections with one each
-- hold at most ``max_reply_bytes`` of the sidecar's memory (RSS measured around it), the
rest are answered ``busy``, the bound and what is held are in the stats, and what was held
is given back when the peers go."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import zmq

from kvstore import StoreConfig
from kvstore.errors import BusyError, ConfigError
from kvstore.sidecar.limits import ReplyBudget
from kvstore.sidecar.server import ServerOptions, SidecarServer
from tests.sidecar.test_limits import LAYOUT, MiB, ROOT, call, dealer, hello_args, rss

#: a 16 MiB KV prefix of LAYOUT (128 bytes a token)
NTOK = (16 * MiB) // LAYOUT.kv_bytes_per_token

HOGS = """
import sys, time, zmq
from kvstore.sidecar.protocol import MAGIC, VERSION, pack
import torch
ctx = zmq.Context()
def sock():
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(sys.argv[1])
    return s
tokens = torch.arange(int(sys.argv[2]), dtype=torch.int32).numpy().tobytes()
get = lambda i: [MAGIC, pack({"v": VERSION, "id": i, "op": "get", "args": {"ns": "big", "tokens": tokens}})]
one = sock()
for i in range(60):          # one connection: 60 large gets, never read
    one.send_multipart(get(i + 1))
many = [sock() for _ in range(40)]
for i, s in enumerate(many):  # forty connections: one large get each, never read
    s.send_multipart(get(100 + i))
print("sent", flush=True)
time.sleep(120)
"""


def test_unread_large_replies_are_bounded_in_bytes(tmp_path):
    budget, per_peer = 64 * MiB, 32 * MiB
    bb = LAYOUT.kv_block_bytes(4)
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=0, host_bytes=(20 * MiB // bb) * bb,
                                                         disk_bytes=0),
                        ServerOptions(workers=2, shm=False, max_inflight_per_client=1024,
                                      max_reply_bytes=budget, max_reply_bytes_per_peer=per_peer)).start()
    ctx = zmq.Context()
    try:
        s = dealer(ctx, srv.endpoint)
        kv = torch.randn(LAYOUT.kv_shape(NTOK)).half()
        tokens = torch.arange(NTOK, dtype=torch.int32).numpy().tobytes()
        assert call(s, "hello", hello_args("big"))["ok"]
        desc = {"dtype": "float16", "shape": list(kv.shape)}
        assert call(s, "put", {"ns": "big", "tokens": tokens, "kv": desc}, [kv.numpy().tobytes()])["result"] == NTOK
        got = call(s, "get", {"ns": "big", "tokens": tokens})  # one reply read: the path works
        assert got["ok"]
        before = rss()
        hogs = subprocess.Popen([sys.executable, "-c", HOGS, srv.endpoint, str(NTOK)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert hogs.stdout.readline().strip() == "sent"
            end = time.monotonic() + 60
            while time.monotonic() < end:  # until the sidecar has answered all 100 gets
                r = call(s, "stats", {})["result"]["server"]["replies"]
                if r["admitted"] + r["refused"] >= 101:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            grown = rss() - before
            r = call(s, "stats", {})["result"]["server"]["replies"]
            # the bound is in the stats, as configured, and holds
            assert r["max_bytes"] == budget and r["max_bytes_per_peer"] == per_peer
            assert r["admitted"] + r["refused"] >= 101, r
            assert r["refused"] >= 50, r  # most were answered busy (without a budget: none)
            assert r["queued_bytes"] <= budget and r["peak_bytes"] <= budget, r
            assert grown < budget + 32 * MiB, f"{r} 100 unread 16 MiB replies grew the sidecar by {grown / MiB:.0f} MiB"
            print(f"\nunread replies: the sidecar grew by {grown / MiB:.0f} MiB (bound {budget / MiB:.0f} MiB); {r}")
            # a peer that does read is served meanwhile (its own budget)
            assert call(s, "get", {"ns": "big", "tokens": tokens})["ok"]
        finally:
            hogs.kill()
            hogs.wait(10)
        # the peers are gone: ZeroMQ drops what it queued for them and the bytes come back
        end = time.monotonic() + 20
        while call(s, "stats", {})["result"]["server"]["replies"]["queued_bytes"] and time.monotonic() < end:
            time.sleep(0.1)
        assert call(s, "stats", {})["result"]["server"]["replies"]["queued_bytes"] == 0
    finally:
        ctx.destroy(0)
        srv.stop(timeout=10)


def test_a_busy_reply_is_structured_and_a_reply_over_the_peer_budget_is_too_large():
    b = ReplyBudget(per_peer=10, total=15)
    b.reserve(b"a", 8)
    with pytest.raises(BusyError, match="max_reply_bytes_per_peer=10"):
        b.reserve(b"a", 4)
    b.reserve(b"b", 6)
    with pytest.raises(BusyError):
        b.reserve(b"c", 2)  # 14 + 2 > 15 in all
    b.release(b"a", 8)
    b.reserve(b"c", 2)
    with pytest.raises(Exception) as exc:
        b.reserve(b"d", 11)
    assert getattr(exc.value, "code", None) == "too_large"
    st = b.stats()
    assert st["queued_bytes"] == 8 and st["refused"] == 3 and st["admitted"] == 3 and st["peak_bytes"] == 14


def test_reply_budgets_are_validated_at_start():
    with pytest.raises(ConfigError, match="max_reply_bytes_per_peer"):
        SidecarServer("tcp://127.0.0.1:*", options=ServerOptions(max_reply_bytes=MiB,
                                                                 max_reply_bytes_per_peer=2 * MiB)).bind()
    with pytest.raises(ConfigError, match="max_reply_bytes must be a positive int"):
        SidecarServer("tcp://127.0.0.1:*", options=ServerOptions(max_reply_bytes=0)).bind()


def test_the_budgets_are_flags_checked_before_anything_starts(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--check", "--endpoint", f"ipc://{tmp_path}/s.sock",
                          "--max-reply-bytes", "1M", "--max-reply-bytes-per-peer", "2M"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_reply_bytes_per_peer" in bad.stderr, bad.stderr[-500:]
    good = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--check", "--endpoint", f"ipc://{tmp_path}/s.sock",
                           "--max-reply-bytes", "64M", "--max-reply-bytes-per-peer", "16M"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr[-500:]
