"""A strided CPU pool (head-major layouts, an engine block of several store blocks: what
vLLM-CPU hands its connector) loaded and saved over shared memory a cache-sized chunk of
blocks at a time (``clients.chunked``): each chunk copied + hashed into a small per-thread
bounce, verified, then laid out into the pool. The chunk size is made tiny here so that a
prefix of a few blocks crosses chunk boundaries: bytes exact on every layout, a corrupt
block in a later chunk named and never placed while the others are, pool blocks not named
never written, a block larger than a chunk, and the bounce reused rather than allocated per
call."""

from __future__ import annotations

import pytest
import torch

import clients.sidecar as sidecar_mod
from clients import connect
from clients.chunked import StridedPool, chunk_blocks, chunks_of
from clients.sidecar import _pool_u8
from kvstore import paged
from kvstore.layout import PoolLayout
from kvstore.paged import EnginePool
from tests.clients.conftest import BT, start_server
from tests.clients.test_shm_integrity import _scribble, _slots_of
from tests.kvstore.test_pool_layouts import make_pool, token_kv

NB = 8  # store blocks per prefix
PER = 3  # blocks per chunk in these tests: chunks of 3, 3, 2 -- a boundary inside the prefix


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunked")
    shm = d / "shm"
    shm.mkdir()
    s = start_server(f"ipc://{d}/kvs.sock", d, scale=6, shm_dir=str(shm))
    yield s
    s.stop(timeout=10)


@pytest.fixture
def client(srv, layout, request):
    c = connect(srv.endpoint, layout=layout, namespace=request.node.name[:60], block_tokens=BT, timeout=10)
    assert c.uses_shm
    yield c
    c.close()


def _chunks_of(c, per: int) -> None:
    """Make ``c`` copy ``per`` blocks per chunk (the real size is sized for real blocks)."""
    c._chunk_bytes = per * c.layout.kv_block_bytes(BT)
    assert chunk_blocks(c.layout.kv_block_bytes(BT), c._chunk_bytes) == per


def _count_chunks(monkeypatch) -> list[int]:
    """Record how many chunks each chunked copy runs (the client's run_chunks calls)."""
    seen: list[int] = []
    real = sidecar_mod.run_chunks

    def spy(n, work, pool, parts):
        seen.append(n)
        return real(n, work, pool, parts)
    monkeypatch.setattr(sidecar_mod, "run_chunks", spy)
    return seen


def _random_pool(kind: PoolLayout, layout, num_blocks: int, bs: int, seed: int):
    """A pool whose every block holds random bytes (a stray write shows) and its snapshot."""
    pool = make_pool(kind, layout, num_blocks, bs, "cpu", torch.Generator().manual_seed(seed))
    return pool, [t.clone() for t in ([pool] if isinstance(pool, torch.Tensor) else pool)]


def _same(pool, snap) -> bool:
    return all(torch.equal(a, b) for a, b in zip([pool] if isinstance(pool, torch.Tensor) else pool, snap))


CASES = [(k, s) for k in PoolLayout for s in (1, 2) if (k, s) != (PoolLayout.CROSS_LAYER, 1)]
CASE_IDS = [f"{k.value}-split{s}" for k, s in CASES]


