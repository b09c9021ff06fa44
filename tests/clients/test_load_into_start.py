"""``load_into(..., start=k)`` on the store and every client kind: an engine that already
holds the first ``k`` blocks of a prefix (its own prefix-cache hit) has only blocks ``k...``
copied, into one pool id each. The whole prefix must still be cached; the pool blocks not
named -- the engine's own among them -- are never written; failures are reported as
positions in the whole prefix; bad ``start`` values are refused before anything is sent."""

from __future__ import annotations

import os

import pytest
import torch

from clients import BlockLoadError, LoadResult, connect
from kvstore import BlockNotFoundError, InvalidInputError
from kvstore.layout import PoolLayout
from kvstore.paged import EnginePool
from tests.clients.conftest import BT, KINDS
from tests.clients.test_shm_integrity import _scribble, _server, _slots_of
from tests.kvstore.test_datapath import blocks_of, make_kv, pool_blocks, pools
from tests.kvstore.test_pool_layouts import make_pool, token_kv
from tests.kvstore.test_store import small_store

#: the store itself (an EmbeddedClient's) beside the client kinds
STORE_AND_KINDS = ["store", *KINDS]


def _loader(make_client, kind: str):
    """``(put_into, load_into)`` of ``kind``: the store's own methods for ``"store"``."""
    c = make_client("embedded" if kind == "store" else kind)
    return c, (c.store if kind == "store" else c)


def _sentinel_pool(layout, num_blocks: int, device, pool_kind: str, gen: torch.Generator):
    """A pool whose every block holds random bytes (so a stray write shows) and its snapshot."""
    pool = pools(layout, num_blocks, device)[pool_kind]
    for t in ([pool] if isinstance(pool, torch.Tensor) else pool):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    return pool, pool_blocks(pool, range(num_blocks)).clone()


@pytest.mark.parametrize("kind", STORE_AND_KINDS)
@pytest.mark.parametrize("pool_kind", ["xlayer", "layers"])
def test_start_copies_only_the_blocks_from_start_and_nothing_else(make_client, layout, kind, pool_kind, rng,
                                                                  seed, device):
    c, loader = _loader(make_client, kind)
    tokens = [rng.randrange(5000) for _ in range(4 * BT)]
    kv = make_kv(layout, 4 * BT, seed, device)
    assert c.put(tokens, kv) == 4 * BT
    gen = torch.Generator().manual_seed(seed)
    pool, before = _sentinel_pool(layout, 8, device, pool_kind, gen)
    engine_own = [5, 0]  # the engine's hit: blocks 0 and 1 of the prefix, never to be written
    ids = [b for b in rng.sample(range(8), 8) if b not in engine_own][:2]
    res = loader.load_into(tokens, pool, ids, start=2)
    assert int(res) == 4 * BT
    if kind != "store":
        assert isinstance(res, LoadResult) and res.ok and res.failed_positions == ()
    assert torch.equal(pool_blocks(pool, ids), blocks_of(kv)[2:])
    others = [b for b in range(8) if b not in ids]
    assert torch.equal(pool_blocks(pool, others), before[others])
    # start at the end: the prefix is checked, nothing is copied
    assert int(loader.load_into(tokens, pool, [], start=4)) == 4 * BT
    assert torch.equal(pool_blocks(pool, others), before[others])
    # start 0 is the whole prefix, as without it
    assert int(loader.load_into(tokens, pool, [7, 6, 4, 3], start=0)) == 4 * BT
    assert torch.equal(pool_blocks(pool, [7, 6, 4, 3]), blocks_of(kv))
    if kind == "store":  # the blocks before start were pinned for the check and let go
        assert all(e.pins == 0 for e in loader._tiers.index.values())
        loader._check()


@pytest.mark.parametrize("kind", STORE_AND_KINDS)
def test_a_bad_start_is_refused_before_anything_is_sent_or_written(make_client, layout, kind, device):
    c, loader = _loader(make_client, kind)
    tokens = list(range(3 * BT))
    c.put(tokens, make_kv(layout, 3 * BT, 1, device))
    if kind not in ("store", "embedded"):
        def refuse(*a, **k):
            raise AssertionError("a request was sent for input that fails the local checks")
        c._request = refuse
    pool = pools(layout, 6, device)["xlayer"]
    for start, ids, msg in [(4, [], "outside the prefix's 3 block"), (-1, [0, 1, 2, 3], "outside"),
                            (1.0, [0, 1], "start must be an int"), (True, [0, 1], "start must be an int"),
                            ("1", [0, 1], "start must be an int"),
                            (1, [0, 1, 2], "3 block ids for 2"), (2, [0, 0], "2 block ids for 1"),
                            (1, [0, 0], "repeat")]:
        with pytest.raises(InvalidInputError, match=msg):
            loader.load_into(tokens, pool, ids, start=start)
    assert not pool.any()


