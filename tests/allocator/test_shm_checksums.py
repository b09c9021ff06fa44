"""Shared arenas keep their writers' checksums: a slot changed behind the arena's back is
reported (read, move to memory, write-through to disk), never passed on as data."""

from __future__ import annotations

import pytest
import torch

from allocator import CorruptSlotError, DiskArena, MemoryArena, transfer
from allocator.checksum import digests
from allocator.disk import KIND_KV
from allocator.shm import ShmArena

SLOT = 4096 + 64  # not a page multiple: rows straddle pages


def rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SLOT), generator=g, dtype=torch.uint8)


@pytest.fixture
def shm(tmp_path):
    a = ShmArena(8, SLOT, directory=tmp_path)
    yield a
    a.close()


def test_write_then_read_is_exact_and_a_scribble_is_reported(shm, rng):
    src = rows(4, rng.randrange(1 << 30))
    shm.write([1, 2, 5, 6], src)
    out = torch.empty_like(src)
    shm.read([1, 2, 5, 6], out)
    assert torch.equal(out, src)
    shm.data[5, 100] ^= 0xFF  # another process of our uid writes into the mapping
    with pytest.raises(CorruptSlotError) as err:
        shm.read([1, 2, 5, 6], out)
    assert err.value.slots == [5]
    assert shm.verify([1, 2, 5, 6]) == [5]


def test_checksums_come_from_the_source_not_the_slot(shm):
    src = rows(2, 3)
    shm.write([0, 1], src)
    assert list(shm.checksums[[0, 1]]) == list(digests(src))
    strided = rows(6, 4)[::3]  # a non-contiguous source hashes like its contiguous copy
    shm.write([2, 3], strided)
    assert list(shm.checksums[[2, 3]]) == list(digests(strided.contiguous()))


def test_a_move_to_disk_leaves_a_scribbled_row_unwritten(shm, tmp_path):
    src = rows(3, 5)
    shm.write([0, 1, 2], src)
    shm.data[1].zero_()
    disk = DiskArena(tmp_path / "s.slab", 4, SLOT, persist=True)
    with pytest.raises(CorruptSlotError) as err:
        transfer(shm, [0, 1, 2], disk, [0, 1, 2], keys=[b"a" * 16, b"b" * 16, b"c" * 16])
    assert err.value.slots == [1]  # named by the source slot
    disk.close()
    disk = DiskArena(tmp_path / "s.slab", 4, SLOT, persist=True)
    assert sorted(r.key for r in disk.recovered if r.kind == KIND_KV) == [b"a" * 16, b"c" * 16]
    out = torch.empty((2, SLOT), dtype=torch.uint8)
    disk.read([0, 2], out)
    assert torch.equal(out, src[[0, 2]])
    disk.close()


def test_moves_between_memory_arenas_carry_or_check_the_checksums(shm, tmp_path):
    src = rows(2, 6)
    shm.write([0, 1], src)
    other = ShmArena(4, SLOT, directory=tmp_path)
    try:
        shm.data[1, 7] ^= 1
        transfer(shm, [0, 1], other, [2, 3])  # shared -> shared: the writer's checksums travel
        out = torch.empty((1, SLOT), dtype=torch.uint8)
        other.read([2], out)
        assert torch.equal(out[0], src[0])
        with pytest.raises(CorruptSlotError):
            other.read([3], out)
        private = MemoryArena(4, SLOT, device="cpu")
        with pytest.raises(CorruptSlotError) as err:  # shared -> private: checked on the way
            transfer(shm, [0, 1], private, [0, 1])
        assert err.value.slots == [1]
        fresh = rows(2, 7)
        private.write([2, 3], fresh)
        transfer(private, [2, 3], other, [0, 1])  # private -> shared: checksums of what landed
        out2 = torch.empty((2, SLOT), dtype=torch.uint8)
        other.read([0, 1], out2)
        assert torch.equal(out2, fresh)
    finally:
        other.close()


def test_each_arena_has_its_own_identity_and_an_anonymous_name(tmp_path):
    a, b = ShmArena(1, SLOT, directory=tmp_path), ShmArena(1, SLOT, directory=tmp_path)
    try:
        assert a.ident != b.ident and a.describe()["ident"] == a.ident
        assert a.path != b.path and "ns" not in a.path.rsplit("/", 1)[1]
    finally:
        a.close()
        b.close()
