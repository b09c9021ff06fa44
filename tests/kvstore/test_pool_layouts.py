"""Every engine pool layout (kvstore.layout.PoolLayout) and an engine block size that is a
multiple of the store's: KV saved from one pool comes back token for token in another pool
of the same layout at other block ids, through the store and through its sidecar's client
API (embedded here; the vLLM tests cover the sidecar). Device-agnostic (``device`` fixture)."""

from __future__ import annotations

import pytest
import torch

from kvstore import BlockNotFoundError, InvalidInputError, KVStore, ModelLayout, StoreConfig
from kvstore.layout import PoolLayout
from kvstore.paged import EnginePool

BT = 4


def token_kv(kind: PoolLayout, pool, block_ids: list[int], bs: int) -> torch.Tensor:
    """The pool's KV of the tokens in ``block_ids`` as ``[L, 2, T, H, D]``, read the plain way."""
    parts = []
    for b in block_ids:
        if kind is PoolLayout.CROSS_LAYER:
            parts.append(pool[b])                                          # [L, 2, bs, H, D]
        elif kind is PoolLayout.BLOCK_MAJOR:
            parts.append(torch.stack([p[:, b] for p in pool]))             # [L, 2, bs, H, D]
        elif kind is PoolLayout.HEAD_MAJOR:
            parts.append(torch.stack([p[:, b].transpose(1, 2) for p in pool]))  # [2, H, bs, D] -> [2, bs, H, D]
        else:  # [H, bs, 2D] -> [2, bs, H, D]
            parts.append(torch.stack([p[b].view(p.shape[1], bs, 2, -1).permute(2, 1, 0, 3) for p in pool]))
    return torch.cat(parts, dim=2)


def make_pool(kind: PoolLayout, layout: ModelLayout, num_blocks: int, block_size: int, device, gen=None):
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim

    def fill(shape):
        if gen is None:
            return torch.zeros(shape, dtype=layout.dtype, device=device)
        return torch.randn(shape, generator=gen).to(layout.dtype).to(device)

    if kind is PoolLayout.CROSS_LAYER:
        return fill((num_blocks, L, 2, block_size, H, D))
    return [fill(kind.layer_shape(num_blocks, block_size, H, D)) for _ in range(L)]


@pytest.mark.parametrize("kind", list(PoolLayout))
@pytest.mark.parametrize("split", [1, 2, 4])
def test_save_from_then_load_into_round_trips(kind, split, layout, device, seed, rng):
    bs = BT * split
    gen = torch.Generator().manual_seed(seed)
    src = make_pool(kind, layout, 12, bs, device, gen)
    dst = make_pool(kind, layout, 12, bs, device)
    n_engine = 3
    src_ids = rng.sample(range(12), n_engine)
    dst_ids = rng.sample(range(12), n_engine)
    tokens = [rng.randrange(1000) for _ in range(n_engine * bs)]
    with KVStore(StoreConfig(layout=layout, block_tokens=BT, host_bytes=64 * layout.kv_block_bytes(BT),
                             device_bytes=0)) as store:
        sp = EnginePool(src, kind, bs)
        assert store.save_from(tokens, sp, sp.store_ids(src_ids, BT)) == len(tokens)
        dp = EnginePool(dst, kind, bs)
        assert store.load_into(tokens, dp, dp.store_ids(dst_ids, BT)) == len(tokens)
        want = token_kv(kind, src, src_ids, bs)
        assert torch.equal(token_kv(kind, dst, dst_ids, bs), want)
        # untouched blocks stay zero
        others = [b for b in range(12) if b not in dst_ids]
        assert not token_kv(kind, dst, others, bs).any()
        # the store holds the same KV as the pool: get agrees with a plain read
        assert torch.equal(store.get(tokens, device=device), want)
        # a prefix that is not cached is refused and leaves the pool as it was
        before = token_kv(kind, dst, list(range(12)), bs).clone()
        with pytest.raises(BlockNotFoundError):
            store.load_into([t + 1 for t in tokens], dp, dp.store_ids(dst_ids, BT))
        assert torch.equal(token_kv(kind, dst, list(range(12)), bs), before)


def test_pool_shape_errors_name_the_layout(layout):
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    block_major = [torch.zeros((2, 4, BT, H, D), dtype=layout.dtype) for _ in range(L)]
    with KVStore(StoreConfig(layout=layout, block_tokens=BT, host_bytes=8 * layout.kv_block_bytes(BT),
                             device_bytes=0)) as store:
        with pytest.raises(InvalidInputError, match="kv_heads, block_size"):
            store.load_into(list(range(BT)), EnginePool(block_major, PoolLayout.HEAD_MAJOR, BT), [0])
        with pytest.raises(InvalidInputError, match="multiple of the store's block_tokens"):
            store.load_into(list(range(BT)), EnginePool(block_major, PoolLayout.BLOCK_MAJOR, BT + 2), [0])
        with pytest.raises(InvalidInputError, match="one tensor per layer"):
            store.load_into(list(range(BT)), EnginePool(block_major[:1], PoolLayout.BLOCK_MAJOR, BT), [0])


@pytest.mark.parametrize("kind", list(PoolLayout))
def test_save_from_into_shared_arenas_records_what_it_wrote(kind, layout, device, seed, rng, tmp_path):
    """A sidecar's store keeps its tiers in shared memory (``ShmArena``), whose reads verify
    each slot against the checksum its writer recorded. ``save_from`` once copied pool rows
    into such slots without recording them: every block saved that way (the sidecar's
    ``save_pool``) then read back as corrupt and was dropped. The checksums come from the
    pool's bytes, so a slot changed in shared memory afterwards still reads as corrupt."""
    from allocator.shm import ShmArena

    bs = 2 * BT
    src = make_pool(kind, layout, 8, bs, device, torch.Generator().manual_seed(seed))
    dst = make_pool(kind, layout, 8, bs, device)
    ids_src, ids_dst = rng.sample(range(8), 3), rng.sample(range(8), 3)
    tokens = [rng.randrange(1000) for _ in range(3 * bs)]
    made: list[ShmArena] = []

    def shared(tier, num_slots, slot_bytes, dev):
        made.append(ShmArena(num_slots, slot_bytes, directory=str(tmp_path)))
        return made[-1]

    cfg = StoreConfig(layout=layout, block_tokens=BT, host_bytes=16 * layout.kv_block_bytes(BT), device_bytes=0)
    with KVStore(cfg, arena_factory=shared) as store:
        assert made, "the store's host tier should be a shared arena"
        sp, dp = EnginePool(src, kind, bs), EnginePool(dst, kind, bs)
        assert store.save_from(tokens, sp, sp.store_ids(ids_src, BT)) == len(tokens)
        assert store.load_into(tokens, dp, dp.store_ids(ids_dst, BT)) == len(tokens)
        assert torch.equal(token_kv(kind, dst, ids_dst, bs), token_kv(kind, src, ids_src, bs))
        # another process scribbles on one saved slot: the block reads as missing, never as other bytes
        arena = made[0]
        used = [s for s in range(arena.num_slots) if arena.checksums[s]]
        assert len(used) == 3 * bs // BT
        arena.data[used[0]].view(torch.uint8)[:8] ^= 0xFF
        with pytest.raises(BlockNotFoundError):
            store.get(tokens, device=device)
