"""Batched copies of many slots between two arenas.

The side whose slots form consecutive runs is addressed as plain slices, so a move of
freshly allocated (hence consecutive) slots is a single pass over the bytes: an
``index_select`` straight into the destination rows for memory -> memory, one ``pwritev``
per run from the source rows for memory -> disk, one ``preadv`` straight into the arena for
disk -> memory. No per-block Python copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from allocator.arena import Arena
from allocator.disk import DiskArena, _runs
from allocator.memory import MemoryArena


def _wide(t: torch.Tensor) -> torch.Tensor:
    """View ``[n, bytes]`` uint8 rows as the widest integer type dividing the row: PyTorch's
    indexed copies move one element per step, so 8-byte elements are several times faster."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if t.shape[-1] % size == 0 and t.data_ptr() % size == 0:
            return t.view(dtype)
    return t


def _rows(arena: MemoryArena, slots: Sequence[int]) -> torch.Tensor:
    """The rows of ``slots``: a view when they are one run, else a gathered copy."""
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and len(_runs(slots)) == 1:
        return arena.data[slots[0]:slots[-1] + 1]
    return arena.gather(slots)


def transfer(src: Arena, src_slots: Sequence[int], dst: Arena, dst_slots: Sequence[int],
             keys: Sequence[bytes] | None = None, parents: Sequence[bytes | None] | None = None) -> None:
    """Copy ``src_slots[i]`` of ``src`` into ``dst_slots[i]`` of ``dst``. O(bytes).

    ``keys``/``parents`` name the blocks for a disk destination's slot headers."""
    if len(src_slots) != len(dst_slots):
        raise ValueError("transfer needs as many destination slots as source slots")
    if src.slot_bytes != dst.slot_bytes:
        raise ValueError(f"slot sizes differ: {src.slot_bytes} vs {dst.slot_bytes}")
    if not len(src_slots):
        return
    src_slots, dst_slots = list(src_slots), list(dst_slots)
    if isinstance(dst, DiskArena):
        if isinstance(src, MemoryArena):
            rows = _rows(src, src_slots)
        else:
            rows = torch.empty((len(src_slots), src.slot_bytes), dtype=torch.uint8)
            src.read(src_slots, rows)
        dst.write(dst_slots, rows.to("cpu"), keys=keys, parents=parents)
        return
    if not isinstance(dst, MemoryArena):
        raise TypeError(f"unsupported destination arena {type(dst).__name__}")
    dst_runs = _runs(dst_slots)
    if len(dst_runs) > max(1, len(dst_slots) // 8):
        # Scattered destination: one gather (a view when the source is one run), one scatter.
        if isinstance(src, MemoryArena):
            rows = _rows(src, src_slots)
        else:
            rows = torch.empty((len(src_slots), src.slot_bytes), dtype=torch.uint8)
            src.read(src_slots, rows)
        _wide(dst.data).index_copy_(0, torch.as_tensor(dst_slots, device=dst.device),
                                    _wide(rows.to(dst.device, non_blocking=True)))
    else:
        for start, end in dst_runs:
            out = dst.data[dst_slots[start]:dst_slots[end - 1] + 1]
            part = src_slots[start:end]
            if isinstance(src, MemoryArena):
                if src.device == dst.device:
                    torch.index_select(_wide(src.data), 0, torch.as_tensor(part, device=src.device), out=_wide(out))
                else:
                    out.copy_(_rows(src, part), non_blocking=True)
            elif dst.device.type == "cpu":
                src.read(part, out)
            else:
                staging = torch.empty(out.shape, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                src.read(part, staging)
                out.copy_(staging, non_blocking=True)
    if dst.device.type == "cuda" or getattr(src, "device", torch.device("cpu")).type == "cuda":
        torch.cuda.synchronize()
