"""Claims a careless or hostile client makes cannot pin the sidecar's memory for good:
an owner naming another process (pid 1) expires, a lease orphaned by a lost reply or a
failed copy is freed, one connection cannot hold more than its cap, and the reaper never
stalls other clients."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import zmq

from clients import connect
from kvstore.errors import BusyError
from kvstore.sidecar.procinfo import process_start_time
from kvstore.sidecar.protocol import MAGIC, VERSION, pack, unpack
from tests.clients.conftest import BT, start_server, stats_gated
from tests.clients.test_sidecar_client import make_kv, wait_until

TOKENS = list(range(500, 516))


def _tok_bytes(tokens):
    return torch.tensor(tokens, dtype=torch.int32).numpy().tobytes()


@pytest.fixture
def quick(tmp_path):
    srv = start_server("tcp://127.0.0.1:*", tmp_path, lease_timeout_s=0.3, max_claims_per_client=4)
    yield srv
    srv.stop()


HELD = ("lease", "reservation")  # not the staged spare slots a shm client keeps


def test_a_reservation_naming_pid_1_as_owner_expires(quick, layout):
    """pid 1 is alive forever; it does not map our arenas, so its claim is not kept."""
    srv = quick
    start = process_start_time(1)
    if start is None:
        pytest.skip("no /proc/1/stat here")
    with connect(srv.endpoint, layout=layout, namespace="pid1", block_tokens=BT) as c:
        owner = {"host": c._owner["host"], "pid": 1, "start": start}
        res, _ = c._request("reserve", {"ns": "pid1", "tokens": _tok_bytes(TOKENS), "owner": owner})
        assert res["mode"] == "shm"
        wait_until(lambda: srv.open_claims(HELD) == 0, timeout=10, what="the pid-1 reservation to be reclaimed")
        assert srv.counters["reclaimed"] == 1 and srv.counters["kept_alive"] == 0
        kv = make_kv(layout, 16, 1)
        assert c.put(TOKENS, kv) == 16 and torch.equal(c.get(TOKENS, device="cpu"), kv)


def test_a_lease_whose_reply_was_lost_expires_although_its_owner_lives(quick, layout):
    """A get that timed out and was retried leaves a lease the client never saw: it must not
    pin the blocks for as long as the (live) client runs."""
    srv = quick
    with connect(srv.endpoint, layout=layout, namespace="lost", block_tokens=BT) as c:
        c.put(TOKENS, make_kv(layout, 16, 2))
        res, _ = c._request("get", {"ns": "lost", "tokens": _tok_bytes(TOKENS), "shm": True, "owner": c._owner})
        assert res["mode"] == "shm" and srv.open_claims(HELD) == 1  # ...and the client forgets it
        wait_until(lambda: srv.open_claims(HELD) == 0, timeout=10, what="the orphaned lease to expire")
        assert srv.counters["reclaimed"] == 1


def test_a_copy_out_that_raises_releases_its_lease(quick, layout, monkeypatch):
    srv = quick
    with connect(srv.endpoint, layout=layout, namespace="copyfail", block_tokens=BT) as c:
        kv = make_kv(layout, 16, 3)
        c.put(TOKENS, kv)

        def broken(*a, **k):
            raise MemoryError("no room for the copy")

        monkeypatch.setattr(c, "_copy_verified", broken)
        with pytest.raises(MemoryError):
            c.get(TOKENS, device="cpu")
        # released at once (a one-way message), not after the lease timeout
        wait_until(lambda: srv.open_claims(HELD) == 0, timeout=srv.options.lease_timeout_s / 4,
                   what="the lease to be released")
        monkeypatch.undo()
        assert torch.equal(c.get(TOKENS, device="cpu"), kv)


def test_one_connection_cannot_hold_more_claims_than_its_cap(quick, layout):
    srv = quick
    with connect(srv.endpoint, layout=layout, namespace="cap", block_tokens=BT) as c, \
            connect(srv.endpoint, layout=layout, namespace="cap", block_tokens=BT) as other:
        c.put(TOKENS, make_kv(layout, 16, 4))
        args = {"ns": "cap", "tokens": _tok_bytes(TOKENS), "shm": True, "owner": c._owner}
        for _ in range(srv.options.max_claims_per_client):
            assert c._request("get", args)[0]["mode"] == "shm"
        with pytest.raises(BusyError, match="leases/reservations"):
            c._request("get", args)
        assert srv.open_claims(HELD) == srv.options.max_claims_per_client
        assert other.lookup(TOKENS) == 16 and torch.equal(other.get(TOKENS, device="cpu"), make_kv(layout, 16, 4))
        # other's lease came and went (released one-way, so wait for it; c's expire after 0.3 s anyway)
        wait_until(lambda: srv.open_claims(HELD) <= srv.options.max_claims_per_client, timeout=5,
                   what="the other connection's lease to be released")


def test_reaping_many_claims_does_not_stall_other_clients(tmp_path, layout):
    """Thousands of claims expire at once (each owner checked in /proc): the reaper runs on
    its own thread, so a second client's requests keep their latency."""
    n_claims = 3000
    srv = start_server("tcp://127.0.0.1:*", tmp_path, scale=1, lease_timeout_s=3.0,
                       max_claims_per_client=n_claims + 10)
    ctx = zmq.Context()
    try:
        with connect(srv.endpoint, layout=layout, namespace="reap", block_tokens=BT) as c:
            c.put(TOKENS, make_kv(layout, 16, 5))
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(srv.endpoint)
            header = pack({"v": VERSION, "id": 1, "op": "get", "deadline_ms": 0,
                           "args": {"ns": "reap", "tokens": _tok_bytes(TOKENS), "shm": True, "owner": c._owner}})
            for i in range(n_claims):
                sock.send_multipart([MAGIC, header])
                if i % 50 == 49:  # keep under the in-flight cap
                    for _ in range(50):
                        assert sock.poll(10_000)
                        assert unpack(sock.recv_multipart()[1])["ok"]
            assert srv.open_claims(HELD) == n_claims
            lat = []
            end = time.monotonic() + 4 * srv.options.lease_timeout_s
            while srv.open_claims(HELD) and time.monotonic() < end + 10:
                t0 = time.perf_counter()
                c.health()
                lat.append(time.perf_counter() - t0)
            assert srv.open_claims(HELD) == 0
            wait_until(lambda: srv.counters["reclaimed"] == n_claims, what="the reaper to count its pass")
            assert lat, "the claims vanished before any health request"
            assert max(lat) < 0.25, f"health stalled {max(lat) * 1e3:.0f} ms (median {statistics.median(lat) * 1e3:.1f})"
            sock.close(0)
    finally:
        ctx.destroy(0)
        srv.stop()


