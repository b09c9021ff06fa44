"""persist = true: the disk tier survives a clean restart and a SIGKILL; torn writes and
cleared blocks never come back as data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import same

from allocator.disk import slab_file_bytes
from kvstore import BlockNotFoundError, ConfigError, KVStore, ModelLayout, StoreConfig

BT = 4


def kv_for(layout: ModelLayout, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def durable(layout, path, device=2, host=2, disk=64, fsync="always") -> KVStore:
    bb = layout.kv_block_bytes(BT)
    return KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=device * bb, host_bytes=host * bb,
                               disk_bytes=slab_file_bytes(disk, bb), disk_path=str(path), persist=True,
                               fsync=fsync))


def prompt(p: int) -> list[int]:
    return [p * 1000 + i for i in range(12)]


def test_clean_restart_keeps_every_block(layout, tmp_path):
    with durable(layout, tmp_path) as s:
        for p in range(8):
            assert s.put(prompt(p), kv_for(layout, 12, p)) == 12
        s._check()
    with durable(layout, tmp_path) as s:
        assert s.recovered_blocks == 24
        for p in range(8):
            assert s.lookup(prompt(p)) == 12
            assert same(s.get(prompt(p)), kv_for(layout, 12, p))
        s._check()


def test_clear_is_durable_too(layout, tmp_path):
    with durable(layout, tmp_path) as s:
        s.put(prompt(0), kv_for(layout, 12, 0))
        s.clear()
    with durable(layout, tmp_path) as s:
        assert s.recovered_blocks == 0 and s.lookup(prompt(0)) == 0


def test_torn_payload_is_reported_missing_after_restart(layout, tmp_path):
    with durable(layout, tmp_path) as s:
        s.put(prompt(0), kv_for(layout, 12, 0))
        s.put(prompt(1), kv_for(layout, 12, 1))
        disk = s._tiers.tiers[-1].arena
        key = s._keys(prompt(1))[1][2]
        slot = s._tiers.index[key].backup
    with open(disk.path, "r+b") as f:  # a torn write: half the payload never reached the disk
        f.seek(disk.data_offset + slot * disk.stride + disk.slot_bytes // 2)
        f.write(b"\0" * (disk.slot_bytes // 2))
    with durable(layout, tmp_path) as s:
        assert s.lookup(prompt(1)) == 12  # headers look fine until the payload is read
        with pytest.raises(BlockNotFoundError, match="checksum"):
            s.get(prompt(1))
        assert s.lookup(prompt(1)) == 8
        assert same(s.get(prompt(1)[:8]), kv_for(layout, 12, 1)[:, :, :8])
        assert same(s.get(prompt(0)), kv_for(layout, 12, 0))


def test_persist_needs_a_path_and_one_owner(layout, tmp_path):
    bb = layout.kv_block_bytes(BT)
    with pytest.raises(ConfigError, match="disk_path"):
        KVStore(StoreConfig(layout=layout, block_tokens=BT, disk_bytes=1 << 20, persist=True))
    with durable(layout, tmp_path):
        with pytest.raises(ConfigError, match="in use"):
            durable(layout, tmp_path)
    other = ModelLayout(num_layers=3, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
    with pytest.raises(ConfigError, match="geometry"):
        durable(other, tmp_path)
    del bb


_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.kvstore.test_persist import durable, kv_for, prompt
    from kvstore import ModelLayout
    layout = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
    s = durable(layout, {path!r}, disk=256)
    p = 0
    while True:
        s.put(prompt(p), kv_for(layout, 12, p))
        print(p, flush=True)  # acknowledged: durable from here on
        p += 1
""")


def test_sigkill_mid_put_storm_loses_no_acknowledged_block(layout, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=root, path=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 20:
                break
        assert len(acked) >= 20, "writer died before 20 puts"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with durable(layout, tmp_path, disk=256) as s:
        for p in acked:
            assert s.lookup(prompt(p)) == 12, f"acknowledged prompt {p} lost"
            assert same(s.get(prompt(p)), kv_for(layout, 12, p))
        s._check()
        report = {"acked": len(acked), "recovered": s.recovered_blocks}
    assert report["recovered"] >= 3 * len(acked), json.dumps(report)
