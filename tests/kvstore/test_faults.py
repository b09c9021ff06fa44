"""Faults underneath the disk tier: the store keeps serving, the failing tier is marked
degraded, reads report a miss, errors are counted and logged once -- never wrong bytes."""

from __future__ import annotations

import errno
import logging
import os

import pytest
import torch

from tests.helpers import same

from allocator import FileOps
from allocator.disk import slab_file_bytes
from kvstore import BlockNotFoundError, KVStore, StoreConfig

BT = 4


class Faulty(FileOps):
    """Fails chosen operations on demand."""

    def __init__(self) -> None:
        self.fail_write: int | None = None
        self.fail_read: int | None = None

    def pwritev(self, fd, buffers, offset):
        if self.fail_write is not None:
            raise OSError(self.fail_write, os.strerror(self.fail_write))
        return super().pwritev(fd, buffers, offset)

    def preadv(self, fd, buffers, offset):
        if self.fail_read is not None:
            raise OSError(self.fail_read, os.strerror(self.fail_read))
        return super().preadv(fd, buffers, offset)


def kv_for(layout, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def prompt(p: int) -> list[int]:
    return [p * 1000 + i for i in range(8)]


@pytest.fixture
def faulty_store(layout, tmp_path):
    ops = Faulty()
    bb = layout.kv_block_bytes(BT)
    store = KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=2 * bb, host_bytes=2 * bb,
                                disk_bytes=slab_file_bytes(16, bb), disk_path=str(tmp_path)), file_ops=ops)
    yield store, ops
    store.close()


def test_enospc_on_demotion_degrades_disk_and_keeps_serving(faulty_store, layout, caplog):
    s, ops = faulty_store
    ops.fail_write = errno.ENOSPC
    with caplog.at_level(logging.ERROR):
        for p in range(6):  # each put pushes older blocks towards the (failing) disk
            assert s.put(prompt(p), kv_for(layout, 8, p)) == 8
            s._check()
    st = s.stats()
    assert st["tiers"]["disk"]["degraded"] and st["tiers"]["disk"]["io_errors"] >= 1
    assert st["tiers"]["disk"]["used_blocks"] == 0
    assert sum("degraded" in r.message for r in caplog.records) == 1  # logged once, not per block
    for p in range(6):  # what is still cached is exact; the rest is a clean miss
        n = s.lookup(prompt(p))
        if n:
            assert same(s.get(prompt(p)[:n]), kv_for(layout, 8, p)[:, :, :n])
    assert s.lookup(prompt(5)) == 8


def test_eio_on_read_reports_a_miss_and_later_puts_skip_the_disk(faulty_store, layout):
    s, ops = faulty_store
    for p in range(4):
        s.put(prompt(p), kv_for(layout, 8, p))
    assert s.stats()["tiers"]["disk"]["used_blocks"] > 0
    ops.fail_read = errno.EIO
    with pytest.raises(BlockNotFoundError):
        s.get(prompt(0))  # prompt 0 was demoted to disk
    st = s.stats()
    assert st["tiers"]["disk"]["degraded"] and st["tiers"]["disk"]["io_errors"] == 1
    assert s.lookup(prompt(0)) == 0
    ops.fail_read = None
    for p in range(4, 8):
        assert s.put(prompt(p), kv_for(layout, 8, p)) == 8
    assert same(s.get(prompt(7)), kv_for(layout, 8, 7))
    s._check()


def test_slab_truncated_underneath_reads_as_missing(faulty_store, layout):
    s, _ = faulty_store
    for p in range(4):
        s.put(prompt(p), kv_for(layout, 8, p))
    disk = s._tiers.tiers[-1].arena
    os.truncate(disk.path, disk.data_offset)  # every payload gone
    with pytest.raises(BlockNotFoundError, match="checksum"):
        s.get(prompt(0))
    assert s.stats()["corrupt_blocks"] >= 1
    assert same(s.get(prompt(3)), kv_for(layout, 8, 3))  # memory tiers unaffected
    s._check()


def test_slab_deleted_underneath_keeps_working(faulty_store, layout):
    s, _ = faulty_store
    for p in range(4):
        s.put(prompt(p), kv_for(layout, 8, p))
    os.unlink(s._tiers.tiers[-1].arena.path)  # the open descriptor still holds the file
    for p in range(4):
        assert same(s.get(prompt(p)), kv_for(layout, 8, p))
    s._check()