def test_give_backs_run_however_late_and_however_busy(tmp_path, layout):
    """A release is sent without waiting for its answer (after a get, at close). One that
    waited in a clogged queue past its deadline, or arrived while its connection was at its
    in-flight cap, must still run: refusing it kept the claim open until the lease timed out
    (the 32-client load test saw 9 claims left after every client had closed)."""
    import threading

    srv = start_server("tcp://127.0.0.1:*", tmp_path, workers=1, lease_timeout_s=60.0, max_inflight_per_client=1)
    try:
        with connect(srv.endpoint, layout=layout, namespace="late", block_tokens=BT, timeout=0.3, shm=True) as a:
            assert a.uses_shm
            a.put(TOKENS, make_kv(layout, 16, 5))
            _, args = a._ns_args(TOKENS)
            lease, _ = a._lease(args)  # a get's lease, as get() holds it while it copies
            assert lease["mode"] == "shm" and srv.open_claims() == 2  # + the staged spare slots
            with stats_gated(srv, timeout=10) as gate, \
                    connect(srv.endpoint, layout=layout, namespace="late", block_tokens=BT, timeout=30) as b:
                blocker = threading.Thread(target=b.stats, daemon=True)
                blocker.start()
                wait_until(lambda: srv._queued == 0 and srv._inflight, timeout=5, what="stats to hold the one worker")
                a._send_oneway("release", {"claim": lease["claim"]})  # queued behind stats
                a.close()  # the staged slots' release: past the connection's in-flight cap of 1
                time.sleep(0.6)  # both releases' 0.3 s deadlines pass in the queue
                assert srv.open_claims() == 2
                gate.set()
                blocker.join(10)
        wait_until(lambda: srv.open_claims() == 0, timeout=5, what="both late releases to run")
    finally:
        srv.stop()
