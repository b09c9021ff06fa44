"""An engine's paged pool through every client kind (docs/architecture.md: the clients have the store's
methods): ``load_into`` / ``save_from`` over embedded, TCP frames, TCP and ipc with shared
memory. The same bytes, the same errors, the pool untouched on any failure, checks made
before anything is sent, and nothing of another tenant's. Device-agnostic: the pools live
on the ``device`` fixture (CUDA when present)."""

from __future__ import annotations

import pytest
import torch

from clients import BlockLoadError, LoadResult, connect
from kvstore import BlockNotFoundError, InvalidInputError
from tests.clients.conftest import BT, KINDS
from tests.clients.test_shm_integrity import _scribble, _server, _slots_of
from kvstore.layout import PoolLayout
from kvstore.paged import EnginePool
from tests.kvstore.test_datapath import blocks_of, make_kv, pool_blocks, pools
from tests.kvstore.test_pool_layouts import make_pool, token_kv

POOL_KINDS = ["xlayer", "layers"]


def _untouched(pool) -> bool:
    return not any(p.any() for p in ([pool] if isinstance(pool, torch.Tensor) else pool))


@pytest.mark.parametrize("pool_kind", POOL_KINDS)
def test_load_into_is_byte_exact_and_touches_only_named_blocks(client, layout, pool_kind, rng, device):
    tokens = list(range(12))
    kv = make_kv(layout, 12, 1, device)
    assert client.put(tokens, kv) == 12
    pool = pools(layout, 8, device)[pool_kind]
    ids = rng.sample(range(8), 3)
    assert client.load_into(tokens, pool, ids) == 12
    assert torch.equal(pool_blocks(pool, ids), blocks_of(kv))
    others = [b for b in range(8) if b not in ids]
    assert not pool_blocks(pool, others).any()
    assert client.load_into(tokens[:4], pool, torch.tensor(others[:1])) == 4  # ids as a tensor
    assert torch.equal(pool_blocks(pool, others[:1]), blocks_of(kv[:, :, :4]))


@pytest.mark.parametrize("pool_kind", POOL_KINDS)
def test_save_from_round_trips_and_dedups(client, layout, pool_kind, rng, device):
    kv = make_kv(layout, 12, 2, device)
    pool = pools(layout, 8, device)[pool_kind]
    ids = rng.sample(range(8), 4)  # 3 full blocks + the partial tail's block (ignored)
    blocks = blocks_of(kv)
    for i, b in enumerate(ids[:3]):
        if isinstance(pool, torch.Tensor):
            pool[b] = blocks[i]
        else:
            for layer, p in enumerate(pool):
                p[:, b] = blocks[i, layer]
    snapshot = pool_blocks(pool, range(8)).clone()
    assert client.save_from(list(range(14)), pool, ids) == 12
    assert torch.equal(pool_blocks(pool, range(8)), snapshot)  # a save only reads the pool
    assert torch.equal(client.get(list(range(12)), device=device), kv)
    assert client.save_from(list(range(4)), pool, ids[:1]) == 4
    st = client.stats()
    assert st["put_blocks"] == 3 and st["dedup_blocks"] == 1


def test_a_missing_block_or_a_partial_one_leaves_the_pool_untouched(client, layout, device):
    client.put(list(range(8)), make_kv(layout, 8, 3, device))
    pool = pools(layout, 8, device)["xlayer"]
    with pytest.raises(BlockNotFoundError, match="only 8 of 12"):
        client.load_into(list(range(12)), pool, [0, 1, 2])
    with pytest.raises(InvalidInputError, match="not a multiple of block_tokens=4"):
        client.load_into(list(range(6)), pool, [0, 1])
    with pytest.raises(BlockNotFoundError):
        client.load_into([7, 7, 7, 7], pool, [5])
    assert _untouched(pool)


@pytest.mark.parametrize("op", ["load_into", "save_from"])
def test_a_bad_pool_or_bad_ids_is_refused_before_anything_is_sent(make_client, layout, op, device):
    """The same errors as the store, raised here: a remote client sends nothing at all."""
    for kind in ("embedded", "tcp-frames", "tcp-shm"):
        c = make_client(kind)
        tokens = list(range(8))
        c.put(tokens, make_kv(layout, 8, 4, device))
        if kind != "embedded":
            def refuse(*a, **k):
                raise AssertionError("a request was sent for input that fails the local checks")
            c._request = refuse
        p = pools(layout, 4, device)
        cases = [
            (p["xlayer"].float(), [0, 1], "dtype"),
            (p["xlayer"][:, :1], [0, 1], "cross-layer pool must be"),
            (p["layers"][:1], [0, 1], "one tensor per layer"),
            ([t[:, :, :2] for t in p["layers"]], [0, 1], r"pool\[0\] must be"),
            ("pool", [0, 1], "pool must be a tensor"),
            (p["xlayer"], [0], "1 block ids for 2"),
            (p["xlayer"], [0, 0], "repeat"),
            (p["xlayer"], [0, 4], "out of range"),
            (p["xlayer"], [0.5, 1], "sequence of ints"),
            (p["xlayer"], torch.tensor([0.0, 1.0]), "integer tensor"),
        ]
        for pool, ids, msg in cases:
            with pytest.raises(InvalidInputError, match=msg):
                getattr(c, op)(tokens, pool, ids)
        with pytest.raises(InvalidInputError, match="must not be empty"):
            getattr(c, op)([], p["xlayer"], [])
        assert _untouched(p["xlayer"]) and _untouched(p["layers"]), kind


