"""The disk tier: one preallocated slab file of equal-size slots.

Layout of the file (all little-endian)::

    [superblock: 4 KiB, JSON]  [slot headers: 64 B each, padded to 4 KiB]  [payload slots]

Payload slots are ``stride`` apart (a multiple of 4 KiB for blocks of a page or more, so each
payload starts on a page boundary; 512 B for smaller ones). Each slot has a 64-byte header (magic, payload kind, generation, 16-byte key,
length, xxh3-64 payload checksum, header checksum) written *after* its payload, so a torn
write leaves either the old valid header or a header whose checksum does not match the
payload; the checksum is kept in memory too and verified on every read. A block is thus
returned exactly as written or reported corrupt -- never silently wrong.

I/O is batched: slots are sorted into runs of consecutive indices and each run is one
``preadv``/``pwritev`` straight into or out of the caller's rows (no per-block syscall, no
intermediate copy). Runs are cut into chunks that worker threads process, so the
checksum of one chunk overlaps the I/O of the next (positioned I/O and xxhash release the
GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
import json
import os
from pathlib import Path
import struct
import threading
import time

import numpy as np
import torch
import xxhash

from allocator.arena import Arena, CorruptSlotError
from allocator.fileops import FileOps

PAGE = 4096
HEADER_BYTES = 64
_HEADER = struct.Struct("<4sHBBQ16sQQ")  # magic, version, kind, flags, gen, key, length, checksum
_HEADER_CRC = struct.Struct("<Q")
MAGIC = b"KVSL"
SLAB_MAGIC = "kvstore-slab"
VERSION = 1
_IOV_MAX = 1024
_CHUNK_BYTES = 8 << 20

KIND_EMPTY, KIND_KV, KIND_ACT = 0, 1, 2


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def slot_stride(slot_bytes: int) -> int:
    """Distance between payload slots: page-aligned for blocks of a page or more; small
    blocks are only sector-aligned, so they do not waste most of a page each."""
    return round_up(slot_bytes, PAGE if slot_bytes >= PAGE else 512)


def slab_file_bytes(num_slots: int, slot_bytes: int) -> int:
    """Total file size for ``num_slots`` slots of ``slot_bytes``."""
    return PAGE + round_up(num_slots * HEADER_BYTES, PAGE) + num_slots * slot_stride(slot_bytes)


def slots_for_bytes(capacity_bytes: int, slot_bytes: int) -> int:
    """How many slots fit in a slab file of at most ``capacity_bytes``."""
    stride = slot_stride(slot_bytes)
    n = max(0, (capacity_bytes - PAGE) // (stride + HEADER_BYTES))
    while n > 0 and slab_file_bytes(n, slot_bytes) > capacity_bytes:
        n -= 1
    return n


def _runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Split positions ``0..len(slots)`` into ``(start, end)`` runs of consecutive slots."""
    runs = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


