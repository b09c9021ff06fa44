"""Issue 23: saves that do not stall the engine, on every client kind with one meaning
(``put_async`` / ``save_from_async``: a completion handle; blocks visible only once all
their bytes are in; input checked at the call; ``close()`` waits for what was submitted)."""

from __future__ import annotations

import threading

import pytest
import torch

from clients import KVClient
from kvstore.errors import InvalidInputError, StoreClosedError
from kvstore.saves import PutHandle
from tests.clients.conftest import BT, KINDS
from tests.kvstore.test_datapath import blocks_of, make_kv, pools


def test_both_kinds_offer_the_async_saves(client):
    assert isinstance(client, KVClient)
    assert callable(client.put_async) and callable(client.save_from_async)


def test_put_async_completes_with_puts_result_and_exact_bytes(client, layout, device):
    tokens = list(range(3 * BT + 1))
    kv = make_kv(layout, len(tokens), 1, device)
    h = client.put_async(tokens, kv)
    assert isinstance(h, PutHandle)
    assert h.wait(timeout=30) == 3 * BT and h.done()
    assert client.lookup(tokens) == 3 * BT
    assert torch.equal(client.get(tokens[:3 * BT], device=device), kv[:, :, :3 * BT])


def test_save_from_async_round_trips_from_any_pool(client, layout, device):
    for kind in ("xlayer", "layers"):
        tokens = list(range(100, 100 + 3 * BT)) if kind == "xlayer" else list(range(200, 200 + 3 * BT))
        kv = make_kv(layout, len(tokens), 2, device)
        pool = pools(layout, 5, device)[kind]
        ids = [4, 0, 2]
        dst = pools(layout, 5, device)[kind]
        for i, b in enumerate(ids):  # the pool holds kv's block i at id ids[i]
            if kind == "xlayer":
                pool[b] = blocks_of(kv)[i]
            else:
                for layer, p in enumerate(pool):
                    p[:, b] = blocks_of(kv)[i][layer]
        h = client.save_from_async(tokens + [7], pool, ids + [1])  # a partial tail (and its id) is ignored
        assert h.wait(timeout=30) == 3 * BT
        assert client.load_into(tokens, dst, [1, 3, 0]) == 3 * BT
        assert torch.equal(client.get(tokens, device=device), kv), kind


def test_bad_input_raises_at_the_call_not_in_the_handle(client, layout, device):
    with pytest.raises(InvalidInputError):
        client.put_async(list(range(BT)), make_kv(layout, BT + 1, 0, device))
    pool = pools(layout, 2, device)["xlayer"]
    with pytest.raises(InvalidInputError):
        client.save_from_async(list(range(2 * BT)), pool, [0, 5])
    with pytest.raises(InvalidInputError):
        client.save_from_async(list(range(2 * BT)), pool, [1, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_close_waits_for_every_save_submitted(make_client, layout, kind, device):
    c = make_client(kind, namespace=f"close-waits-{kind}")
    kvs = [make_kv(layout, BT, 10 + i, device) for i in range(3)]
    handles = [c.put_async(list(range(1000 * (i + 1), 1000 * (i + 1) + BT)), kv) for i, kv in enumerate(kvs)]
    if kind == "embedded":  # the embedded store closes with its client: look before closing
        c.close()
        assert all(h.done() for h in handles) and [h.wait() for h in handles] == [BT] * 3
        return
    c.close()
    assert all(h.done() for h in handles) and [h.wait() for h in handles] == [BT] * 3
    with pytest.raises(StoreClosedError):
        c.put_async(list(range(BT)), kvs[0])
    r = make_client(kind, namespace=f"close-waits-{kind}")
    for i, kv in enumerate(kvs):
        assert torch.equal(r.get(list(range(1000 * (i + 1), 1000 * (i + 1) + BT)), device=device), kv)


@pytest.mark.parametrize("kind", ["tcp-shm", "ipc-shm"])
def test_an_async_save_is_invisible_until_its_bytes_are_in_and_never_blocks_loads(make_client, layout, kind,
                                                                                  device):
    """The copy into shared memory is held half-way: meanwhile a lookup on the same client
    answers at once (the save holds no lock while it copies) and sees nothing of the save;
    once the copy finishes the blocks are visible, exactly."""
    c = make_client(kind)
    base = list(range(50, 50 + BT))
    c.put(base, make_kv(layout, BT, 3, device))
    started, go = threading.Event(), threading.Event()
    real = c._copy

    def held(jobs, *, hash_dst):
        if not hash_dst:  # the save's copy (a read verifies with hash_dst=True)
            started.set()
            assert go.wait(30)
        return real(jobs, hash_dst=hash_dst)

    c._copy = held
    tokens = list(range(2 * BT))
    kv = make_kv(layout, 2 * BT, 4, device)
    h = c.put_async(tokens, kv)
    assert started.wait(30)
    assert c.lookup(tokens) == 0 and not h.done()
    assert torch.equal(c.get(base, device=device), make_kv(layout, BT, 3, device))  # a read goes on meanwhile
    go.set()
    assert h.wait(timeout=30) == 2 * BT
    assert c.lookup(tokens) == 2 * BT and torch.equal(c.get(tokens, device=device), kv)
