"""Cross-device copies are waited for before anyone reads their destination (issue 26,
items 1 and 3), proven on CPU with a fake device whose copies land only at ``wait``
(``tests/delayed_copies.py``), and on CUDA where present."""

from __future__ import annotations

import pytest
import torch

from allocator import MemoryArena, transfer
from allocator.shm import ShmArena
from tests.delayed_copies import DelayedCopier


def _rows(n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, width), dtype=torch.uint8, generator=g)


def _pair(copier: DelayedCopier, slots: int, width: int, src_dev: str = "dev0"):
    """A fake-device arena (the device tier) and a host arena, both using ``copier``."""
    dev = MemoryArena(slots, width, device="cpu", copier=copier)
    copier.put_on(dev.data, src_dev)
    host = MemoryArena(slots, width, device="cpu", copier=copier)
    return dev, host


def test_device_to_host_into_scattered_host_slots_waits_before_the_scatter(rng, seed):
    """Item 1: the D2H copy lands in pinned staging, then the CPU scatters it into the host
    tier's free slots; the scatter must come after the wait (it came before on the old code)."""
    copier = DelayedCopier()
    dev, host = _pair(copier, 64, 256)
    data = _rows(64, 256, seed)
    dev.data.copy_(data)
    for _ in range(20):
        n = rng.randint(2, 24)
        src_slots = rng.sample(range(64), n)
        dst_slots = rng.sample(range(64), n)  # scattered: what a host tier that evicted looks like
        transfer(dev, src_slots, host, dst_slots)
        assert torch.equal(host.data[dst_slots], data[src_slots]), f"seed {seed}"
    assert copier.crossings > 0, "the device->host copy did not go through the copy primitive"
    assert copier.in_flight() == 0


def test_device_to_host_into_runs_of_host_slots(seed):
    copier = DelayedCopier()
    dev, host = _pair(copier, 32, 128)
    data = _rows(32, 128, seed)
    dev.data.copy_(data)
    transfer(dev, [5, 9, 1, 2], host, [10, 11, 12, 13])
    assert torch.equal(host.data[10:14], data[[5, 9, 1, 2]])
    assert copier.crossings > 0 and copier.in_flight() == 0


def test_host_to_device_scattered_and_runs(seed, rng):
    copier = DelayedCopier()
    dev, host = _pair(copier, 48, 64)
    data = _rows(48, 64, seed)
    host.data.copy_(data)
    for dst in (rng.sample(range(48), 20), list(range(3, 23))):
        src = rng.sample(range(48), 20)
        transfer(host, src, dev, dst)
        assert torch.equal(dev.data[dst], data[src])
    assert copier.crossings > 0 and copier.in_flight() == 0


def test_the_wait_names_the_arenas_device_not_the_current_one(seed):
    """Item 3: with the arena on (fake) ``dev1``, a wait on the thread's current device
    (``dev0``, what ``torch.cuda.synchronize()`` does) would leave the copy in flight."""
    copier = DelayedCopier()
    dev1, host = _pair(copier, 16, 64, src_dev="dev1")
    other = copier.put_on(torch.zeros(4, 64, dtype=torch.uint8), "dev0")  # the "current" device
    data = _rows(16, 64, seed)
    dev1.data.copy_(data)
    copier.wait(other)  # waiting on another device lands nothing of dev1
    transfer(dev1, [3, 1, 7, 0, 12], host, [9, 2, 14, 5, 0])
    assert torch.equal(host.data[[9, 2, 14, 5, 0]], data[[3, 1, 7, 0, 12]])
    assert "dev1" in copier.waits and copier.in_flight() == 0


def test_a_shared_host_arena_records_checksums_of_the_landed_bytes(tmp_path, seed):
    """Item 1 over shared memory: the checksum recorded for a demoted block is computed from
    the bytes that landed, so a reader's check verifies the right KV (not the poison)."""
    from allocator.checksum import digests

    copier = DelayedCopier()
    dev = MemoryArena(16, 128, device="cpu", copier=copier)
    copier.put_on(dev.data)
    shm = ShmArena(16, 128, directory=tmp_path)
    shm.copier = copier
    try:
        data = _rows(16, 128, seed)
        dev.data.copy_(data)
        src, dst = [4, 0, 9, 3, 11, 6], [15, 1, 7, 3, 12, 5]
        transfer(dev, src, shm, dst)
        assert torch.equal(shm.data[dst], data[src])
        assert list(shm.checksums[dst]) == list(digests(data[src]))
        assert copier.crossings > 0
    finally:
        shm.close()


@pytest.mark.cuda
def test_cuda_device_to_host_scattered_from_another_current_device(seed, rng):
    """On a GPU: demotion into scattered pinned host slots returns the bytes that were on the
    device, also when the calling thread's current device is another GPU."""
    n_dev = torch.cuda.device_count()
    target = torch.device(f"cuda:{n_dev - 1}")
    dev = MemoryArena(256, 64 << 10, device=target)
    host = MemoryArena(256, 64 << 10, device="cpu", pin=True)
    data = torch.randint(0, 256, (256, 64 << 10), dtype=torch.uint8, device=target)
    dev.data.copy_(data)
    with torch.cuda.device(0):
        for _ in range(10):
            src, dst = rng.sample(range(256), 100), rng.sample(range(256), 100)
            transfer(dev, src, host, dst)
            assert torch.equal(host.data[dst], data[src].cpu())
    host.close()
