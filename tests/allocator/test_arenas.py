from __future__ import annotations

import errno
import os

import pytest
import torch

from allocator import CorruptSlotError, DiskArena, FileOps, MemoryArena, transfer
from allocator.disk import HEADER_BYTES, MAGIC, _HEADER


def rows(n: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, width), dtype=torch.uint8, generator=g)


@pytest.fixture
def disk(tmp_path):
    arena = DiskArena(tmp_path / "slab", 16, 5000)
    yield arena
    arena.close()


def test_memory_arena_roundtrip_any_order():
    a = MemoryArena(8, 100, device="cpu")
    x = rows(4, 100)
    a.write([7, 2, 3, 0], x)
    out = torch.empty(4, 100, dtype=torch.uint8)
    a.read([0, 3, 7, 2], out)
    assert torch.equal(out, x[[3, 2, 0, 1]])


def test_memory_arena_rejects_wrong_row_size():
    a = MemoryArena(4, 100, device="cpu")
    with pytest.raises(ValueError, match="row of 99 bytes"):
        a.write([0], rows(1, 99))


def test_disk_roundtrip_runs_and_scattered_slots(disk):
    x = rows(6, 5000, 1)
    slots = [3, 4, 5, 9, 0, 15]
    disk.write(slots, x, keys=[bytes([i]) * 16 for i in range(6)])
    out = torch.empty(6, 5000, dtype=torch.uint8)
    disk.read(slots[::-1], out)
    assert torch.equal(out, x.flip(0))


def test_disk_header_records_key_and_checksum(disk):
    disk.write([2], rows(1, 5000), keys=[b"k" * 16], parents=[b"p" * 16])
    raw = os.pread(disk.fd, HEADER_BYTES, disk.header_offset + 2 * HEADER_BYTES)
    magic, _, kind, _, gen, key, parent, length, checksum = _HEADER.unpack(raw[:_HEADER.size])
    assert (magic, key, parent, length) == (MAGIC, b"k" * 16, b"p" * 16, 5000)
    assert gen >= 1 and checksum == int(disk._checksums[2])


def test_disk_detects_a_flipped_byte_and_names_only_that_slot(disk):
    x = rows(3, 5000, 2)
    disk.write([0, 1, 2], x)
    off = disk.data_offset + 1 * disk.stride + 1234
    b = os.pread(disk.fd, 1, off)
    os.pwrite(disk.fd, bytes([b[0] ^ 0x40]), off)
    out = torch.empty(3, 5000, dtype=torch.uint8)
    with pytest.raises(CorruptSlotError) as info:
        disk.read([0, 1, 2], out)
    assert info.value.slots == [1]
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])


class ShortReads(FileOps):
    def preadv(self, fd, buffers, offset):
        return max(0, super().preadv(fd, buffers, offset) - 1)


class CountingSync(FileOps):
    def __init__(self):
        self.syncs = 0

    def fdatasync(self, fd):
        self.syncs += 1
        super().fdatasync(fd)


