"""Batched copies of many slots between two arenas.

The side whose slots form consecutive runs is addressed as plain slices, so a move of
freshly allocated (hence consecutive) slots is a single pass over the bytes: an
``index_select`` straight into the destination rows for memory -> memory, one ``pwritev``
per run from the source rows for memory -> disk, one ``preadv`` straight into the arena for
disk -> memory. No per-block Python copy.

Copies between devices go through the arenas' :class:`allocator.rowcopy.Copier` and are
waited for on the arenas' own devices before any host-side read of a destination.
"""

from __future__ import annotations

from collections.abc import Sequence
import threading

import torch

import numpy as np

from allocator.arena import Arena, CorruptSlotError
from allocator.checksum import digests
from allocator.codec_arena import CodecArena, same_encoding
from allocator.disk import DiskArena
from allocator.memory import MemoryArena
from allocator.rowcopy import DEFAULT_COPIER, Copier, slot_runs


def _wide(t: torch.Tensor) -> torch.Tensor:
    """View ``[n, bytes]`` uint8 rows as the widest integer type dividing the row: PyTorch's
    indexed copies move one element per step, so 8-byte elements are several times faster."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if t.shape[-1] % size == 0 and t.data_ptr() % size == 0:
            return t.view(dtype)
    return t


_PARALLEL_BYTES = 16 << 20


def _split(n: int, nbytes: int, device: torch.device, fn) -> None:
    """Run ``fn(lo, hi)`` over ``[0, n)``, split across threads for large CPU batches:
    PyTorch parallelises indexed copies over index entries with a grain that leaves a few
    large rows to one core (0.7x of memcpy at 256 KiB - 1 MiB rows on 2 cores)."""
    parts = min(torch.get_num_threads(), n)
    if device.type != "cpu" or parts < 2 or nbytes < _PARALLEL_BYTES:
        fn(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    errors: list[BaseException] = []

    def part(i: int) -> None:
        try:
            fn(bounds[i], bounds[i + 1])
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=part, args=(i,), name="kvstore-copy") for i in range(1, parts)]
    for t in threads:
        t.start()
    part(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _index_select(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """``torch.index_select(src, 0, idx, out=out)``, threaded for large batches (``_split``)."""
    _split(len(idx), out.numel() * out.element_size(), out.device,
           lambda lo, hi: torch.index_select(src, 0, idx[lo:hi], out=out[lo:hi]))


def _index_copy(dst: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst.index_copy_(0, idx, rows)``, threaded for large batches (distinct rows per thread)."""
    _split(len(idx), rows.numel() * rows.element_size(), dst.device,
           lambda lo, hi: dst.index_copy_(0, idx[lo:hi], rows[lo:hi]))


def _rows(arena: MemoryArena, slots: Sequence[int]) -> torch.Tensor:
    """The rows of ``slots``: a view when they are one run, else a gathered copy."""
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and len(slot_runs(slots)) == 1:
        return arena.data[slots[0]:slots[-1] + 1]
    return arena.gather(slots)


#: where host-bound copies go (``Copier.to``'s ``like``): an empty host tensor, never written
_HOST = torch.empty(0, dtype=torch.uint8)


def copier_of(*arenas: Arena) -> Copier:
    """The copy primitive of the first of ``arenas`` that was given one other than the
    default (a test double is injected into one arena of a pair), else the default."""
    for arena in arenas:
        c = getattr(arena, "copier", None)
        if c is not None and c is not DEFAULT_COPIER:
            return c
    return DEFAULT_COPIER


