"""The store's CUDA paths (issue 26): demotion from the device tier, pinning of the host
tier, promotion after a restore. Ordering is proven on CPU with the delayed-copy device
(``tests/delayed_copies.py``); what only a GPU can show is marked ``cuda``."""

from __future__ import annotations

import pytest
import torch

from allocator import MemoryArena
from kvstore import KVStore, ModelLayout, StoreConfig
from tests.delayed_copies import DelayedCopier

BT = 4


def _kv(layout: ModelLayout, tokens: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(tokens), generator=g).to(layout.dtype).to(device)


def test_random_puts_demote_device_to_host_with_the_right_bytes(layout, rng, seed):
    """Item 1 end to end: a small store whose device tier is a fake device (copies to the
    host land only when waited for). Random puts make most device->host demotions land in
    scattered host slots; every block read back (from either tier) is what was put."""
    copier = DelayedCopier()

    def factory(tier, num_slots, slot_bytes, dev):
        arena = MemoryArena(num_slots, slot_bytes, device="cpu", copier=copier)
        if tier == "device":
            copier.put_on(arena.data)
        return arena

    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=6 * bb, host_bytes=24 * bb, disk_bytes=0,
                      device="cpu", promote_on_hit=False)
    put: dict[int, tuple[list[int], torch.Tensor]] = {}
    with KVStore(cfg, arena_factory=factory) as s:
        for i in range(40):
            n = rng.randint(1, 3) * BT
            tokens = [10_000 * i + t for t in range(n)]
            kv = _kv(layout, n, seed * 100 + i)
            s.put(tokens, kv)
            put[i] = (tokens, kv)
        served = 0
        for i, (tokens, kv) in put.items():
            got = s.lookup(tokens)
            if got:
                assert torch.equal(s.get(tokens[:got]), kv[:, :, :got]), f"prefix {i} (seed {seed})"
                served += 1
        st = s.stats()["tiers"]
        assert st["host"]["demotions_in"] > 0 and st["host"]["used_blocks"] > 0 and served > 0
        s._check()
    assert copier.crossings > 0 and copier.in_flight() == 0


def test_a_cpu_store_pins_nothing_and_creates_no_cuda_context(layout, tmp_path):
    """Item 5: a device="cpu" store's host tier is plain memory (no registration)."""
    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=4 * bb, host_bytes=8 * bb,
                      disk_bytes=0, device="cpu")
    with KVStore(cfg) as s:
        s.put(list(range(8)), _kv(layout, 8, 1))
        arenas = dict(s.port.tier_arenas())
        assert not arenas["host"].pinned and not arenas["device"].pinned
    assert not torch.cuda.is_initialized()


def test_a_cpu_store_on_a_gpu_host_never_asks_for_pinned_memory(layout, monkeypatch):
    """Item 5 on a GPU host (simulated: CUDA reported present, but any CUDA call would fail
    on this CPU-only build): the store neither pins nor registers its host tier."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=4 * bb, host_bytes=8 * bb,
                      disk_bytes=0, device="cpu")
    with KVStore(cfg) as s:
        kv = _kv(layout, 8, 2)
        s.put(list(range(8)), kv)
        assert torch.equal(s.get(list(range(8))), kv)
        assert not dict(s.port.tier_arenas())["host"].pinned


@pytest.mark.cuda
def test_cuda_host_tier_is_registered_exactly_and_unregistered_at_close(layout):
    """Item 5 on a GPU: the host tier is page-locked (exactly its bytes, not a power of two
    from the caching host allocator) and unpinned by close()."""
    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=4 * bb, host_bytes=12 * bb,
                      disk_bytes=0, device="cuda")
    s = KVStore(cfg)
    host = dict(s.port.tier_arenas())["host"]
    assert host.pinned and host.data.is_pinned()
    assert host.data.numel() == 12 * bb  # the caching allocator would have rounded to 16
    kv = _kv(layout, 64, 3, "cuda")
    s.put(list(range(64)), kv)  # 16 blocks: 12 demoted to the host tier
    assert torch.equal(s.get(list(range(64)), device="cuda"), kv)
    view = host.data[:1]  # keeps the (now plain) memory alive after close
    s.close()
    assert not host.pinned and not view.is_pinned()  # the registration is gone


@pytest.mark.cuda
def test_cuda_restore_promotes_without_a_host_round_trip(layout):
    """Item 10: blocks read from the host tier during a CUDA get are promoted into the device
    tier with the bytes that were put."""
    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=4 * bb, host_bytes=16 * bb,
                      disk_bytes=0, device="cuda")
    with KVStore(cfg) as s:
        kv = _kv(layout, 32, 4, "cuda")
        s.put(list(range(32)), kv)
        assert torch.equal(s.get(list(range(16)), device="cuda"), kv[:, :, :16])
        assert torch.equal(s.get(list(range(16)), device="cuda"), kv[:, :, :16])
        s._check()