def test_chunk_blocks_fits_the_cache_and_never_splits_a_block():
    assert chunk_blocks(256 << 10) == 4  # vLLM-CPU bench: 16 tokens x 16 KiB, 1 MiB chunks
    assert chunk_blocks(512, 1536) == 3 and chunk_blocks(512, 1535) == 2
    assert chunk_blocks(4 << 20) == 1 and chunk_blocks(4 << 20, 1) == 1  # larger than a chunk: one block
    assert [list(r) for r in chunks_of(8, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert chunks_of(0, 3) == []


@pytest.mark.parametrize("kind,split", CASES, ids=CASE_IDS)
def test_strided_pool_places_and_gathers_like_paged(kind, split, layout, seed, rng):
    """StridedPool.put/get equal paged.place/take byte for byte, and write nothing else."""
    bs = BT * split
    pool, snap = _random_pool(kind, layout, 5, bs, seed)
    rows, n = paged.pool_rows(layout, BT, EnginePool(pool, kind, bs))
    assert isinstance(rows, paged.LayerRows) and n == 5 * split
    sp = StridedPool(rows)
    if kind is PoolLayout.CROSS_LAYER:
        assert len(sp.placements) == 1  # every layer and K/V of a block in one strided copy
    else:
        assert len(sp.placements) == layout.num_layers  # K and V of a layer in one
    ids = rng.sample(range(n), 4)
    want = paged.take(rows, ids)
    got = torch.empty_like(want)
    for k, b in enumerate(ids):
        sp.get(b, got[k].view(torch.uint8).numpy())
    assert torch.equal(got, want)
    assert _same(pool, snap)
    fresh = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 1)).to(want.dtype)
    ref, _ = _random_pool(kind, layout, 5, bs, seed)
    ref_rows, _ = paged.pool_rows(layout, BT, EnginePool(ref, kind, bs))
    paged.place(fresh, range(4), ref_rows, ids)
    for k, b in enumerate(ids):
        sp.put(fresh[k].view(torch.uint8).numpy(), b)
    assert _same(pool, [t for t in ([ref] if isinstance(ref, torch.Tensor) else ref)])


def test_strided_pool_with_k_and_v_apart_copies_each_half(layout, seed):
    """Rows whose K and V are separate tensors cannot be one view: one copy per half."""
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(3, 2, BT, H, D, generator=g).to(layout.dtype) for _ in range(2 * L)]
    rows = paged._layer_rows(views, 2)
    sp = StridedPool(rows)
    assert len(sp.placements) == 2 * L
    want = paged.take(rows, [5, 0])
    got = torch.empty_like(want)
    sp.get(5, got[0].view(torch.uint8).numpy())
    sp.get(0, got[1].view(torch.uint8).numpy())
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind,split", CASES, ids=CASE_IDS)
def test_load_and_save_across_chunk_boundaries_are_exact(client, layout, kind, split, seed, rng, monkeypatch):
    """Save from one pool and load into another, 3 blocks a chunk over 8 blocks (and again
    from a start inside the first chunk): every block exact, pool blocks not named untouched,
    the copies went chunk by chunk through a bounce of one chunk per thread."""
    _chunks_of(client, PER)
    seen = _count_chunks(monkeypatch)
    bs = BT * split
    n_engine = NB // split
    src, _ = _random_pool(kind, layout, n_engine + 2, bs, seed)
    dst, snap = _random_pool(kind, layout, n_engine + 3, bs, seed + 7)
    sp, dp = EnginePool(src, kind, bs), EnginePool(dst, kind, bs)
    src_ids = rng.sample(range(n_engine + 2), n_engine)
    dst_ids = rng.sample(range(n_engine + 3), n_engine)
    tokens = [rng.randrange(1000) for _ in range(NB * BT)]
    assert client.save_from(tokens, sp, sp.store_ids(src_ids, BT)) == NB * BT
    want = token_kv(kind, src, src_ids, bs)
    assert torch.equal(client.get(tokens, device="cpu"), want)
    assert client.load_into(tokens, dp, dp.store_ids(dst_ids, BT)) == NB * BT
    assert torch.equal(token_kv(kind, dst, dst_ids, bs), want)
    others = [b for b in range(n_engine + 3) if b not in dst_ids]
    snap_pool = snap[0] if kind is PoolLayout.CROSS_LAYER else snap
    assert torch.equal(token_kv(kind, dst, others, bs), token_kv(kind, snap_pool, others, bs))
    assert seen == [3, 3]  # the save and the load, 3 chunks each
    # from a start that is not a chunk boundary: the first engine block is the engine's own
    fresh, fsnap = _random_pool(kind, layout, n_engine + 3, bs, seed + 9)
    fp = EnginePool(fresh, kind, bs)
    res = client.load_into(tokens, fp, fp.store_ids(dst_ids[1:], BT), start=split)
    assert int(res) == NB * BT and res.ok
    assert torch.equal(token_kv(kind, fresh, dst_ids[1:], bs), want[:, :, bs:])
    keep = [b for b in range(n_engine + 3) if b not in dst_ids[1:]]
    fsnap_pool = fsnap[0] if kind is PoolLayout.CROSS_LAYER else fsnap
    assert torch.equal(token_kv(kind, fresh, keep, bs), token_kv(kind, fsnap_pool, keep, bs))
    assert seen[-1] == len(chunks_of(NB - split, PER))
    assert not client._bounces  # no prefix-sized bounce on a CPU pool
    assert client._chunk_bounces and all(b.shape[0] == PER for b in client._chunk_bounces.values())