@pytest.mark.parametrize("kind", KINDS)
def test_the_whole_prefix_must_be_cached_and_a_miss_reports_from_start(make_client, layout, kind, device):
    """A block missing before ``start`` fails the load as one after it does: the engine's own
    blocks are not proof that the store's chain holds. "report" names every id given, at
    positions ``start...``, with the blocks before ``start`` counted as loaded."""
    c = make_client(kind)
    tokens = list(range(4 * BT))
    c.put(tokens[:BT], make_kv(layout, BT, 3, device))  # only block 0 of the prefix
    pool = pools(layout, 6, device)["layers"]
    with pytest.raises(BlockNotFoundError):
        c.load_into(tokens, pool, [4, 1], start=2)
    res = c.load_into(tokens, pool, [4, 1], start=2, on_error="report")
    assert int(res) == 2 * BT and not res.ok
    assert res.failed_block_ids == (4, 1) and res.failed_positions == (2, 3)
    res = c.load_into(tokens, pool, [], start=4, on_error="report")  # nothing to copy, still a miss
    assert int(res) == 4 * BT and res.failed_block_ids == () and res.failed_positions == ()
    with pytest.raises(BlockNotFoundError):
        c.load_into(tokens, pool, [], start=4)
    assert not pool_blocks(pool, range(6)).any()


def test_the_store_refuses_a_miss_before_start_and_reads_nothing(layout, tmp_path, device):
    with small_store(layout, tmp_path, device=8, host=0, disk=0) as s:
        tokens = list(range(3 * BT))
        s.put(tokens[:2 * BT], make_kv(layout, 2 * BT, 4, device))
        pool = pools(layout, 4, device)["xlayer"]
        with pytest.raises(BlockNotFoundError, match=f"only {2 * BT} of {3 * BT}"):
            s.load_into(tokens, pool, [3], start=2)
        assert not pool.any()
        gets = s.stats()["get_blocks"]
        assert s.load_into(tokens[:2 * BT], pool, [3], start=1) == 2 * BT
        assert s.stats()["get_blocks"] == gets + 1  # one block read, not the prefix
        assert all(e.pins == 0 for e in s._tiers.index.values())
        assert s.clear() == 2  # nothing left pinned: every block can go


@pytest.mark.parametrize("pool_kind", ["xlayer", "layers"])
def test_a_corrupt_block_after_start_is_reported_in_the_store(layout, tmp_path, pool_kind, seed, device):
    """The store's checked read (a disk slab here): a block after ``start`` that fails its
    checksum is dropped and the load raises (the EmbeddedClient reports every id); the
    engine's blocks before ``start`` and every block not named stay as they were."""
    from clients.embedded import EmbeddedClient

    with small_store(layout, tmp_path, device=1, host=0, disk=8) as s:
        tokens = list(range(4 * BT))
        kv = make_kv(layout, 4 * BT, seed, device)
        s.put(tokens, kv)
        s.put(list(range(900, 900 + BT)), make_kv(layout, BT, 9, device))  # pushes the prefix to disk
        disk = s._tiers.tiers[-1].arena
        entry = s._tiers.index[s._keys(tokens)[1][3]]
        assert s._tiers.tiers[entry.tier] is s._tiers.tiers[-1]
        off = disk.data_offset + entry.slot * disk.stride + 10
        os.pwrite(disk.fd, bytes([os.pread(disk.fd, 1, off)[0] ^ 1]), off)
        gen = torch.Generator().manual_seed(seed)
        pool, before = _sentinel_pool(layout, 6, device, pool_kind, gen)
        c = EmbeddedClient(store=s)
        res = c.load_into(tokens, pool, [4, 2, 5], start=1, on_error="report")
        assert int(res) == BT and res.failed_block_ids == (4, 2, 5) and res.failed_positions == (1, 2, 3)
        assert s.stats()["corrupt_blocks"] == 1 and s.lookup(tokens) == 3 * BT
        untouched = [0, 1, 3]
        assert torch.equal(pool_blocks(pool, untouched), before[untouched])
        with pytest.raises(BlockNotFoundError):
            s.load_into(tokens, pool, [4, 2, 5], start=1)