class NoSpace(FileOps):
    def fallocate(self, fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_short_read_is_reported_as_corrupt(tmp_path):
    arena = DiskArena(tmp_path / "s", 4, 5000, file_ops=ShortReads())
    arena.write([0, 1], rows(2, 5000))
    with pytest.raises(CorruptSlotError) as info:
        arena.read([0, 1], torch.empty(2, 5000, dtype=torch.uint8))
    assert info.value.slots == [0, 1]
    arena.close()


@pytest.mark.parametrize("mode,expected", [("always", 3), ("never", 0)])
def test_fsync_policy(tmp_path, mode, expected):
    ops = CountingSync()
    arena = DiskArena(tmp_path / "s", 4, 5000, fsync=mode, file_ops=ops)
    for i in range(3):
        arena.write([i], rows(1, 5000, i))
    assert ops.syncs == expected
    arena.close()


def test_fsync_interval_uses_the_injected_clock(tmp_path):
    ops, now = CountingSync(), [0.0]
    arena = DiskArena(tmp_path / "s", 4, 5000, fsync="interval", fsync_interval_s=1.0,
                      file_ops=ops, clock=lambda: now[0])
    arena.write([0], rows(1, 5000))
    assert ops.syncs == 0
    now[0] = 1.5
    arena.write([1], rows(1, 5000))
    assert ops.syncs == 1
    arena.close()


def test_preallocation_failure_raises_and_closes(tmp_path):
    with pytest.raises(OSError, match="No space"):
        DiskArena(tmp_path / "s", 4, 5000, file_ops=NoSpace())


@pytest.mark.parametrize("width", [100, 4096, 9000])
def test_transfer_between_all_arena_pairs(tmp_path, width):
    mem_a = MemoryArena(10, width, device="cpu")
    mem_b = MemoryArena(10, width, device="cpu")
    disk = DiskArena(tmp_path / "s", 10, width)
    x = rows(5, width, width)
    mem_a.write([1, 5, 2, 8, 0], x)
    transfer(mem_a, [1, 5, 2, 8, 0], mem_b, [3, 4, 5, 6, 7])  # contiguous destination
    transfer(mem_b, [3, 4, 5, 6, 7], disk, [9, 1, 2, 3, 0])  # contiguous source, scattered dst
    transfer(disk, [9, 1, 2, 3, 0], mem_a, [0, 2, 9, 4, 6])  # scattered both
    out = torch.empty(5, width, dtype=torch.uint8)
    mem_a.read([0, 2, 9, 4, 6], out)
    assert torch.equal(out, x)
    disk.close()


def test_reopen_recovers_valid_slots_and_newest_generation(tmp_path):
    path = tmp_path / "slab"
    a = DiskArena(path, 8, 5000, persist=True)
    x = rows(4, 5000, 7)
    a.write([0, 1], x[:2], keys=[b"a" * 16, b"b" * 16], parents=[None, b"a" * 16])
    a.write([5], x[2:3], keys=[b"a" * 16])  # same key again, newer generation
    a.write([6], x[3:4], keys=[b"c" * 16])
    a.invalidate([6])  # freed: must not come back
    a.close()
    b = DiskArena(path, 8, 5000, persist=True)
    recs = {r.key: r for r in b.recovered}
    assert set(recs) == {b"a" * 16, b"b" * 16}
    assert recs[b"a" * 16].slot == 5 and recs[b"b" * 16].parent == b"a" * 16 and recs[b"a" * 16].parent is None
    out = torch.empty(2, 5000, dtype=torch.uint8)
    b.read([5, 1], out)
    assert torch.equal(out[0], x[2]) and torch.equal(out[1], x[1])
    b.close()


def test_reopen_drops_torn_headers_and_refuses_other_geometry(tmp_path):
    from allocator import SlabMismatchError

    path = tmp_path / "slab"
    a = DiskArena(path, 4, 5000, persist=True)
    a.write([0, 1], rows(2, 5000), keys=[b"a" * 16, b"b" * 16])
    off = a.header_offset + 1 * HEADER_BYTES + 20
    os.pwrite(a.fd, b"\xff", off)  # a torn header: its own checksum no longer matches
    a.close()
    b = DiskArena(path, 4, 5000, persist=True)
    assert [r.key for r in b.recovered] == [b"a" * 16]
    b.close()
    with pytest.raises(SlabMismatchError, match="geometry"):
        DiskArena(path, 4, 6000, persist=True)


def test_a_slab_is_never_shared_by_two_openers(tmp_path):
    from allocator import SlabInUseError

    a = DiskArena(tmp_path / "slab", 4, 5000, persist=True)
    with pytest.raises(SlabInUseError, match="in use"):
        DiskArena(tmp_path / "slab", 4, 5000, persist=True)
    a.close()
