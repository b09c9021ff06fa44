"""An engine's paged KV pool as rows of blocks: validation and the copies in and out of it.

Engines keep KV in a pool of fixed-size blocks addressed by block id, in one of two layouts:

* **cross-layer** -- one tensor ``[num_blocks, layers, 2, block_tokens, kv_heads, head_dim]``:
  a pool block is laid out exactly like a store slot, so a block crosses as one row;
* **per layer** -- a list of ``layers`` tensors ``[2, num_blocks, block_tokens, kv_heads,
  head_dim]`` (vLLM's FlashAttention layout): its K half and V half are each contiguous
  ``[num_blocks, block_tokens, kv_heads, head_dim]`` rows, so block ``b``'s layer ``l`` is row
  ``b`` of views ``(l, K)`` and ``(l, V)`` -- contiguous rows keep indexed copies fast.

"Rows" below is either a single ``[n, *block]`` tensor (the store's own
``[layers, 2, T, ...]`` output seen as blocks, a cross-layer pool, staging) or a
:class:`LayerRows` (K and V views per layer). The copies are
:func:`allocator.rowcopy.copy_rows`: O(bytes) plus O(runs) Python steps (times ``2 * layers``
for per-layer pools).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from allocator.rowcopy import copy_rows, gather, sync
from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout


class LayerRows(list):
    """Row views ``[num_blocks, block_tokens, kv_heads, head_dim]`` of a per-layer pool, in
    order (layer 0 K, layer 0 V, layer 1 K, ...): entry ``2 * l + kv`` is ``pool[l][kv]``."""

    def parts(self):
        """``(layer, kv, rows)`` for every view."""
        return ((i // 2, i % 2, r) for i, r in enumerate(self))


Rows = Union[torch.Tensor, LayerRows]


def pool_rows(layout: ModelLayout, block_tokens: int, pool: Any) -> tuple[Rows, int]:
    """Validate an engine's pool and return ``(rows, num_blocks)``. Raises
    :class:`InvalidInputError` naming what is wrong (type, dtype, shape, devices). O(layers)."""
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    block = (L, 2, block_tokens, H, D)
    if isinstance(pool, torch.Tensor):
        if pool.dim() != 6 or tuple(pool.shape[1:]) != block:
            raise InvalidInputError(f"a cross-layer pool must be [num_blocks, {', '.join(map(str, block))}] "
                                    f"[num_blocks, layers, 2, block_tokens, kv_heads, head_dim], got "
                                    f"{tuple(pool.shape)}")
        _check_dtype(layout, pool, "pool")
        return pool, pool.shape[0]
    if not isinstance(pool, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in pool):
        raise InvalidInputError("pool must be a tensor [num_blocks, layers, 2, block_tokens, kv_heads, head_dim] "
                                f"or a list of {L} tensors [2, num_blocks, block_tokens, kv_heads, head_dim], "
                                f"got {type(pool).__name__}")
    if len(pool) != L:
        raise InvalidInputError(f"a per-layer pool needs one tensor per layer ({L}), got {len(pool)}")
    nblocks = pool[0].shape[1] if pool[0].dim() == 5 else -1
    for i, p in enumerate(pool):
        if p.dim() != 5 or p.shape[0] != 2 or tuple(p.shape[2:]) != (block_tokens, H, D) or p.shape[1] != nblocks:
            raise InvalidInputError(f"pool[{i}] must be [2, {max(nblocks, 0) or 'num_blocks'}, {block_tokens}, {H}, {D}] "
                                    f"[2, num_blocks, block_tokens, kv_heads, head_dim], got {tuple(p.shape)}")
        _check_dtype(layout, p, f"pool[{i}]")
        if p.device != pool[0].device:
            raise InvalidInputError(f"pool[{i}] is on {p.device}, pool[0] on {pool[0].device}: one device please")
    return LayerRows(p[kv] for p in pool for kv in (0, 1)), nblocks


def _check_dtype(layout: ModelLayout, t: torch.Tensor, what: str) -> None:
    if t.dtype != layout.dtype:
        raise InvalidInputError(f"{what} dtype is {t.dtype}, the layout says {layout.dtype}")


def block_ids(ids: Any, count: int, num_blocks: int, *, spare: int = 0) -> list[int]:
    """``ids`` as distinct ints in ``[0, num_blocks)``: ``count`` of them, or up to ``spare``
    more (an engine's table may include the block of a partial tail, which is ignored).
    Returns the first ``count``. O(count)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
            raise InvalidInputError(f"block_ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        out = ids.tolist()
    else:
        try:
            arr = np.asarray(ids)
        except Exception:  # noqa: BLE001 -- anything not array-like is refused below
            arr = np.asarray([], dtype=object)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidInputError(f"block_ids must be a sequence of ints, got {type(ids).__name__}")
        out = arr.tolist()
    if not count <= len(out) <= count + spare:
        raise InvalidInputError(f"{len(out)} block ids for {count} blocks"
                                + (f" (at most {count + spare} with a partial tail)" if spare else ""))
    out = out[:count]
    bad = [b for b in out if not 0 <= b < num_blocks]
    if bad:
        raise InvalidInputError(f"block ids {bad[:4]} out of range for a pool of {num_blocks} blocks")
    if len(set(out)) != len(out):
        raise InvalidInputError("block_ids repeat a block: each block needs its own pool block")
    return out


def device_of(rows: Rows) -> torch.device:
    return rows[0].device if isinstance(rows, LayerRows) else rows.device


def place(src: torch.Tensor, src_idx: Sequence[int], rows: Rows, dst_idx: Sequence[int]) -> None:
    """``rows[dst_idx[i]] = src[src_idx[i]]`` where ``src`` is ``[n, *block]`` rows (slots).

    Per-layer rows: whole slots first cross to the pool's device (one DMA per run of
    slots), then one copy per layer and K/V on that device."""
    if not len(src_idx):
        return
    if not isinstance(rows, LayerRows):
        copy_rows(src, src_idx, rows, dst_idx)
        return
    dev = device_of(rows)
    if src.device != dev:
        src, src_idx = gather(src, src_idx, dev), range(len(src_idx))
    for layer, kv, r in rows.parts():
        copy_rows(src[:, layer, kv], src_idx, r, dst_idx)


def place_out(rows: Rows, src_idx: Sequence[int], dst: torch.Tensor, dst_idx: Sequence[int]) -> None:
    """``dst[dst_idx[i]] = rows[src_idx[i]]``: pool blocks into ``[n, *block]`` rows (slots).

    Same device: straight from the pool (one copy per layer and K/V for a per-layer pool). Across
    devices the blocks are assembled on the pool's device first and cross as whole runs.
    Returns once the bytes are in (the caller may reuse its pool blocks)."""
    if not len(src_idx):
        return
    if device_of(rows) != dst.device:
        copy_rows(take(rows, src_idx), range(len(src_idx)), dst, dst_idx)
    elif not isinstance(rows, LayerRows):
        copy_rows(rows, src_idx, dst, dst_idx)
    else:
        for layer, kv, r in rows.parts():
            copy_rows(r, src_idx, dst[:, layer, kv], dst_idx)
    wait(rows)
    sync(dst)


def take(rows: Rows, idx: Sequence[int]) -> torch.Tensor:
    """``rows[idx]`` as a new ``[len(idx), *block]`` tensor on the rows' device. O(bytes)."""
    if not isinstance(rows, LayerRows):
        return gather(rows, idx)
    r0 = rows[0]
    out = torch.empty((len(idx), len(rows) // 2, 2, *r0.shape[1:]), dtype=r0.dtype, device=r0.device)
    for layer, kv, r in rows.parts():
        copy_rows(r, idx, out[:, layer, kv], range(len(idx)))
    return out


def wait(rows: Rows) -> None:
    """Wait until copies into or out of ``rows`` are done (CUDA); a no-op on CPU."""
    sync(*(rows if isinstance(rows, LayerRows) else [rows]))
