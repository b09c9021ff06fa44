"""``store.port``: the lease/staging protocol for another process, apart from the embedded API."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import same

from kvstore import KVStore, StoreClosedError, StoreConfig
from kvstore.layout import as_block_rows
from kvstore.port import Lease, PortedStore, Reservation, StorePort

BT = 4
PORT_CALLS = ("acquire", "release", "reserve", "commit", "abort", "stage", "staging_spare", "unstage",
              "put_staged", "lease_checksums", "report_corrupt", "tier_arenas", "lookup_nowait", "nowait")


def make_kv(layout, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def memory_store(layout, blocks: int) -> KVStore:
    """One private memory tier of ``blocks`` slots (index 0), no disk."""
    return KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=0,
                               host_bytes=blocks * layout.kv_block_bytes(BT), disk_bytes=0))


def test_the_protocol_is_the_ports_not_the_embedded_apis(layout):
    with memory_store(layout, 4) as s:
        assert s.port is s.port and isinstance(s.port, StorePort)
        for name in PORT_CALLS:
            assert not hasattr(KVStore, name), f"KVStore.{name} is the port's, not the embedded API's"
            assert callable(getattr(s.port, name))
        assert not hasattr(KVStore, "Lease") and not hasattr(KVStore, "Reservation")
        assert [name for name, _ in s.port.tier_arenas()] == ["host"]


def test_a_reservation_is_invisible_until_committed(layout):
    with memory_store(layout, 4) as s:
        tokens, kv = list(range(8)), make_kv(layout, 8, 1)
        res = s.port.reserve(tokens, 0)
        assert isinstance(res, Reservation) and res.positions == [0, 1] and len(res.slots) == 2
        arena = s.port.tier_arenas()[0][1]
        arena.write(res.slots, as_block_rows(kv, BT))
        assert s.lookup(tokens) == 0  # written, not yet committed
        assert s.port.commit(res) == 8
        assert s.port.commit(res) == 8  # idempotent: the first result
        assert s.lookup(tokens) == 8 and same(s.get(tokens), kv)
        again = s.port.reserve(tokens, 0)  # nothing new: already done, with the put's result
        assert again.done and again.slots == [] and again.cached == 8
        s._check()


def test_abort_gives_the_reserved_slots_back(layout):
    with memory_store(layout, 2) as s:
        tokens = list(range(8))
        res = s.port.reserve(tokens, 0)
        assert s.stats()["tiers"]["host"]["used_blocks"] == 2
        assert s.port.reserve(list(range(100, 108)), 0) is None  # no room beside the reservation
        s.port.abort(res)
        s.port.abort(res)  # idempotent
        assert s.stats()["tiers"]["host"]["used_blocks"] == 0 and s.stats()["rejected_blocks"] == 2
        assert s.lookup(tokens) == 0
        assert s.put(tokens, make_kv(layout, 8, 2)) == 8  # the slots are free again
        s._check()


def test_a_leased_prefix_is_pinned_until_released(layout):
    with memory_store(layout, 2) as s:
        tokens, kv = list(range(8)), make_kv(layout, 8, 3)
        other = list(range(100, 108))
        assert s.put(tokens, kv) == 8
        assert s.port.acquire(tokens, [1]) is None  # not in the tiers asked for
        lease = s.port.acquire(tokens, [0])
        assert isinstance(lease, Lease) and [t for t, _ in lease.blocks] == [0, 0]
        assert s.port.lease_checksums(lease).tolist() == [0, 0]  # a private arena records none
        assert s.put(other, make_kv(layout, 8, 4)) == 0  # the leased blocks are not victims
        assert s.lookup(tokens) == 8
        s.port.release(lease)
        s.port.release(lease)  # idempotent
        assert s.put(other, make_kv(layout, 8, 4)) == 8 and s.lookup(tokens) == 0
        s._check()


def test_the_port_refuses_a_closed_store(layout):
    s = memory_store(layout, 2)
    s.close()
    with pytest.raises(StoreClosedError):
        s.port.reserve(list(range(8)), 0)
    with pytest.raises(StoreClosedError):
        s.port.acquire(list(range(8)), [0])


def test_a_dropped_store_removes_its_temporary_slabs_at_once(layout):
    """The port holds its store weakly: dropping the last reference still runs the store's
    clean-up right away (no cycle left for the garbage collector)."""
    bb = layout.kv_block_bytes(BT)
    s = KVStore(StoreConfig(layout=layout, block_tokens=BT, host_bytes=0, disk_bytes=64 * bb + (1 << 16)))
    port, tmp = s.port, s._tmpdir
    assert tmp is not None and os.path.isdir(tmp)
    del s
    assert not os.path.exists(tmp)
    with pytest.raises(ReferenceError):
        port.tier_arenas()


def _surface() -> set[str]:
    methods = {n for n, v in vars(PortedStore).items() if callable(v) and not n.startswith("__")}
    return set(PortedStore.__annotations__) | methods


def test_the_port_reaches_the_store_only_through_its_named_surface(layout):
    """Every ``store.X`` / ``self._store.X`` in ``kvstore/port.py`` is a member of
    ``PortedStore``, and the store has each of them."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / "kvstore" / "port.py").read_text())
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if (isinstance(v, ast.Name) and v.id == "store") or \
                (isinstance(v, ast.Attribute) and v.attr == "_store" and isinstance(v.value, ast.Name)
                 and v.value.id == "self"):
            used.add(node.attr)
    surface = _surface()
    assert used and used <= surface, f"the port reaches past PortedStore: {sorted(used - surface)}"
    assert len(surface) <= 20, "the port's friend surface should stay small"
    with memory_store(layout, 2) as s:
        missing = [name for name in surface if not hasattr(s, name)]
    assert not missing, f"PortedStore names what KVStore lacks: {missing}"


def test_nowait_holds_the_store_lock_only_when_it_is_free(layout):
    """The sidecar's loop answers under ``nowait()``: it must never wait for a lock another
    thread holds, and the store's own calls must re-enter the lock it holds."""
    import threading

    with memory_store(layout, 4) as s:
        tokens = list(range(2 * BT))
        s.put(tokens, make_kv(layout, len(tokens), 3))
        with s.port.nowait() as held:
            assert held
            assert s.lookup(tokens) == len(tokens)  # re-entered, not deadlocked
            lease = s.port.acquire(tokens, [0])
            assert lease is not None
        s.port.release(lease)
        taken, done = threading.Event(), threading.Event()

        def holder():
            with s._lock:
                taken.set()
                done.wait(10)

        t = threading.Thread(target=holder, daemon=True)
        t.start()
        try:
            assert taken.wait(5)
            with s.port.nowait() as held:
                assert not held
            assert s.port.lookup_nowait(tokens) is None
        finally:
            done.set()
            t.join(5)
        assert s.port.lookup_nowait(tokens) == len(tokens)
        s._check()