@pytest.mark.parametrize("endpoint", ["tcp", "ipc"])
@pytest.mark.parametrize("pool_kind", ["xlayer", "layers"])
def test_over_shared_memory_only_blocks_from_start_are_copied_and_verified(tmp_path, layout, endpoint, pool_kind,
                                                                          seed, device):
    """A block changed in shared memory after ``start`` is named (its pool id, its prefix
    position) and dropped by the sidecar; the good ones hold exact bytes; a changed block
    before ``start`` is not read at all, so it cannot fail the load (the engine holds that
    block itself)."""
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    ep = "tcp://127.0.0.1:*" if endpoint == "tcp" else f"ipc://{tmp_path}/kvs.sock"
    srv = _server(ep, tmp_path, shm_dir)
    try:
        with connect(srv.endpoint, layout=layout, namespace="start", block_tokens=BT) as c:
            assert c.uses_shm
            tokens = list(range(4 * BT))
            kv = make_kv(layout, 4 * BT, seed, device)
            assert c.put(tokens, kv) == 4 * BT
            gen = torch.Generator().manual_seed(seed)
            pool, before = _sentinel_pool(layout, 6, device, pool_kind, gen)
            slots = _slots_of(srv, "start", tokens)
            _scribble(*slots[0], 7)  # before start: never read
            _scribble(*slots[2], 3)
            ids = [4, 1, 0]
            with pytest.raises(BlockLoadError) as err:
                c.load_into(tokens, pool, ids, start=1)
            assert err.value.failed_block_ids == (1,) and err.value.failed_positions == (2,)
            assert int(err.value.result) == 2 * BT
            assert torch.equal(pool_blocks(pool, [4, 0]), blocks_of(kv)[[1, 3]])
            assert torch.equal(pool_blocks(pool, [2, 3, 5]), before[[2, 3, 5]])
            assert c.lookup(tokens) == 2 * BT  # block 2 dropped (block 0 was not read)
            # the prefix before the dropped block still loads from start, in "report" mode too
            res = c.load_into(tokens[:2 * BT], pool, [5], start=1, on_error="report")
            assert res.ok and int(res) == 2 * BT
            assert torch.equal(pool_blocks(pool, [5]), blocks_of(kv)[[1]])
            res = c.load_into(tokens, pool, [4, 1, 0], start=1, on_error="report")  # now a miss
            assert int(res) == BT and res.failed_positions == (1, 2, 3) and res.failed_block_ids == (4, 1, 0)
    finally:
        srv.stop(timeout=10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pool_layout", list(PoolLayout))
def test_an_engine_pool_of_two_store_blocks_per_engine_block_loads_from_an_engine_block(
        make_client, layout, kind, pool_layout, rng, seed, device):
    """What the vLLM connector does: the engine holds its first engine block (two store
    blocks), the rest is loaded at ``start=2`` into store ids of the engine's blocks."""
    c = make_client(kind)
    bs = 2 * BT
    gen = torch.Generator().manual_seed(seed)
    src = make_pool(pool_layout, layout, 6, bs, device, gen)
    dst = make_pool(pool_layout, layout, 6, bs, device, torch.Generator().manual_seed(seed + 1))
    snapshot = [t.clone() for t in dst] if isinstance(dst, list) else dst.clone()
    tokens = [rng.randrange(1000) for _ in range(2 * bs)]  # the test stores' capacity: 4 store blocks
    sp, dp = EnginePool(src, pool_layout, bs), EnginePool(dst, pool_layout, bs)
    src_ids = rng.sample(range(6), 2)
    assert c.save_from(tokens, sp, sp.store_ids(src_ids, BT)) == len(tokens)
    dst_ids = [4]  # the engine block for prefix block 1
    res = c.load_into(tokens, dp, dp.store_ids(dst_ids, BT), start=2, on_error="report")
    assert res.ok and int(res) == len(tokens)
    assert torch.equal(token_kv(pool_layout, dst, dst_ids, bs), token_kv(pool_layout, src, src_ids[1:], bs))
    rest = [b for b in range(6) if b not in dst_ids]
    assert torch.equal(token_kv(pool_layout, dst, rest, bs), token_kv(pool_layout, snapshot, rest, bs))


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_as_frames_only_the_blocks_from_start_cross_the_wire(make_client, layout, rng, seed, on_disk):
    """A TCP client without shared memory (another host) is sent blocks ``start...`` only:
    the reply's KV is the prefix's tail, byte for byte, from memory or from disk."""
    from kvstore.sidecar.protocol import tensor_from_frame

    c = make_client("tcp-frames")
    n = 6 if on_disk else 3  # more blocks than the memory tiers hold: the first ones go to disk
    tokens = [rng.randrange(5000) for _ in range(n * BT)]
    kv = make_kv(layout, n * BT, seed, torch.device("cpu"))
    assert c.put(tokens, kv) == n * BT
    if on_disk:
        c.put([t + 7000 for t in tokens], make_kv(layout, n * BT, seed + 1, torch.device("cpu")))
        assert c.stats()["tiers"]["disk"]["used_blocks"] >= 1  # the oldest (ours) were pushed down
    _, args = c._ns_args(tokens)
    for start in [n // 2, *(s for s in range(n + 1) if s != n // 2)]:  # the first read is from disk
        result, frames = c._request("get", {**args, "start": start})
        tail = tensor_from_frame(frames[0], result["kv"])
        assert tail.shape[2] == (n - start) * BT
        assert torch.equal(tail, kv[:, :, start * BT:])
    for bad in (-1, n + 1, True, "1"):
        with pytest.raises(InvalidInputError):
            c._request("get", {**args, "start": bad})
        with pytest.raises(InvalidInputError):  # refused alike where a lease would be granted
            c._request("get", {**args, "start": bad, "shm": True})
    # and load_into puts that tail where the engine asked
    pool = torch.zeros((n + 2, *layout.block_shape(BT)), dtype=layout.dtype)
    ids = rng.sample(range(n + 2), n - 1)
    assert int(c.load_into(tokens, pool, ids, start=1)) == n * BT
    assert torch.equal(pool[ids], blocks_of(kv)[1:])
