"""Fused verified copies between shared-memory slots and a *strided* CPU pool, a chunk at a time.

Where an engine's pool rows are not contiguous block rows (head-major layouts, or an engine
block holding several store blocks, as vLLM-CPU's head-major-packed pool does), a slot
cannot be verified in the pool: its checksum is over the slot's bytes in slot order. A read
therefore copies each slot into private bounce rows (hashing them right after the copy, from
the cache), checks them, and only then lays the verified rows out into the pool; a write
gathers pool rows into the bounce, hashes them there and copies them into the slots. Done
over the whole prefix at once that is two passes over memory (and a bounce as large as the
prefix). Here both steps run per *chunk* of a few blocks that fits in a core's cache
(:func:`chunk_blocks`), so the second step reads the bounce from the cache: about one pass
over memory. Chunks are spread over the calling thread and a pool's threads (numpy's copy
and xxh3 release the GIL), each thread with its own small bounce, reused across calls.

Guarantees kept from the whole-prefix bounce: a block is placed only once its whole copy
verified (a block larger than a chunk is a chunk of its own), so a block that fails is never
written into the pool at all; a save hashes exactly the bytes it copies into the slots.

Complexity: O(bytes) plus O(blocks * placements) Python steps, where a placement is one
strided copy per block (one per pool layer when its K and V halves sit a fixed distance apart,
one in all for a cross-layer pool, else one per layer and K/V).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import itertools

import numpy as np
from numpy.lib.stride_tricks import as_strided
import torch

from allocator.checksum import as_u8
from kvstore import paged

#: bytes of bounce per chunk: the chunk is written by the copy out of the slots, read by the
#: hash and read again by the re-layout into the pool, so it must stay in the core's cache
#: across the three, beside the slot and pool lines streaming through. 1 MiB is half the
#: 2 MiB L2 per core of the machines this was measured on (and the 512 KiB hash pieces of
#: :data:`allocator.checksum.PIECE_BYTES` fit twice); larger chunks spill into the shared L3,
#: smaller ones cost more Python steps per byte
CHUNK_BYTES = 1 << 20


def chunk_blocks(block_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many whole blocks of ``block_bytes`` one chunk holds: as many as fit in
    ``chunk_bytes``, at least one (a block larger than a chunk is verified whole before any
    of it is placed, so it is a chunk of its own). O(1)."""
    return max(1, chunk_bytes // max(1, block_bytes))


class StridedPool:
    """A CPU pool's :class:`~kvstore.paged.LayerRows` as placements: ``(index, view)`` pairs
    where ``bounce_row[index]`` (a slot-shaped uint8 row ``[layers, 2, bt, H, D * itemsize]``
    indexed by ``()``, ``(layer,)`` or ``(layer, kv)``) is what store block ``b`` holds at
    ``view[b // split, b % split]``. Views share the pool's memory (no copy); built once per
    call, O(layers)."""

    def __init__(self, rows: paged.LayerRows) -> None:
        self.split = rows.split
        views = [as_u8(r) for r in rows]
        if any(v is None for v in views):
            raise ValueError("a strided pool's rows must be CPU views with a unit-stride last dim")
        layers = len(rows) // 2
        merged = [self._merge(rows[2 * l], rows[2 * l + 1], views[2 * l]) for l in range(layers)]
        self.placements: list[tuple[tuple[int, ...], np.ndarray]]
        if all(m is not None for m in merged):
            whole = self._merge_layers(rows, merged)  # type: ignore[arg-type]
            self.placements = [((), whole)] if whole is not None else [((l,), m) for l, m in enumerate(merged)]
        else:
            self.placements = [((i // 2, i % 2), v) for i, v in enumerate(views)]

    @staticmethod
    def _merge(k: torch.Tensor, v: torch.Tensor, k_u8: np.ndarray) -> np.ndarray | None:
        """K and V of one layer as one view ``[n, split, 2, bt, H, Db]`` when V is K shifted by
        a fixed number of bytes in the same storage (every layout does that); else None."""
        if k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr() or k.stride() != v.stride():
            return None
        delta = v.data_ptr() - k.data_ptr()
        if delta <= 0:
            return None
        s = k_u8.strides
        return as_strided(k_u8, shape=(*k_u8.shape[:2], 2, *k_u8.shape[2:]), strides=(*s[:2], delta, *s[2:]))

    @staticmethod
    def _merge_layers(rows: paged.LayerRows, merged: list[np.ndarray]) -> np.ndarray | None:
        """Every layer as one view ``[n, split, L, 2, bt, H, Db]`` when the layers are one
        storage a fixed number of bytes apart (a cross-layer pool); else None."""
        if len(merged) < 2:
            return merged[0][:, :, None] if merged else None
        k0 = rows[0]
        if any(rows[2 * l].untyped_storage().data_ptr() != k0.untyped_storage().data_ptr()
               or merged[l].strides != merged[0].strides for l in range(len(merged))):
            return None
        step = rows[2].data_ptr() - k0.data_ptr()
        if step <= 0 or any(rows[2 * l].data_ptr() - k0.data_ptr() != l * step for l in range(len(merged))):
            return None
        m, s = merged[0], merged[0].strides
        return as_strided(m, shape=(*m.shape[:2], len(merged), *m.shape[2:]), strides=(*s[:2], step, *s[2:]))

    def put(self, row: np.ndarray, block: int) -> None:
        """Pool rows of store block ``block`` <- the slot-shaped ``row``. O(block bytes)."""
        q, j = divmod(block, self.split)
        for idx, view in self.placements:
            np.copyto(view[q, j], row[idx])

    def get(self, block: int, row: np.ndarray) -> None:
        """The slot-shaped ``row`` <- pool rows of store block ``block``. O(block bytes)."""
        q, j = divmod(block, self.split)
        for idx, view in self.placements:
            np.copyto(row[idx], view[q, j])


def run_chunks(n: int, work: Callable[[int], None], pool: ThreadPoolExecutor | None, parts: int) -> None:
    """``work(c)`` for every chunk ``c < n``, on the calling thread and up to ``parts - 1`` of
    ``pool``'s, each taking the next chunk from a shared counter (a thread the OS does not
    schedule holds up at most its current chunk). Re-raises the first error. O(n) steps."""
    if n <= 0:
        return
    taken = itertools.count()  # next() on it is atomic under the GIL

    def run() -> None:
        for c in taken:
            if c >= n:
                return
            work(c)

    helpers = max(0, min(parts, n) - 1) if pool is not None else 0
    futs = [pool.submit(run) for _ in range(helpers)] if helpers else []  # type: ignore[union-attr]
    try:
        run()
    finally:
        for f in futs:
            f.result()


def chunks_of(n: int, per_chunk: int) -> list[range]:
    """``range(n)`` cut into consecutive chunks of ``per_chunk`` (the last may be shorter)."""
    return [range(i, min(i + per_chunk, n)) for i in range(0, n, per_chunk)]