def test_another_tenants_blocks_cannot_be_loaded(make_client, layout, device):
    for kind in ("embedded", "tcp-frames", "ipc-shm"):
        a, b = make_client(kind), make_client(kind)
        tokens = list(range(8))
        assert a.put(tokens, make_kv(layout, 8, 5, device)) == 8
        pool = pools(layout, 4, device)["layers"]
        with pytest.raises(BlockNotFoundError):
            b.load_into(tokens, pool, [0, 1])
        assert _untouched(pool), kind
        assert b.lookup(tokens) == 0


@pytest.mark.parametrize("pool_kind", POOL_KINDS)
def test_a_block_changed_in_shared_memory_is_named_and_never_used(tmp_path, layout, device, pool_kind):
    """A process that maps the arena scribbles over a slot after the put. ``load_into``
    copies each block once, slot -> pool, and verifies the pool rows: the changed block is
    reported (its pool id named unusable, the sidecar drops it), every other named block
    holds exact bytes, and pool blocks not named are never written."""
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    srv = _server("tcp://127.0.0.1:*", tmp_path, shm_dir)
    try:
        with connect(srv.endpoint, layout=layout, namespace="pool", block_tokens=BT) as c:
            assert c.uses_shm
            tokens = list(range(16))
            kv = make_kv(layout, 16, 6, device)
            assert c.save_from(tokens, _filled(layout, kv, device), [3, 0, 2, 1]) == 16
            _scribble(*_slots_of(srv, "pool", tokens)[1], 0)
            pool = pools(layout, 6, device)[pool_kind]
            ids = [4, 1, 0, 3]
            with pytest.raises(BlockLoadError, match="changed") as err:
                c.load_into(tokens, pool, ids)
            assert isinstance(err.value, BlockNotFoundError)
            assert err.value.failed_block_ids == (1,) and err.value.failed_positions == (1,)
            assert int(err.value.result) == 4  # the prefix before the first failed block
            for pos in (0, 2, 3):
                assert torch.equal(pool_blocks(pool, [ids[pos]]), blocks_of(kv[:, :, 4 * pos:4 * pos + 4]))
            assert not pool_blocks(pool, [2, 5]).any()  # never named, never written
            assert c.lookup(tokens) == 4  # the changed block and what hangs off it are gone
            # a missing block fails before the pool is touched; "report" names every id
            fresh = pools(layout, 6, device)[pool_kind]
            res = c.load_into(tokens, fresh, ids, on_error="report")
            assert int(res) == 0 and res.failed_block_ids == tuple(ids) and _untouched(fresh)
            with pytest.raises(BlockNotFoundError):
                c.load_into(tokens, fresh, ids)
            ok = c.load_into(tokens[:4], fresh, [2])
            assert ok == 4 and ok.failed_block_ids == () and ok.ok
            assert torch.equal(pool_blocks(fresh, [2]), blocks_of(kv[:, :, :4]))
            # "report" mode with a changed block: returned, not raised
            assert c.put(tokens, kv) == 16
            _scribble(*_slots_of(srv, "pool", tokens)[2], 3)
            res = c.load_into(tokens, fresh, ids, on_error="report")
            assert int(res) == 8 and res.failed_block_ids == (0,) and res.failed_positions == (2,)
            assert c.lookup(tokens) == 8
    finally:
        srv.stop(timeout=10)


def _filled(layout, kv: torch.Tensor, device) -> torch.Tensor:
    """A cross-layer pool whose blocks 3, 0, 2, 1 hold ``kv``'s blocks 0..3."""
    pool = pools(layout, 4, device)["xlayer"]
    pool[torch.tensor([3, 0, 2, 1], device=device)] = blocks_of(kv)
    return pool


