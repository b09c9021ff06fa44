"""Issue 12, the sidecar's shared-memory data plane tried as an operator and as a hostile
local process would: a restart under live clients, late writes after a put and after an
aborted reservation, a second tenant's process mapping the arena files, CurveZMQ tenants,
and ownership of a persisted namespace across a restart.

Each test asserts exact bytes or a clean error, nothing else."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from allocator.checksum import digests, to_wire
from allocator.shm import map_shared
from clients import CurveConfig, connect
from kvstore import StoreConfig
from kvstore.errors import BlockNotFoundError
from kvstore.sidecar.protocol import SidecarError, StaleArenaError
from kvstore.sidecar.security import write_keypair
from kvstore.sidecar.server import ServerOptions, SidecarServer
from tests.clients.conftest import BT, capacities, start_server
from tests.clients.test_sidecar_client import make_kv

T0, T1, T2 = (list(range(1000 * k, 1000 * k + 16)) for k in (1, 2, 3))


def _tok(tokens) -> bytes:
    return torch.tensor(tokens, dtype=torch.int32).numpy().tobytes()


def _slots_of(srv: SidecarServer, ns_name: str, tokens) -> list[tuple[str, int, int]]:
    """(arena path, its slot count, slot) of each cached block of ``tokens`` -- what an
    attacker mapping the arena would look for (found from the server's index, to aim)."""
    ns = next(n for n in srv.namespaces() if n.name == ns_name)
    store = ns.store
    _, keys = store._keys(tokens)
    arenas = store.port.tier_arenas()
    out = []
    for k in keys:
        e = store._tiers.index[k]
        arena = arenas[e.tier][1]
        out.append((arena.path, arena.num_slots, e.slot))
    return out


def _scribble(path: str, num_slots: int, slot: int, value: int = 0) -> None:
    """A process of the server's uid maps the arena file and overwrites one slot."""
    rows = map_shared(path, num_slots, os.stat(path).st_size // num_slots)
    rows[slot].fill_(value)


@pytest.fixture
def shm_dir(tmp_path):
    d = tmp_path / "shm"
    d.mkdir()
    return d


def _server(endpoint, tmp_path, shm_dir, **opts) -> SidecarServer:
    return start_server(endpoint, tmp_path, shm_dir=str(shm_dir), **opts)


# -- scenario 1: sidecar restart under live shared-memory clients ----------------------------
def test_restart_under_live_shm_clients_never_acknowledges_a_lost_put(tmp_path, shm_dir, layout):
    ep = f"ipc://{tmp_path}/kvs.sock"
    srv = _server(ep, tmp_path, shm_dir)
    a = connect(ep, layout=layout, namespace="live", block_tokens=BT, timeout=10)
    b = connect(ep, layout=layout, namespace="live", block_tokens=BT, timeout=10)
    try:
        assert a.uses_shm and b.uses_shm
        kv0, kv1, kv2 = make_kv(layout, 16, 0), make_kv(layout, 16, 1), make_kv(layout, 16, 2)
        assert a.put(T0, kv0) == 16 and torch.equal(b.get(T0, device="cpu"), kv0)
        stale = list(a._idents)
        srv.stop(timeout=10)
        srv = _server(ep, tmp_path, shm_dir)  # same endpoint, new arenas
        assert b.put(T1, kv1) == 16  # b learns of the restart (unknown namespace) and joins again
        assert a._idents == stale  # a never said hello: its mapping is of the unlinked arenas
        # a raw put into the stale arenas is refused, whatever the slot numbers
        with pytest.raises(StaleArenaError):
            a._request("put_shm", {"ns": "live", "tokens": _tok(T2), "claim": 1, "slots": [0, 1, 2, 3],
                                   "sums": bytes(32), "arena": stale})
        a._idents = stale  # the raw call above does not remap: keep the client stale
        assert a.put(T2, kv2) == 16  # acknowledged -> readable by everyone, exactly
        assert a._idents != stale and a.uses_shm
        assert torch.equal(b.get(T2, device="cpu"), kv2)
        assert torch.equal(a.get(T1, device="cpu"), kv1)
        with connect(ep, layout=layout, namespace="live", block_tokens=BT, shm=False) as c:
            assert torch.equal(c.get(T2, device="cpu"), kv2)
    finally:
        a.close()
        b.close()
        srv.stop(timeout=10)


def test_a_stale_mapping_on_read_remaps_and_reads_exact_bytes(tmp_path, shm_dir, layout):
    ep = f"ipc://{tmp_path}/kvs.sock"
    srv = _server(ep, tmp_path, shm_dir)
    a = connect(ep, layout=layout, namespace="r", block_tokens=BT, timeout=10)
    b = connect(ep, layout=layout, namespace="r", block_tokens=BT, timeout=10)
    try:
        a.put(T0, make_kv(layout, 16, 0))
        stale = list(a._idents)
        srv.stop(timeout=10)
        srv = _server(ep, tmp_path, shm_dir)
        kv1 = make_kv(layout, 16, 1)
        assert b.put(T1, kv1) == 16
        assert torch.equal(a.get(T1, device="cpu"), kv1)  # the lease names new arenas: a remaps
        assert a._idents != stale
    finally:
        a.close()
        b.close()
        srv.stop(timeout=10)


# -- scenario 6: late writes into shared slots -----------------------------------------------
@pytest.fixture
def shm_srv(tmp_path, shm_dir):
    srv = _server("tcp://127.0.0.1:*", tmp_path, shm_dir)
    yield srv
    srv.stop(timeout=10)


def test_a_write_after_the_put_is_an_error_for_every_reader(shm_srv, layout):
    srv = shm_srv
    with connect(srv.endpoint, layout=layout, namespace="late", block_tokens=BT) as w, \
            connect(srv.endpoint, layout=layout, namespace="late", block_tokens=BT) as r, \
            connect(srv.endpoint, layout=layout, namespace="late", block_tokens=BT, shm=False) as f:
        kv = make_kv(layout, 16, 5)
        assert w.put(T0, kv) == 16 and torch.equal(r.get(T0, device="cpu"), kv)
        _scribble(*_slots_of(srv, "late", T0)[2], 0)  # the writer (or anyone mapping it) writes after its put
        with pytest.raises(BlockNotFoundError, match="changed"):
            r.get(T0, device="cpu")
        assert r.lookup(T0) == 8  # the corrupt block (and its descendants) were dropped
        assert torch.equal(f.get(T0[:8], device="cpu"), kv[:, :, :8])
        assert r.stats()["corrupt_blocks"] == 1
        # the same through the frames path (the server copies out and verifies)
        assert w.put(T1, make_kv(layout, 16, 6)) == 16
        _scribble(*_slots_of(srv, "late", T1)[0], 7)
        with pytest.raises(BlockNotFoundError):
            f.get(T1, device="cpu")
        assert f.lookup(T1) == 0


def test_a_write_between_copy_and_put_message_is_caught(shm_srv, layout):
    """The window a reserve -> write -> commit protocol leaves: bytes changed after the
    writer copied them but before the server indexed them."""
    srv = shm_srv
    with connect(srv.endpoint, layout=layout, namespace="window", block_tokens=BT) as w, \
            connect(srv.endpoint, layout=layout, namespace="window", block_tokens=BT, shm=False) as r:
        w._stage(4)
        slots = w._staged[:4]
        kv = make_kv(layout, 16, 9)
        blocks = kv.unflatten(2, (4, BT)).permute(2, 0, 1, 3, 4, 5)
        for i, s in enumerate(slots):
            w._rows[w._stage_seg][s].copy_(blocks[i])
        sums = digests(blocks)
        w._rows[w._stage_seg][slots[1]].zero_()  # a late writer, after our copy
        res, _ = w._request("put_shm", {"ns": "window", "tokens": _tok(T0), "claim": w._stage_claim,
                                        "slots": slots, "sums": to_wire(sums), "arena": w._idents})
        with pytest.raises(BlockNotFoundError):
            r.get(T0, device="cpu")
        assert r.lookup(T0) == 4 and torch.equal(r.get(T0[:4], device="cpu"), kv[:, :, :4])
        del res


def test_a_write_after_an_aborted_reservation_never_reaches_the_slot_reuser(shm_srv, layout):
    srv = shm_srv
    with connect(srv.endpoint, layout=layout, namespace="abort", block_tokens=BT) as x, \
            connect(srv.endpoint, layout=layout, namespace="abort", block_tokens=BT, shm=False) as y:
        res, _ = x._request("reserve", {"ns": "abort", "tokens": _tok(T0), "owner": x._owner})
        assert res["mode"] == "shm"
        held = [(seg, slot) for _, seg, slot in res["blocks"]]
        x._request("release", {"claim": res["claim"]})  # x gives up... but keeps writing
        kv = make_kv(layout, 16, 4)
        assert y.put(T1, kv) == 16  # y's blocks land in the slots x gave back
        reused = {s for _, _, s in _slots_of(srv, "abort", T1)} & {s for _, s in held}
        assert reused, "the test needs y to reuse x's slots"
        for seg, slot in held:
            x._rows[seg][slot].fill_(3.0)
        with pytest.raises(BlockNotFoundError):
            y.get(T1, device="cpu")
        n = y.lookup(T1)
        assert n < 16 and (n == 0 or torch.equal(y.get(T1[:n], device="cpu"), kv[:, :, :n]))


def test_a_scribbled_block_never_reaches_disk_with_persist(tmp_path, shm_dir, layout):
    cfg = StoreConfig(disk_path=str(tmp_path / "disk"), persist=True, fsync="always", **capacities(layout))
    ep = "tcp://127.0.0.1:*"
    srv = SidecarServer(ep, cfg, ServerOptions(workers=2, shm_dir=str(shm_dir))).start()
    try:
        with connect(srv.endpoint, layout=layout, namespace="p", block_tokens=BT) as w:
            w._stage(4)
            slots = w._staged[:4]
            kv = make_kv(layout, 16, 11)
            blocks = kv.unflatten(2, (4, BT)).permute(2, 0, 1, 3, 4, 5)
            for i, s in enumerate(slots):
                w._rows[w._stage_seg][s].copy_(blocks[i])
            sums = to_wire(digests(blocks))
            w._rows[w._stage_seg][slots[2]].zero_()
            res, _ = w._request("put_shm", {"ns": "p", "tokens": _tok(T0), "claim": w._stage_claim,
                                            "slots": slots, "sums": sums, "arena": w._idents})
            assert res["tokens"] == 8  # the write-through verified it: block 2 was not stored
    finally:
        srv.stop(timeout=10)
    srv = SidecarServer(ep, cfg, ServerOptions(workers=2, shm_dir=str(shm_dir))).start()
    try:
        with connect(srv.endpoint, layout=layout, namespace="p", block_tokens=BT) as r:
            assert r.lookup(T0) == 8
            assert torch.equal(r.get(T0[:8], device="cpu"), kv[:, :, :8])
    finally:
        srv.stop(timeout=10)


# -- scenario 3: a second tenant's process maps /dev/shm --------------------------------------
def test_a_second_tenant_mapping_the_arena_files_cannot_change_what_the_owner_reads(shm_srv, shm_dir, layout):
    srv = shm_srv
    with connect(srv.endpoint, layout=layout, namespace="tenant-secret", block_tokens=BT) as owner:
        kv = make_kv(layout, 16, 21)
        assert owner.put(T0, kv) == 16
        names = os.listdir(shm_dir)
        assert names and all("tenant" not in n and "secret" not in n for n in names)  # names say nothing
        for n in names:
            assert stat.S_IMODE(os.stat(shm_dir / n).st_mode) == 0o600
        for path, num_slots, slot in _slots_of(srv, "tenant-secret", T0):  # the intruder zeroes every block
            _scribble(path, num_slots, slot, 0)
        with pytest.raises(BlockNotFoundError):
            owner.get(T0, device="cpu")
        assert owner.lookup(T0) == 0  # never all zeros: the blocks are reported missing


@pytest.fixture
def curve_keys(tmp_path):
    write_keypair(tmp_path, "server")
    write_keypair(tmp_path / "allow", "alice")
    write_keypair(tmp_path / "allow", "bob")
    conf = {who: CurveConfig(secret=str(tmp_path / "allow" / f"{who}.key_secret"), server=str(tmp_path / "server.key"))
            for who in ("alice", "bob")}
    return tmp_path, conf


def _curve_server(d, shm_dir, **cfg_kw) -> SidecarServer:
    from kvstore import ModelLayout

    lay = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
    cfg = StoreConfig(disk_path=str(d / "disk"), **capacities(lay), **cfg_kw)
    opts = ServerOptions(workers=2, shm_dir=str(shm_dir), curve_secret=str(d / "server.key_secret"),
                         curve_allow=str(d / "allow"))
    return SidecarServer("tcp://127.0.0.1:*", cfg, opts).start()


def test_curve_tenants_never_share_mappable_memory(curve_keys, shm_dir, layout):
    d, conf = curve_keys
    srv = _curve_server(d, shm_dir)
    try:
        with connect(srv.endpoint, layout=layout, namespace="a-ns", block_tokens=BT, curve=conf["alice"]) as a, \
                connect(srv.endpoint, layout=layout, namespace="b-ns", block_tokens=BT, curve=conf["bob"]) as b:
            assert not a.uses_shm and not b.uses_shm and a.server_info["shm"] is None
            kva, kvb = make_kv(layout, 16, 1), make_kv(layout, 16, 2)
            assert a.put(T0, kva) == 16 and b.put(T0, kvb) == 16
            # nothing any local process could map (the sidecar's instance lock file aside)
            assert [f for f in os.listdir(shm_dir) if not f.endswith(".lock")] == []
            assert torch.equal(a.get(T0, device="cpu"), kva) and torch.equal(b.get(T0, device="cpu"), kvb)
            codes = []
            for name in ("a-ns", "never-made"):  # alice's name and a name nobody made answer alike
                with pytest.raises(SidecarError) as err:
                    b._request("get", {"ns": name, "tokens": _tok(T0), "shm": True})
                codes.append((err.value.code, str(err.value).replace(name, "NAME")))
            assert codes[0] == codes[1] and codes[0][0] == "unknown_namespace"
    finally:
        srv.stop(timeout=10)


# -- scenario 2: ownership of a persisted namespace across a restart ----------------------------
def test_ownership_survives_a_restart(curve_keys, shm_dir, layout):
    d, conf = curve_keys
    kv = make_kv(layout, 16, 31)
    srv = _curve_server(d, shm_dir, persist=True, fsync="always")
    try:
        with connect(srv.endpoint, layout=layout, namespace="private", block_tokens=BT, curve=conf["alice"]) as a:
            assert a.put(T0, kv) == 16
    finally:
        srv.stop(timeout=10)
    srv = _curve_server(d, shm_dir, persist=True, fsync="always")
    try:
        # bob is first after the restart: his "private" is his own (empty) namespace, never alice's
        with connect(srv.endpoint, layout=layout, namespace="private", block_tokens=BT, curve=conf["bob"]) as b:
            assert b.lookup(T0) == 0
            with pytest.raises(BlockNotFoundError):
                b.get(T0, device="cpu")
        with connect(srv.endpoint, layout=layout, namespace="private", block_tokens=BT, curve=conf["alice"]) as a:
            assert a.lookup(T0) == 16 and torch.equal(a.get(T0, device="cpu"), kv)
    finally:
        srv.stop(timeout=10)


# -- staged slots: beyond the capacity, and reclaimed from a dead client -------------------------
_STAGE_AND_HANG = """
import sys, torch
from clients import connect
from kvstore import ModelLayout
layout = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
c = connect(sys.argv[1], layout=layout, namespace="die", block_tokens=4, timeout=20)
kv = torch.ones(layout.kv_shape(16), dtype=torch.float16)
print("put", c.put(list(range(16)), kv), len(c._staged), flush=True)
sys.stdin.read()
"""


def test_a_killed_client_staged_slots_are_reclaimed_and_never_cost_capacity(tmp_path, shm_dir, layout):
    import subprocess
    import sys
    import time

    from tests.clients.conftest import DEVICE_BLOCKS
    from tests.clients.test_sidecar_client import ROOT, wait_until

    srv = _server("tcp://127.0.0.1:*", tmp_path, shm_dir, lease_timeout_s=0.3)
    p = subprocess.Popen([sys.executable, "-c", _STAGE_AND_HANG, srv.endpoint], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        line = p.stdout.readline().split()
        assert line[:2] == ["put", "16"] and int(line[2]) >= 4, line
        ns = next(n for n in srv.namespaces() if n.name == "die")
        tier = ns.store._tiers.tiers[ns.put_tier]
        staged = tier.staged
        assert staged == int(line[2])
        st = ns.store.stats()["tiers"][tier.name]
        assert st["capacity_blocks"] == DEVICE_BLOCKS and st["staged_blocks"] == staged
        time.sleep(4 * srv.options.lease_timeout_s)
        assert tier.staged == staged and srv.counters["reclaimed"] == 0  # alive, only idle: kept
        with connect(srv.endpoint, layout=layout, namespace="die", block_tokens=BT, shm=False) as c:
            for i in range(DEVICE_BLOCKS):  # the cache still holds DEVICE_BLOCKS blocks in that tier
                c.put([50_000 + 10 * i + j for j in range(BT)], make_kv(layout, BT, i))
            assert ns.store.stats()["tiers"][tier.name]["used_blocks"] == DEVICE_BLOCKS
        p.kill()
        p.wait(10)
        wait_until(lambda: tier.staged == 0 and srv.open_claims() == 0, what="the staged slots to be reclaimed")
        ns.store._check()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        srv.stop(timeout=10)