class DiskArena(Arena):
    """Slots in one preallocated file; see the module docstring for the format.

    ``fsync``: ``"always"`` -- every ``write`` returns only once its bytes and headers are
    durable (fdatasync); ``"interval"`` -- at most ``fsync_interval_s`` of writes can be lost
    on a power cut; ``"never"`` -- the OS decides (fastest; a process crash still loses
    nothing, a power cut may).

    Complexity: ``read``/``write`` O(bytes) with O(runs + bytes/8 MiB) syscalls.
    """

    kind = "disk"

    def __init__(self, path: str | Path, num_slots: int, slot_bytes: int, *, fsync: str = "never",
                 fsync_interval_s: float = 1.0, file_ops: FileOps | None = None,
                 clock=time.monotonic, io_threads: int = 4) -> None:
        super().__init__(num_slots, slot_bytes)
        self.path = str(path)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.ops = file_ops or FileOps()
        self._clock = clock
        self.stride = slot_stride(slot_bytes)
        self.header_offset = PAGE
        self.data_offset = PAGE + round_up(num_slots * HEADER_BYTES, PAGE)
        self.file_bytes = slab_file_bytes(num_slots, slot_bytes)
        self._checksums = np.zeros(num_slots, dtype=np.uint64)
        self._lengths = np.zeros(num_slots, dtype=np.int64)
        self._generation = 0
        self._last_sync = clock()
        self._gen_lock = threading.Lock()
        self._pad = np.empty(self.stride - slot_bytes, dtype=np.uint8) if self.stride > slot_bytes else None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvstore-disk")
        self.fd = self.ops.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.ops.fallocate(self.fd, 0, self.file_bytes)
            superblock = json.dumps({"magic": SLAB_MAGIC, "version": VERSION, "num_slots": num_slots,
                                     "slot_bytes": slot_bytes, "stride": self.stride,
                                     "header_offset": self.header_offset,
                                     "data_offset": self.data_offset}).encode()
            self.ops.pwrite(self.fd, superblock.ljust(PAGE, b"\0"), 0)
        except BaseException:
            self.ops.close(self.fd)
            self._pool.shutdown(wait=False)
            raise

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # -- chunking ----------------------------------------------------------------------
    def _chunks(self, slots: Sequence[int]) -> list[tuple[int, int]]:
        """Runs of consecutive slots, cut to at most ``_CHUNK_BYTES`` and the iovec limit."""
        per_chunk = max(1, min(_CHUNK_BYTES // self.stride, _IOV_MAX // 2))
        chunks = []
        for start, end in _runs(slots):
            for s in range(start, end, per_chunk):
                chunks.append((s, min(end, s + per_chunk)))
        return chunks

    def _iov(self, rows: np.ndarray, start: int, end: int) -> list[memoryview]:
        bufs: list[memoryview] = []
        for i in range(start, end):
            bufs.append(memoryview(rows[i]))
            if self._pad is not None and i + 1 < end:
                bufs.append(memoryview(self._pad))
        return bufs

    # -- write -------------------------------------------------------------------------
    def write(self, slots: Sequence[int], src: torch.Tensor, keys: Sequence[bytes] | None = None,
              kind: int = KIND_KV) -> None:
        """Write rows, then their headers, then sync per the fsync policy."""
        self._check_batch(slots, src)
        if not len(slots):
            return
        rows = src.detach().to("cpu").contiguous().view(torch.uint8).reshape(len(slots), -1).numpy()
        slots = list(slots)
        sums = np.empty(len(slots), dtype=np.uint64)

        def do(chunk: tuple[int, int]) -> None:
            start, end = chunk
            for i in range(start, end):
                sums[i] = xxhash.xxh3_64_intdigest(rows[i])
            bufs = self._iov(rows, start, end)
            want = sum(b.nbytes for b in bufs)
            offset = self.data_offset + slots[start] * self.stride
            done = self.ops.pwritev(self.fd, bufs, offset)
            if done != want:
                raise OSError(f"short write to {self.path}: {done} of {want} bytes at offset {offset}")

        list(self._pool.map(do, self._chunks(slots)))
        with self._gen_lock:
            gen0 = self._generation + 1
            self._generation += len(slots)
        headers = bytearray(HEADER_BYTES * len(slots))
        for i, slot in enumerate(slots):
            key = keys[i] if keys is not None else b"\0" * 16
            h = _HEADER.pack(MAGIC, VERSION, kind, 0, gen0 + i, key.ljust(16, b"\0")[:16],
                             self.slot_bytes, int(sums[i]))
            off = i * HEADER_BYTES
            headers[off:off + _HEADER.size] = h
            headers[off + _HEADER.size:off + _HEADER.size + 8] = _HEADER_CRC.pack(xxhash.xxh3_64_intdigest(h))
        mv = memoryview(headers)
        for start, end in _runs(slots):
            self.ops.pwrite(self.fd, mv[start * HEADER_BYTES:end * HEADER_BYTES],
                            self.header_offset + slots[start] * HEADER_BYTES)
        self._checksums[slots] = sums
        self._lengths[slots] = self.slot_bytes
        self._maybe_sync()

    def _maybe_sync(self) -> None:
        if self.fsync == "always":
            self.ops.fdatasync(self.fd)
        elif self.fsync == "interval":
            now = self._clock()
            if now - self._last_sync >= self.fsync_interval_s:
                self.ops.fdatasync(self.fd)
                self._last_sync = now

    def sync(self) -> None:
        self.ops.fdatasync(self.fd)
        self._last_sync = self._clock()

    # -- read --------------------------------------------------------------------------
    def read(self, slots: Sequence[int], out: torch.Tensor) -> None:
        """Read rows straight into ``out`` (CPU, contiguous); verify every checksum.

        Raises :class:`CorruptSlotError` naming every slot whose bytes do not match (the
        other rows of ``out`` are valid).
        """
        self._check_batch(slots, out)
        if not len(slots):
            return
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("DiskArena.read needs a contiguous CPU tensor")
        rows = out.view(torch.uint8).reshape(len(slots), -1).numpy()
        slots = list(slots)
        expected = self._checksums[slots]
        bad: list[int] = []

        def do(chunk: tuple[int, int]) -> list[int]:
            start, end = chunk
            bufs = self._iov(rows, start, end)
            want = sum(b.nbytes for b in bufs)
            done = self.ops.preadv(self.fd, bufs, self.data_offset + slots[start] * self.stride)
            if done != want:
                return list(slots[start:end])
            return [slots[i] for i in range(start, end)
                    if xxhash.xxh3_64_intdigest(rows[i]) != int(expected[i])]

        for failed in self._pool.map(do, self._chunks(slots)):
            bad.extend(failed)
        if bad:
            raise CorruptSlotError(bad, f"{len(bad)} slot(s) of {self.path} failed their checksum: {bad[:8]}")

    def drop_page_cache(self) -> None:
        """Flush and drop this file's pages from the OS cache (cold reads for benchmarks)."""
        self.ops.fdatasync(self.fd)
        self.ops.drop_cache(self.fd)

    def close(self) -> None:
        if self.fd < 0:
            return
        self._pool.shutdown(wait=True)
        try:
            if self.fsync != "never":
                self.ops.fdatasync(self.fd)
        finally:
            self.ops.close(self.fd)
            self.fd = -1