def test_a_sidecar_restart_under_a_live_pool_client(tmp_path, layout, device):
    """The sidecar restarts (same endpoint, new arenas) while a client holds a stale mapping:
    ``save_from`` is acknowledged only once readable by everyone, exactly, and ``load_into``
    remaps and reads exact bytes, never the unlinked arena's."""
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    ep = f"ipc://{tmp_path}/kvs.sock"
    srv = _server(ep, tmp_path, shm_dir)
    a = connect(ep, layout=layout, namespace="live", block_tokens=BT, timeout=10)
    b = connect(ep, layout=layout, namespace="live", block_tokens=BT, timeout=10)
    try:
        kv0, kv1, kv2 = (make_kv(layout, 16, s, device) for s in (7, 8, 9))
        assert a.save_from(list(range(16)), _filled(layout, kv0, device), [3, 0, 2, 1]) == 16
        stale = list(a._idents)
        srv.stop(timeout=10)
        srv = _server(ep, tmp_path, shm_dir)
        t1, t2 = list(range(100, 116)), list(range(200, 216))
        assert b.put(t1, kv1) == 16
        pool = pools(layout, 4, device)["layers"]
        assert a.load_into(t1, pool, [1, 3, 0, 2]) == 16  # a's lease names new arenas: it remaps
        assert a._idents != stale
        assert torch.equal(pool_blocks(pool, [1, 3, 0, 2]), blocks_of(kv1))
        assert a.save_from(t2, _filled(layout, kv2, device), [3, 0, 2, 1]) == 16
        assert torch.equal(b.get(t2, device=device), kv2)
        with pytest.raises(BlockNotFoundError):  # the sidecar kept nothing across the restart
            b.load_into(list(range(16)), pools(layout, 4, device)["xlayer"], [0, 1, 2, 3])
    finally:
        a.close()
        b.close()
        srv.stop(timeout=10)


@pytest.mark.parametrize("kind", KINDS)
def test_load_into_reports_alike_on_every_client_kind(make_client, layout, kind, device):
    """``on_error`` has one meaning everywhere: a miss raises by default, and in "report" mode
    returns a ``LoadResult`` of 0 tokens naming every pool block asked for (none written)."""
    c = make_client(kind)
    kv = make_kv(layout, 2 * BT, 4, device)
    c.put(list(range(2 * BT)), kv)
    pool = pools(layout, 5, device)["xlayer"]
    ok = c.load_into(list(range(2 * BT)), pool, [4, 2], on_error="report")
    assert isinstance(ok, LoadResult) and ok == 2 * BT and ok.ok and ok.failed_block_ids == ()
    assert torch.equal(pool_blocks(pool, [4, 2]), blocks_of(kv))
    fresh = pools(layout, 5, device)["xlayer"]
    miss = list(range(3 * BT))
    res = c.load_into(miss, fresh, [0, 3, 1], on_error="report")
    assert int(res) == 0 and res.failed_block_ids == (0, 3, 1) and res.failed_positions == (0, 1, 2)
    assert _untouched(fresh)
    with pytest.raises(BlockNotFoundError):
        c.load_into(miss, fresh, [0, 3, 1])
    with pytest.raises(InvalidInputError, match="on_error"):
        c.load_into(list(range(2 * BT)), fresh, [0, 1], on_error="ignore")
    assert _untouched(fresh)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pool_layout", list(PoolLayout))
@pytest.mark.parametrize("split", [1, 2])
def test_every_engine_pool_layout_round_trips_through_every_client_kind(make_client, layout, kind, pool_layout,
                                                                        split, rng, seed, device):
    """What the vLLM connector does over a sidecar: save_from an engine pool of each layout
    (block size ``split`` store blocks), load_into another pool of that layout at other ids;
    token-for-token equal, nothing else written. Head-major and split pools are strided, so
    the client must not take them for rows of contiguous blocks."""
    c = make_client(kind)
    bs = BT * split
    gen = torch.Generator().manual_seed(seed)
    src = make_pool(pool_layout, layout, 6, bs, device, gen)
    dst = make_pool(pool_layout, layout, 6, bs, device)
    src_ids, dst_ids = rng.sample(range(6), 2), rng.sample(range(6), 2)
    tokens = [rng.randrange(1000) for _ in range(2 * bs)]
    sp, dp = EnginePool(src, pool_layout, bs), EnginePool(dst, pool_layout, bs)
    assert c.save_from(tokens, sp, sp.store_ids(src_ids, BT)) == len(tokens)
    want = token_kv(pool_layout, src, src_ids, bs)
    assert torch.equal(c.get(tokens, device=device), want)
    assert c.load_into(tokens, dp, dp.store_ids(dst_ids, BT)) == len(tokens)
    assert torch.equal(token_kv(pool_layout, dst, dst_ids, bs), want)
    assert not token_kv(pool_layout, dst, [b for b in range(6) if b not in dst_ids], bs).any()
