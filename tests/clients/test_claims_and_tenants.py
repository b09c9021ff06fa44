"""Shared-memory claims are reclaimed only from dead clients (a live, stalled writer keeps its
slots), and namespaces are tenants: the same prompt in two namespaces never meets."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from allocator.checksum import digests, to_wire
from clients import connect
from kvstore.errors import BlockNotFoundError
from kvstore.sidecar.procinfo import owner_alive, process_start_time
from tests.clients.conftest import BT, start_server
from tests.clients.test_sidecar_client import make_kv, wait_until

TOKENS = list(range(500, 516))


@pytest.fixture
def quick(tmp_path):
    srv = start_server("tcp://127.0.0.1:*", tmp_path, lease_timeout_s=0.3)
    yield srv
    srv.stop()


def _tok_bytes(tokens):
    return torch.tensor(tokens, dtype=torch.int32).numpy().tobytes()


def test_process_identity_detects_death_and_pid_reuse():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(p.pid)
        assert start is not None and owner_alive((p.pid, start))
        assert not owner_alive((p.pid, start + 1))  # same pid, another process: a reused pid
    finally:
        p.kill()
        p.wait(10)
    assert not owner_alive((p.pid, start))


def test_a_live_client_that_stalls_mid_put_keeps_its_reservation(quick, layout):
    srv = quick
    with connect(srv.endpoint, layout=layout, namespace="stall", block_tokens=BT) as c, \
            connect(srv.endpoint, layout=layout, namespace="stall", block_tokens=BT) as other:
        assert c.uses_shm and c.server_info["owner_checked"] is True
        kv = make_kv(layout, 16, 1)
        res, _ = c._request("reserve", {"ns": "stall", "tokens": _tok_bytes(TOKENS), "owner": c._owner})
        assert res["mode"] == "shm" and len(res["blocks"]) == 4
        half = kv[:, :, :8].unflatten(2, (2, BT)).permute(2, 0, 1, 3, 4, 5)
        for (pos, seg, slot), block in zip(res["blocks"][:2], half):
            c._rows[seg][slot].copy_(block)  # half written, then the client stalls
        time.sleep(4 * srv.options.lease_timeout_s)
        assert srv.open_claims() == 1 and srv.counters["kept_alive"] >= 1 and srv.counters["reclaimed"] == 0
        # meanwhile another client fills the cache; it must not be handed the stalled slots
        others = {}
        for i in range(6):
            toks = [10_000 + 100 * i + j for j in range(8)]
            others[i] = (toks, make_kv(layout, 8, 100 + i))
            other.put(toks, others[i][1])
        rest = kv[:, :, 8:].unflatten(2, (2, BT)).permute(2, 0, 1, 3, 4, 5)
        for (pos, seg, slot), block in zip(res["blocks"][2:], rest):
            c._rows[seg][slot].copy_(block)
        blocks = kv.unflatten(2, (4, BT)).permute(2, 0, 1, 3, 4, 5)
        result, _ = c._request("commit", {"claim": res["claim"], "arena": c._idents,
                                          "sums": to_wire(digests(blocks[[p for p, _, _ in res["blocks"]]]))})
        assert result == 16
        assert torch.equal(c.get(TOKENS, device="cpu"), kv)
        for toks, okv in others.values():  # each either exact or a clean miss (capacity)
            n = other.lookup(toks)
            if n:
                assert torch.equal(other.get(toks[:n], device="cpu"), okv[:, :, :n])
        next(ns for ns in srv.namespaces() if ns.name == "stall").store._check()


def test_a_claim_naming_a_recycled_pid_is_reclaimed(quick, layout):
    srv = quick
    with connect(srv.endpoint, layout=layout, namespace="reuse", block_tokens=BT) as c:
        fake = {**c._owner, "start": c._owner["start"] + 12345}  # our pid, another start time
        res, _ = c._request("reserve", {"ns": "reuse", "tokens": _tok_bytes(TOKENS), "owner": fake})
        assert res["mode"] == "shm"
        wait_until(lambda: srv.open_claims() == 0, timeout=10, what="the reservation to be reclaimed")
        assert srv.counters["reclaimed"] == 1
        assert c.put(TOKENS, make_kv(layout, 16, 2)) == 16


HANG = """
import sys, torch
from allocator.checksum import digests, to_wire
from clients import connect
from kvstore import ModelLayout
layout = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
with connect(sys.argv[1], layout=layout, namespace="killed", block_tokens=4, timeout=20) as c:
    toks = torch.arange(500, 516, dtype=torch.int32).numpy().tobytes()
    res, _ = c._request("reserve", {"ns": "killed", "tokens": toks, "owner": c._owner})
    print("reserved", res["mode"], len(res.get("blocks", [])), flush=True)
    sys.stdin.read()
"""


def test_a_killed_client_reservation_is_reclaimed(quick, layout):
    from tests.clients.test_sidecar_client import ROOT

    srv = quick
    p = subprocess.Popen([sys.executable, "-c", HANG, srv.endpoint], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline().split() == ["reserved", "shm", "4"]
        time.sleep(3 * srv.options.lease_timeout_s)
        assert srv.open_claims() == 1 and srv.counters["reclaimed"] == 0  # alive (only slow): kept
    finally:
        p.kill()
        p.wait(10)
    wait_until(lambda: srv.open_claims() == 0, timeout=10, what="the reservation to be reclaimed")
    assert srv.counters["reclaimed"] == 1
    with connect(srv.endpoint, layout=layout, namespace="killed", block_tokens=BT) as c:
        kv = make_kv(layout, 16, 3)
        assert c.put(TOKENS, kv) == 16 and torch.equal(c.get(TOKENS, device="cpu"), kv)


@pytest.mark.parametrize("kind", ["tcp-frames", "tcp-shm", "ipc-shm"])
def test_two_tenants_with_the_same_prompt_never_meet(make_client, layout, kind):
    a = make_client(kind, namespace=f"tenant-a-{kind}")
    b = make_client(kind, namespace=f"tenant-b-{kind}")
    kv_a, kv_b = make_kv(layout, 16, 1), make_kv(layout, 16, 2)
    assert a.put(TOKENS, kv_a) == 16
    assert b.lookup(TOKENS) == 0
    with pytest.raises(BlockNotFoundError):
        b.get(TOKENS)
    sa, sb = a.stats(), b.stats()
    assert sa["blocks"] == 4 and sb["blocks"] == 0
    assert sb["hits"] == 0 and sb["put_blocks"] == 0 and sa["misses"] == 0  # B's miss is B's only
    assert sb["misses"] >= 1
    assert b.clear() == 0 and a.lookup(TOKENS) == 16  # B's clear cannot touch A
    assert b.put(TOKENS, kv_b) == 16
    assert torch.equal(a.get(TOKENS, device="cpu"), kv_a)
    assert torch.equal(b.get(TOKENS, device="cpu"), kv_b)
    assert a.clear() == 4 and b.lookup(TOKENS) == 16
