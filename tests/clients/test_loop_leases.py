"""A shared-memory ``get`` (and so ``load_into``) is a lease: O(blocks) bookkeeping that the
sidecar's loop grants itself when the namespace's store lock is free, without handing it to
a worker (one thread hand-off and one inproc forward less per read). These tests pin down
what that must never change: reads are still answered while every worker is busy, the loop
never waits on a store lock a worker holds, a refused lease pins nothing, and the bytes are
the ones stored."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from clients import connect
from kvstore.errors import SidecarUnavailableError
from kvstore.layout import as_block_rows
from kvstore.sidecar.protocol import MAGIC, pack, request_frames, unpack
from tests.clients.conftest import BT, start_server, stats_gated
from tests.clients.test_sidecar_client import make_kv, wait_until

TOKENS = list(range(700, 716))  # 4 blocks


def _namespace(srv, name):
    return next(n for n in srv.namespaces() if n.name == name)


def test_shared_memory_reads_are_answered_while_every_worker_is_busy(tmp_path, layout):
    srv = start_server("tcp://127.0.0.1:*", tmp_path, workers=1, lease_timeout_s=60.0)
    try:
        kv = make_kv(layout, len(TOKENS), 11)
        with connect(srv.endpoint, layout=layout, namespace="busy", block_tokens=BT, timeout=5.0) as a, \
                connect(srv.endpoint, layout=layout, namespace="busy", block_tokens=BT, timeout=30.0) as b:
            assert a.uses_shm
            a.put(TOKENS, kv)
            with stats_gated(srv) as gate:
                blocker = threading.Thread(target=b.stats, daemon=True)
                blocker.start()
                wait_until(lambda: srv._queued == 0 and srv._inflight, timeout=5, what="stats to hold the one worker")
                with pytest.raises(SidecarUnavailableError):  # the worker really is held: what needs it waits
                    a.stats(timeout=0.3)
                assert torch.equal(a.get(TOKENS), kv)
                pool = torch.zeros((8, *layout.block_shape(BT)), dtype=layout.dtype)
                res = a.load_into(TOKENS, pool, [6, 1, 4, 3])
                assert int(res) == len(TOKENS) and res.ok
                assert torch.equal(pool[[6, 1, 4, 3]], as_block_rows(kv, BT, 4))
                gate.set()
                blocker.join(10)
        # the releases (run by the worker once free) leave nothing pinned
        wait_until(lambda: srv.open_claims() == 0, timeout=10, what="the leases' releases")
        _namespace(srv, "busy").store._check()
    finally:
        srv.stop()


def test_the_loop_never_waits_on_a_store_lock_a_worker_holds(tmp_path, layout):
    """With the store lock taken (as a worker holds it through a disk read), a shared-memory
    get goes to a worker and waits there; the loop keeps answering everyone else."""
    srv = start_server("tcp://127.0.0.1:*", tmp_path, workers=2, lease_timeout_s=60.0)
    try:
        kv = make_kv(layout, len(TOKENS), 12)
        with connect(srv.endpoint, layout=layout, namespace="locked", block_tokens=BT, timeout=20.0) as a, \
                connect(srv.endpoint, layout=layout, namespace="other", block_tokens=BT, timeout=2.0) as b:
            a.put(TOKENS, kv)
            store = _namespace(srv, "locked").store
            got: dict = {}
            with store._lock:
                reader = threading.Thread(target=lambda: got.setdefault("kv", a.get(TOKENS)), daemon=True)
                reader.start()
                wait_until(lambda: srv._inflight, timeout=5, what="the get to reach a worker")
                t0 = time.monotonic()
                assert b.health()["status"] == "ok"  # the loop is not stuck behind the lock
                assert b.lookup(TOKENS) == 0
                assert time.monotonic() - t0 < 1.5
                assert "kv" not in got  # ... while the get waits for the lock, on a worker
            reader.join(10)
            assert torch.equal(got["kv"], kv)
        wait_until(lambda: srv.open_claims() == 0, timeout=10, what="the lease's release")
    finally:
        srv.stop()


def test_a_lease_refused_on_the_loop_pins_nothing(tmp_path, layout):
    """Past a connection's claim cap the loop answers ``busy`` and unpins what it had
    pinned for that get: the store's pins are exactly the leases still held."""
    srv = start_server("tcp://127.0.0.1:*", tmp_path, workers=1, lease_timeout_s=60.0, max_claims_per_client=1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        kv = make_kv(layout, len(TOKENS), 13)
        with connect(srv.endpoint, layout=layout, namespace="cap", block_tokens=BT, timeout=5.0) as a:
            a.put(TOKENS, kv)
        store = _namespace(srv, "cap").store
        sock.connect(srv.endpoint)
        args = {"ns": "cap", "tokens": torch.tensor(TOKENS, dtype=torch.int32).numpy().tobytes(), "shm": True}
        replies = []
        for rid in (1, 2):
            sock.send_multipart(request_frames(rid, "get", args, 5000))
            frames = sock.recv_multipart()
            assert frames[0] == MAGIC
            replies.append(unpack(frames[1]))
        assert replies[0]["ok"] and replies[0]["result"]["mode"] == "shm"
        assert not replies[1]["ok"] and replies[1]["error"]["code"] == "busy"
        assert srv.open_claims() == 1
        pinned = sum(1 for e in store._tiers.index.values() if e.pins)
        assert pinned == len(TOKENS) // BT  # the first lease's blocks only, once each
        # the refused lease was never read: nothing promoted, no blocks counted as got
        stats = store.stats()
        assert stats["promotions"] == 0 and stats["get_blocks"] == 0, stats
        store._check()
        sock.send_multipart([MAGIC, pack({"v": replies[0]["v"], "id": 3, "op": "release",
                                          "args": {"claim": replies[0]["result"]["claim"]}})])
        assert unpack(sock.recv_multipart()[1])["ok"]
        assert srv.open_claims() == 0
        assert not any(e.pins for e in store._tiers.index.values())
        store._check()
    finally:
        sock.close(0)
        ctx.term()
        srv.stop()


def test_a_give_back_sent_one_way_is_not_answered(tmp_path, layout):
    """A client releases a lease without waiting (after every get and load_into): it asks
    for no answer, and none is sent -- the release still runs. Other ops always answer."""
    srv = start_server("tcp://127.0.0.1:*", tmp_path, workers=1, lease_timeout_s=60.0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        with connect(srv.endpoint, layout=layout, namespace="quiet", block_tokens=BT, timeout=5.0) as a:
            a.put(TOKENS, make_kv(layout, len(TOKENS), 14))
        sock.connect(srv.endpoint)
        args = {"ns": "quiet", "tokens": torch.tensor(TOKENS, dtype=torch.int32).numpy().tobytes(), "shm": True}

        def ask(rid, op, a, **kw):
            sock.send_multipart(request_frames(rid, op, a, 5000, **kw))

        def answers(wait_ms):
            got = []
            while sock.poll(wait_ms):
                got.append(unpack(sock.recv_multipart()[1]))
            return got

        ask(1, "get", args)
        (lease,) = answers(5000)
        assert lease["ok"] and srv.open_claims() == 1
        ask(2, "release", {"claim": lease["result"]["claim"]}, reply=False)
        wait_until(lambda: srv.open_claims() == 0, timeout=5, what="the one-way release to run")
        ask(3, "lookup", {"ns": "quiet", "tokens": args["tokens"]}, reply=False)  # not a give-back: answered
        got = answers(1000)
        assert [r["id"] for r in got] == [3] and got[0]["result"] == len(TOKENS)
        ask(4, "get", args)
        (lease,) = answers(5000)
        ask(5, "release", {"claim": lease["result"]["claim"]})  # asked for: answered
        assert [(r["id"], r["ok"]) for r in answers(1000)] == [(5, True)]
        assert srv.open_claims() == 0
    finally:
        sock.close(0)
        ctx.term()
        srv.stop()
