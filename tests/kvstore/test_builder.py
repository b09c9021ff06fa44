"""``kvstore.builder``: a store's tiers are built apart from the store, through its injection points."""

from __future__ import annotations

import tempfile

import pytest
import torch

from allocator import MemoryArena
from allocator.disk import slab_file_bytes
from kvstore import ConfigError, KVStore, StoreConfig
from kvstore.builder import build_store_tiers

BT = 4


def test_the_builder_makes_the_tiers_a_config_names_through_the_arena_factory(layout):
    bb = layout.kv_block_bytes(BT)
    asked: list[tuple[str, int, int]] = []

    def factory(tier: str, num_slots: int, slot_bytes: int, device: torch.device):
        asked.append((tier, num_slots, slot_bytes))
        return MemoryArena(num_slots + 3, slot_bytes) if tier == "host" else None  # 3 spare slots

    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=2 * bb, host_bytes=5 * bb,
                      disk_bytes=slab_file_bytes(8, bb))
    built = build_store_tiers(cfg, device=torch.device("cpu"), owner=None, clock=lambda: 0.0, arena_factory=factory)
    try:
        assert asked == [("device", 2, bb), ("host", 5, bb)]  # memory tiers only; disk is a slab
        assert [t.name for t in built.tiers.tiers] == ["device", "host", "disk"]
        host = built.tiers.tiers[1]
        assert host.capacity == 5 and host.spare == 3  # the factory's extra slots are staging, not cache
        assert built.acts is None and built.remote is None and built.recovered_blocks == 0
        assert built.tmpdir is not None  # no disk_path: a temporary directory for the slab
    finally:
        for tier in built.tiers.tiers:
            tier.arena.close()


def test_a_store_that_fails_to_build_leaves_no_temporary_slabs(layout, tmp_path, monkeypatch):
    """The KV slab is made in a temporary directory, then the activation tiers cannot be:
    the builder closes what it made and removes the directory before the error propagates."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=0,
                      disk_bytes=slab_file_bytes(8, bb), act_share=0.001, activations="beside")
    with pytest.raises(ConfigError, match="no tier room for one activation block"):
        KVStore(cfg)
    assert list(tmp_path.iterdir()) == []
