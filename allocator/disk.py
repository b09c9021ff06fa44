"""The disk tier: one preallocated slab file of equal-size slots.

Layout of the file (all little-endian)::

    [superblock: 4 KiB, JSON]  [slot headers: 128 B each, padded to 4 KiB]  [payload slots]

Payload slots are ``stride`` apart (a multiple of 4 KiB for blocks of a page or more, so each
payload starts on a page boundary; 512 B for smaller ones). Each slot has a 128-byte header
(magic, payload kind, generation, 16-byte key and parent key, length, xxh3-64 payload
checksum, and a checksum of the header itself) written *after* its payload, so a torn write
leaves either the old valid header or a header whose checksum does not match the payload.
The checksum is kept in memory too and verified on every read: a block is returned exactly
as written or reported corrupt -- never silently wrong.

Identity: the superblock records the exact namespace (and owner) the slab belongs to, and
reopening it for another refuses (:class:`SlabIdentityError`): two names never share a slab.

Files: the slab is opened relative to its directory's fd with ``O_NOFOLLOW`` (a planted
symlink fails the open), must be a regular file with one link owned by us, and the
directory must be writable by this user only (:mod:`allocator.fileops`). Nothing outside
the directory is ever created, truncated or written.

Persistence (``persist=True``): the headers are the index. On open the arena reads them all
(one sequential read), keeps those whose own checksum and magic are valid, and resolves a
key found in several slots by the highest generation. A freed slot's header is zeroed, so a
cleared block does not come back after a restart. Torn payloads are caught by the payload
checksum on their first read and dropped. The file is ``flock``-ed: two processes never
share one slab.

I/O is batched: a batch's slots are sorted and cut into runs of consecutive slots, and
each run is one ``preadv``/``pwritev`` straight into or out of the caller's rows, wherever
those rows are (no per-block syscall, no intermediate copy; a scattered batch still reads
sequentially). Runs are cut into chunks that worker threads process, so the checksum of one
chunk overlaps the I/O of the next and scattered runs keep several requests in flight
(positioned I/O releases the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import errno
import fcntl
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
from allocator.fileops import FileOps, UnsafePathError, check_private_file, open_private_dir
from allocator.rowcopy import slot_runs

PAGE = 4096
HEADER_BYTES = 128
# magic, version, kind, flags, generation, key, parent key, length, payload checksum
_HEADER = struct.Struct("<4sHBBQ16s16sQQ")
_HEADER_CRC = struct.Struct("<Q")
MAGIC = b"KVSL"
SLAB_MAGIC = "kvstore-slab"
VERSION = 1
_IOV_MAX = 1024
_CHUNK_BYTES = 32 << 20

KIND_EMPTY, KIND_KV, KIND_ACT = 0, 1, 2
_NO_PARENT = b"\0" * 16


@dataclass(frozen=True)
class SlotRecord:
    """A valid slot header found when reopening a slab."""

    slot: int
    key: bytes
    parent: bytes | None
    kind: int
    generation: int
    checksum: int


class SlabInUseError(OSError):
    """Another process holds this slab file."""


class SlabMismatchError(ValueError):
    """An existing slab was made for another slot size or count."""


class SlabIdentityError(SlabMismatchError):
    """An existing slab belongs to another namespace or owner (``found`` says whose)."""

    def __init__(self, message: str, found: dict) -> None:
        super().__init__(message)
        self.found = found


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
                 clock=time.monotonic, io_threads: int = 4, persist: bool = False,
                 identity: dict | None = None, preallocate: bool = True) -> None:
        super().__init__(num_slots, slot_bytes)
        #: False: the file is sparse (its full size, no blocks reserved): disk is taken as slots
        #: are written, and a full file system surfaces as ENOSPC on a write (the store then
        #: degrades the tier) instead of at creation
        self.preallocate = preallocate
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
        self._generation = 0
        self._last_sync = clock()
        self._gen_lock = threading.Lock()
        self._pad = np.empty(self.stride - slot_bytes, dtype=np.uint8) if self.stride > slot_bytes else None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvstore-disk")
        self.recovered: list[SlotRecord] = []
        self._superblock = json.dumps({"magic": SLAB_MAGIC, "version": VERSION, "num_slots": num_slots,
                                       "slot_bytes": slot_bytes, "stride": self.stride,
                                       "header_bytes": HEADER_BYTES, "header_offset": self.header_offset,
                                       "data_offset": self.data_offset, **(identity or {})}).encode()
        self._identity = dict(identity or {})
        directory, name = os.path.split(os.path.abspath(self.path))
        dir_fd = open_private_dir(directory)
        try:
            self.fd = self.ops.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                    dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{self.path} is a symbolic link; refusing to follow it") from None
            raise
        finally:
            os.close(dir_fd)
        try:
            reopen = persist and check_private_file(self.fd, self.path).st_size > 0
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise SlabInUseError(exc.errno, f"slab {self.path} is in use by another process") from None
                raise
            if reopen:
                self._reopen()
            else:
                self._create()
        except BaseException:
            self.ops.close(self.fd)
            self._pool.shutdown(wait=False)
            raise

    def _grow(self) -> None:
        if self.preallocate:
            self.ops.fallocate(self.fd, 0, self.file_bytes)
        else:
            os.ftruncate(self.fd, self.file_bytes)

    def _create(self) -> None:
        os.ftruncate(self.fd, 0)
        self._grow()
        self.ops.pwrite(self.fd, self._superblock.ljust(PAGE, b"\0"), 0)

    def _reopen(self) -> None:
        raw = self.ops.pread(self.fd, PAGE, 0).rstrip(b"\0")
        try:
            found = json.loads(raw)
        except ValueError:
            raise SlabMismatchError(f"{self.path} is not a kvstore slab (bad superblock)") from None
        want = json.loads(self._superblock)
        ident = {k: found.get(k) for k in self._identity}
        if ident != self._identity or set(found) - set(want):
            raise SlabIdentityError(f"slab {self.path} belongs to {ident or found}, not to {self._identity}",
                                    {k: found.get(k) for k in found if k not in want or k in self._identity})
        if found != want:
            diff = {k: (found.get(k), v) for k, v in want.items() if found.get(k) != v}
            raise SlabMismatchError(f"slab {self.path} was made for another geometry {diff}; "
                                    "use another disk_path or delete the file")
        if self.ops.fstat_size(self.fd) < self.file_bytes:
            self._grow()  # truncated underneath us: grow back
        table = self.ops.pread(self.fd, self.num_slots * HEADER_BYTES, self.header_offset)
        table = table.ljust(self.num_slots * HEADER_BYTES, b"\0")
        best: dict[bytes, SlotRecord] = {}
        for slot in range(self.num_slots):
            h = table[slot * HEADER_BYTES:(slot + 1) * HEADER_BYTES]
            body, crc = h[:_HEADER.size], h[_HEADER.size:_HEADER.size + 8]
            if body[:4] != MAGIC or _HEADER_CRC.pack(xxhash.xxh3_64_intdigest(body)) != crc:
                continue
            _, _, kind, _, gen, key, parent, length, checksum = _HEADER.unpack(body)
            if kind == KIND_EMPTY or length != self.slot_bytes:
                continue
            rec = SlotRecord(slot, key, None if parent == _NO_PARENT else parent, kind, gen, checksum)
            old = best.get((key, kind))
            if old is None or gen > old.generation:
                best[(key, kind)] = rec
        self.recovered = sorted(best.values(), key=lambda r: r.generation)
        for rec in self.recovered:
            self._checksums[rec.slot] = rec.checksum
        self._generation = max((r.generation for r in self.recovered), default=0)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # -- chunking ----------------------------------------------------------------------
    def _chunks(self, slots: Sequence[int]) -> list[list[int]]:
        """Positions of ``slots`` grouped so that each group's slots are consecutive on disk.

        Positions are taken in slot order, so a batch of scattered slots still becomes
        sequential I/O (``preadv``/``pwritev`` gather from or scatter into any rows); groups
        are cut at ``_CHUNK_BYTES`` and the iovec limit. O(n log n).
        """
        per_chunk = max(1, min(_CHUNK_BYTES // self.stride, _IOV_MAX // 2))
        order = sorted(range(len(slots)), key=slots.__getitem__)
        chunks: list[list[int]] = []
        current = [order[0]]
        for p in order[1:]:
            if slots[p] == slots[current[-1]] + 1 and len(current) < per_chunk:
                current.append(p)
            else:
                chunks.append(current)
                current = [p]
        chunks.append(current)
        return chunks

    def _iov(self, rows: np.ndarray, positions: list[int]) -> list[memoryview]:
        bufs: list[memoryview] = []
        last = positions[-1]
        for p in positions:
            bufs.append(memoryview(rows[p]))
            if self._pad is not None and p != last:
                bufs.append(memoryview(self._pad))
        return bufs

    # -- write -------------------------------------------------------------------------
    def write(self, slots: Sequence[int], src: torch.Tensor, keys: Sequence[bytes] | None = None,
              kind: int = KIND_KV, parents: Sequence[bytes | None] | None = None,
              expect: Sequence[int] | None = None) -> None:
        """Write rows, then their headers, then sync per the fsync policy.

        ``expect``: the checksums the rows must have (a source arena's record, e.g. a shared
        slot a client could have written). Rows that differ get no header -- their slots
        stay empty -- and :class:`CorruptSlotError` names them after the others are written.
        The check is free: the checksum is computed for the header anyway."""
        self._check_batch(slots, src)
        if not len(slots):
            return
        rows = src.detach().to("cpu").contiguous().view(torch.uint8).reshape(len(slots), -1).numpy()
        slots = list(slots)
        sums = np.empty(len(slots), dtype=np.uint64)

        def do(chunk: list[int]) -> None:
            for p in chunk:
                sums[p] = xxhash.xxh3_64_intdigest(rows[p])
            bufs = self._iov(rows, chunk)
            want = sum(b.nbytes for b in bufs)
            offset = self.data_offset + slots[chunk[0]] * self.stride
            done = self.ops.pwritev(self.fd, bufs, offset)
            if done != want:
                raise OSError(f"short write to {self.path}: {done} of {want} bytes at offset {offset}")

        list(self._pool.map(do, self._chunks(slots)))
        bad = [] if expect is None else [i for i in range(len(slots)) if int(sums[i]) != int(expect[i])]
        bad_set = set(bad)
        with self._gen_lock:
            gen0 = self._generation + 1
            self._generation += len(slots)
        order = sorted(range(len(slots)), key=slots.__getitem__)
        headers = bytearray(HEADER_BYTES * len(slots))  # in slot order: runs are contiguous
        for j, i in enumerate(order):
            if bad and i in bad_set:
                continue  # a zero header: the slot stays empty
            key = keys[i] if keys is not None else b"\0" * 16
            parent = parents[i] if parents is not None and parents[i] is not None else _NO_PARENT
            h = _HEADER.pack(MAGIC, VERSION, kind, 0, gen0 + i, key.ljust(16, b"\0")[:16], parent,
                             self.slot_bytes, int(sums[i]))
            off = j * HEADER_BYTES
            headers[off:off + _HEADER.size] = h
            headers[off + _HEADER.size:off + _HEADER.size + 8] = _HEADER_CRC.pack(xxhash.xxh3_64_intdigest(h))
        mv = memoryview(headers)
        sorted_slots = [slots[i] for i in order]
        for start, end in slot_runs(sorted_slots):
            self.ops.pwrite(self.fd, mv[start * HEADER_BYTES:end * HEADER_BYTES],
                            self.header_offset + sorted_slots[start] * HEADER_BYTES)
        if bad:
            sums[bad] = 0
        self._checksums[slots] = sums
        self._maybe_sync()
        if bad:
            raise CorruptSlotError([slots[i] for i in bad], f"{len(bad)} row(s) written to {self.path} did not "
                                   "match their source's checksum; their slots were left empty")

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

        def do(chunk: list[int]) -> list[int]:
            bufs = self._iov(rows, chunk)
            want = sum(b.nbytes for b in bufs)
            done = self.ops.preadv(self.fd, bufs, self.data_offset + slots[chunk[0]] * self.stride)
            if done != want:
                return [slots[p] for p in chunk]
            return [slots[p] for p in chunk if xxhash.xxh3_64_intdigest(rows[p]) != int(expected[p])]

        for failed in self._pool.map(do, self._chunks(slots)):
            bad.extend(failed)
        if bad:
            raise CorruptSlotError(bad, f"{len(bad)} slot(s) of {self.path} failed their checksum: {bad[:8]}")

    def invalidate(self, slots: Sequence[int]) -> None:
        """Zero the headers of freed slots so a restart does not resurrect their blocks."""
        slots = sorted(slots)
        if not slots:
            return
        zero = bytes(HEADER_BYTES * len(slots))
        for start, end in slot_runs(slots):
            self.ops.pwrite(self.fd, zero[: (end - start) * HEADER_BYTES],
                            self.header_offset + slots[start] * HEADER_BYTES)
        self._checksums[slots] = 0
        self._maybe_sync()  # with fsync="always" a clear is as durable as a put

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