@pytest.mark.parametrize("kind", [PoolLayout.HEAD_MAJOR_PACKED, PoolLayout.BLOCK_MAJOR])
@pytest.mark.parametrize("on_error", ["report", "raise"])
def test_a_corrupt_block_in_the_second_chunk_is_named_and_never_placed(srv, client, layout, kind, on_error,
                                                                     seed, rng):
    """Block 4 (second chunk of 3) is changed in shared memory after the put: the blocks of
    the first chunk and the others of later chunks land exactly, block 4's pool rows keep
    what they held, it is named by pool id and prefix position, and the sidecar drops it."""
    _chunks_of(client, PER)
    bs = 2 * BT
    n_engine = NB // 2
    src, _ = _random_pool(kind, layout, n_engine, bs, seed)
    sp = EnginePool(src, kind, bs)
    tokens = [rng.randrange(1000) for _ in range(NB * BT)]
    assert client.save_from(tokens, sp, sp.store_ids(range(n_engine), BT)) == NB * BT
    want = client.get(tokens, device="cpu")
    _scribble(*_slots_of(srv, client.namespace, tokens)[4], 0)
    dst, snap = _random_pool(kind, layout, n_engine + 2, bs, seed + 3)
    dp = EnginePool(dst, kind, bs)
    dst_ids = rng.sample(range(n_engine + 2), n_engine)
    store_ids = dp.store_ids(dst_ids, BT)
    if on_error == "raise":
        with pytest.raises(sidecar_mod.BlockLoadError, match="changed") as err:
            client.load_into(tokens, dp, store_ids)
        res = err.value.result
    else:
        res = client.load_into(tokens, dp, store_ids, on_error="report")
    assert int(res) == 4 * BT and res.failed_positions == (4,) and res.failed_block_ids == (store_ids[4],)
    rows, _ = paged.pool_rows(layout, BT, dp)
    snap_rows, _ = paged.pool_rows(layout, BT, EnginePool(snap, kind, bs))
    got, before = paged.take(rows, store_ids), paged.take(snap_rows, store_ids)
    want6 = want.view(layout.num_layers, 2, NB, BT, *want.shape[3:]).permute(2, 0, 1, 3, 4, 5)
    for pos in range(NB):
        assert torch.equal(got[pos], before[pos] if pos == 4 else want6[pos]), pos
    untouched = [b for b in range(n_engine + 2) if b not in dst_ids]
    assert torch.equal(token_kv(kind, dst, untouched, bs), token_kv(kind, snap, untouched, bs))
    assert client.lookup(tokens) == 4 * BT  # dropped by the sidecar with what hangs off it