def transfer(src: Arena, src_slots: Sequence[int], dst: Arena, dst_slots: Sequence[int],
             keys: Sequence[bytes] | None = None, parents: Sequence[bytes | None] | None = None) -> None:
    """Copy ``src_slots[i]`` of ``src`` into ``dst_slots[i]`` of ``dst``. O(bytes).

    ``keys``/``parents`` name the blocks for a disk destination's slot headers.

    Checksummed arenas (shared memory, whose slots other processes can write): a copy
    carries the source's recorded checksums along (a row that was scribbled on stays
    detectable wherever it goes); a disk destination checks them against the checksum it
    computes anyway and leaves such rows unwritten; a destination without checksums is
    verified after the copy. Either way :class:`CorruptSlotError` names the *source* slots
    whose bytes failed (the other rows were moved)."""
    if len(src_slots) != len(dst_slots):
        raise ValueError("transfer needs as many destination slots as source slots")
    if src.slot_bytes != dst.slot_bytes:
        raise ValueError(f"slot sizes differ: {src.slot_bytes} vs {dst.slot_bytes}")
    if not len(src_slots):
        return
    src_slots, dst_slots = list(src_slots), list(dst_slots)
    if isinstance(src, CodecArena) or isinstance(dst, CodecArena):
        _transfer_coded(src, src_slots, dst, dst_slots, keys, parents)
        return
    src_sums: np.ndarray | None = getattr(src, "checksums", None)
    copier = copier_of(dst, src)
    if isinstance(dst, DiskArena):
        if isinstance(src, MemoryArena):
            rows = _rows(src, src_slots)
            host = copier.to(rows, _HOST)
            copier.wait(rows)  # a device->host copy lands before the disk write reads it
        else:
            host = torch.empty((len(src_slots), src.slot_bytes), dtype=torch.uint8)
            src.read(src_slots, host)
        expect = src_sums[src_slots] if src_sums is not None else None
        try:
            extra = {"expect": expect} if expect is not None else {}
            dst.write(dst_slots, host, keys=keys, parents=parents, **extra)
        except CorruptSlotError as exc:
            src_of = dict(zip(dst_slots, src_slots))
            raise CorruptSlotError([src_of[s] for s in exc.slots], str(exc)) from None
        return
    if not isinstance(dst, MemoryArena):
        raise TypeError(f"unsupported destination arena {type(dst).__name__}")
    src_data = src.data if isinstance(src, MemoryArena) else None
    dst_runs = slot_runs(dst_slots)
    if len(dst_runs) > max(1, len(dst_slots) // 8):
        # Scattered destination: one gather (a view when the source is one run), one copy
        # across when the devices differ, one scatter on the destination's device.
        if src_data is not None:
            rows = _rows(src, src_slots)
        else:
            rows = copier.empty((len(src_slots), src.slot_bytes), torch.uint8, _HOST, pinned=dst.device.type != "cpu")
            src.read(src_slots, rows)
        here = copier.to(rows, dst.data)
        if here is not rows and dst.device.type == "cpu":
            # device -> host: the scatter below reads the staging on the CPU, so the copy
            # must have landed first (torch returns before a non_blocking D2H copy is done)
            copier.wait(rows)
        _index_copy(_wide(dst.data), torch.as_tensor(dst_slots, device=dst.device), _wide(here))
    else:
        for start, end in dst_runs:
            out = dst.data[dst_slots[start]:dst_slots[end - 1] + 1]
            part = src_slots[start:end]
            if src_data is not None:
                if not copier.crosses(src_data, dst.data):
                    _index_select(_wide(src_data), torch.as_tensor(part, device=src.device), _wide(out))
                else:
                    copier.copy(out, _rows(src, part))
            elif dst.device.type == "cpu":
                src.read(part, out)
            else:
                staging = copier.empty(out.shape, torch.uint8, _HOST, pinned=True)
                src.read(part, staging)
                copier.copy(out, staging)
    # Wait on the devices the arenas live on (the streams the copies used), whatever the
    # calling thread's current device: the bytes are in before anyone reads them (the
    # checksums below, a reader of the slots) and before the source slots are reused.
    copier.wait(*(t for t in (src_data, dst.data) if t is not None))
    dst_sums: np.ndarray | None = getattr(dst, "checksums", None)
    if dst_sums is not None:
        if src_sums is not None:
            dst_sums[dst_slots] = src_sums[src_slots]
        else:  # a private source: these fresh slots hold what it held
            dst_sums[dst_slots] = digests(dst.data[dst_slots])
    elif src_sums is not None:
        got = digests(dst.data[dst_slots])
        bad = [s for s, g, want in zip(src_slots, got, src_sums[src_slots]) if int(g) != int(want)]
        if bad:
            raise CorruptSlotError(bad, f"{len(bad)} shared slot(s) failed their checksum while moved: {bad[:8]}")


def _transfer_coded(src: Arena, src_slots: list[int], dst: Arena, dst_slots: list[int],
                    keys: Sequence[bytes] | None, parents: Sequence[bytes | None] | None) -> None:
    """A copy where one side (or both) stores encoded blocks. Same encoding on both sides:
    the encoded rows move as they are (no decode). Otherwise decode into raw staging on the
    source's side and encode into the destination, chunk by chunk (bounded staging). Rows
    whose encoded bytes fail their check are not written; :class:`CorruptSlotError` names
    their source slots after the others moved. O(bytes)."""
    if same_encoding(src, dst):
        transfer(src.inner, src_slots, dst.inner, dst_slots, keys=keys, parents=parents)
        return
    coded = src if isinstance(src, CodecArena) else dst
    codec = coded.codec
    disk_dst = isinstance(dst, DiskArena) or (isinstance(dst, CodecArena) and dst.is_disk)
    per = max(1, (16 << 20) // codec.raw_bytes)
    bad: list[int] = []
    for lo in range(0, len(src_slots), per):
        part, dparts = src_slots[lo:lo + per], dst_slots[lo:lo + per]
        staging = torch.empty((len(part), *codec.block_shape), dtype=codec.dtype, device=src.device)
        failed: set[int] = set()
        try:
            src.read(part, staging)
        except CorruptSlotError as exc:
            failed = set(exc.slots)
            bad.extend(exc.slots)
        keep = [i for i, s in enumerate(part) if s not in failed]
        if not keep:
            continue
        rows = staging if len(keep) == len(part) else staging[keep]
        kw = {}
        if disk_dst:
            kw = {"keys": [keys[lo + i] for i in keep] if keys is not None else None,
                  "parents": [parents[lo + i] for i in keep] if parents is not None else None}
        dst.write([dparts[i] for i in keep], rows, **kw)  # a shared arena's write records its checksums
    if bad:
        raise CorruptSlotError(bad, f"{len(bad)} encoded slot(s) failed their checksum while moved: {bad[:8]}")