def test_a_block_larger_than_a_chunk_is_a_chunk_of_its_own(srv, client, layout, seed, rng, monkeypatch):
    """A chunk smaller than one block: one block per chunk, verified whole before any of it
    is placed -- a corrupt one leaves its pool rows as they were."""
    client._chunk_bytes = layout.kv_block_bytes(BT) // 3
    seen = _count_chunks(monkeypatch)
    kind, bs = PoolLayout.HEAD_MAJOR_PACKED, 2 * BT
    src, _ = _random_pool(kind, layout, 4, bs, seed)
    sp = EnginePool(src, kind, bs)
    tokens = [rng.randrange(1000) for _ in range(NB * BT)]
    assert client.save_from(tokens, sp, sp.store_ids(range(4), BT)) == NB * BT
    want = token_kv(kind, src, range(4), bs)
    assert torch.equal(client.get(tokens, device="cpu"), want)
    dst, snap = _random_pool(kind, layout, 6, bs, seed + 1)
    dp = EnginePool(dst, kind, bs)
    assert client.load_into(tokens, dp, dp.store_ids([5, 1, 0, 3], BT)) == NB * BT
    assert torch.equal(token_kv(kind, dst, [5, 1, 0, 3], bs), want)
    assert torch.equal(token_kv(kind, dst, [2, 4], bs), token_kv(kind, snap, [2, 4], bs))
    assert seen == [NB, NB] and all(b.shape[0] == 1 for b in client._chunk_bounces.values())
    _scribble(*_slots_of(srv, client.namespace, tokens)[7], 0)
    again, asnap = _random_pool(kind, layout, 6, bs, seed + 2)
    ap = EnginePool(again, kind, bs)
    res = client.load_into(tokens, ap, ap.store_ids([5, 1, 0, 3], BT), on_error="report")
    assert int(res) == 7 * BT and res.failed_positions == (7,)
    assert torch.equal(token_kv(kind, again, [5, 1, 0], bs), want[:, :, :3 * bs])
    half = BT  # engine block 3 holds store blocks 6 (good) and 7 (corrupt, never placed)
    assert torch.equal(token_kv(kind, again, [3], bs)[:, :, :half], want[:, :, 3 * bs:3 * bs + half])
    assert torch.equal(token_kv(kind, again, [3], bs)[:, :, half:], token_kv(kind, asnap, [3], bs)[:, :, half:])


def _saved_head_major(client, layout, seed, rng) -> tuple[list[int], EnginePool, EnginePool]:
    """A head-major pool (strided rows: the chunked path) saved under fresh tokens, and a
    second such pool to load into: ``(tokens, saved pool, empty pool)``."""
    kind, bs = PoolLayout.HEAD_MAJOR, 2 * BT
    src, _ = _random_pool(kind, layout, 4, bs, seed)
    sp = EnginePool(src, kind, bs)
    tokens = [rng.randrange(1000) for _ in range(NB * BT)]
    client.save_from(tokens, sp, sp.store_ids(range(4), BT))
    dst, _ = _random_pool(kind, layout, 4, bs, seed + 1)
    return tokens, sp, EnginePool(dst, kind, bs)


def test_the_bounce_is_reused_across_calls(client, layout, seed, rng):
    """Loads and saves after the first allocate nothing: every thread's bounce is the same
    memory, one chunk of rows; the real chunk size keeps vLLM-shaped blocks to 1 MiB."""
    tokens, sp, dp = _saved_head_major(client, layout, seed, rng)
    client.load_into(tokens, dp, dp.store_ids(range(4), BT))
    first = {t: b.ctypes.data for t, b in client._chunk_bounces.items()}
    assert first and _pool_u8(paged.pool_rows(layout, BT, dp)[0]) is None
    for _ in range(3):
        client.save_from(tokens, sp, sp.store_ids(range(4), BT))
        assert client.load_into(tokens, dp, dp.store_ids([3, 2, 1, 0], BT)) == NB * BT
    assert {t: b.ctypes.data for t, b in client._chunk_bounces.items() if t in first} == first
    per = chunk_blocks(layout.kv_block_bytes(BT))
    assert all(b.shape[0] == per for b in client._chunk_bounces.values())


def test_a_threads_bounce_goes_with_the_thread(client, layout, seed, rng):
    """An engine may call from short-lived threads: each thread's bounce is freed when the
    thread is gone, not kept for the client's life (no pile-up of buffers)."""
    import gc
    import threading

    tokens, sp, dp = _saved_head_major(client, layout, seed, rng)
    before = set(client._chunk_bounces.keys())
    for _ in range(5):
        t = threading.Thread(target=lambda: client.load_into(tokens, dp, dp.store_ids(range(4), BT)))
        t.start()
        t.join(30)
        assert t in client._chunk_bounces.keys()  # it had its own while it ran
        del t
        gc.collect()
        assert set(client._chunk_bounces.keys()) <= before | set(threading.enumerate())
    assert len(client._chunk_bounces) <= len(before) + len(threading.enumerate())
    assert torch.equal(paged.pool_rows(layout, BT, dp)[0][0], paged.pool_rows(layout, BT, sp)[0][0])
