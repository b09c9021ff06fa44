"""An engine's paged KV pool as rows of blocks: validation and the copies in and out of it.

Engines keep KV in a pool of fixed-size blocks addressed by block id. The layouts are the
:class:`~kvstore.layout.PoolLayout` members (cross-layer, block-major per layer, head-major
per layer); that enum is the only place that knows their shapes. A pool comes as:

* a tensor ``[num_blocks, layers, 2, block_tokens, kv_heads, head_dim]`` (cross-layer, the
  store's block size): a pool block is laid out exactly like a store slot, one row;
* a list of ``layers`` tensors ``[2, num_blocks, block_tokens, kv_heads, head_dim]``
  (block-major, the store's block size);
* an :class:`EnginePool`: tensors plus their :class:`PoolLayout` and the engine's block size,
  which may be a multiple of the store's ``block_tokens`` (each pool block then holds
  ``split = block_size / block_tokens`` store blocks: store block ``i`` of a caller's id list
  is run ``i % split`` of pool block ``ids[i] // split`` -- ids are in store blocks, see
  :meth:`EnginePool.store_ids`).

"Rows" below is either a single ``[n, *block]`` tensor (the store's own
``[layers, 2, T, ...]`` output seen as blocks, a cross-layer pool, staging) or a
:class:`LayerRows` (strided K and V views per layer). The copies are
:func:`allocator.rowcopy.copy_rows`: O(bytes) plus O(runs) Python steps (times
``2 * layers * split`` for per-layer pools).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from allocator.rowcopy import copy_rows, gather, sync
from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout, PoolLayout


@dataclass(frozen=True)
class EnginePool:
    """An engine's pool with its layout said: ``tensors`` is one tensor (``CROSS_LAYER``) or
    one per layer, each as :meth:`PoolLayout.layer_shape` says; ``block_size`` is the
    engine's tokens per block, a multiple of the store's ``block_tokens``."""

    tensors: Any
    layout: PoolLayout
    block_size: int

    def store_ids(self, engine_ids: Sequence[int], block_tokens: int) -> list[int]:
        """Engine block ids as the store-block ids :func:`pool_rows` numbers: engine block
        ``b`` holds store blocks ``b * split ... b * split + split - 1``. O(len * split)."""
        split = self.block_size // block_tokens
        return [b * split + j for b in engine_ids for j in range(split)]


class LayerRows(list):
    """Strided views ``[num_blocks, split, block_tokens, kv_heads, head_dim]`` of a pool, in
    order (layer 0 K, layer 0 V, layer 1 K, ...): entry ``2 * l + kv`` is layer ``l``'s K or V.
    Row ``i`` (in store blocks) is ``view[i // split, i % split]``."""

    split: int = 1

    def parts(self):
        """``(layer, kv, view)`` for every view."""
        return ((i // 2, i % 2, r) for i, r in enumerate(self))


Rows = Union[torch.Tensor, LayerRows]


def _layer_rows(views: list[torch.Tensor], split: int) -> LayerRows:
    rows = LayerRows(views)
    rows.split = split
    return rows


def pool_rows(layout: ModelLayout, block_tokens: int, pool: Any) -> tuple[Rows, int]:
    """Validate an engine's pool and return ``(rows, num_blocks)`` (``num_blocks`` counts
    store blocks). Raises :class:`InvalidInputError` naming what is wrong (type, dtype,
    shape, devices, block size). O(layers)."""
    if isinstance(pool, EnginePool):
        return _engine_rows(layout, block_tokens, pool)
    if isinstance(pool, torch.Tensor):
        return _engine_rows(layout, block_tokens, EnginePool(pool, PoolLayout.CROSS_LAYER, block_tokens))
    if not isinstance(pool, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in pool):
        raise InvalidInputError("pool must be a tensor [num_blocks, layers, 2, block_tokens, kv_heads, head_dim], "
                                f"a list of {layout.num_layers} tensors [2, num_blocks, block_tokens, kv_heads, "
                                f"head_dim] or an EnginePool, got {type(pool).__name__}")
    return _engine_rows(layout, block_tokens, EnginePool(list(pool), PoolLayout.BLOCK_MAJOR, block_tokens))


def _engine_rows(layout: ModelLayout, block_tokens: int, pool: EnginePool) -> tuple[Rows, int]:
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    kind, bs = PoolLayout(pool.layout), pool.block_size
    if not isinstance(bs, int) or bs <= 0 or bs % block_tokens:
        raise InvalidInputError(f"the engine's block size ({bs!r}) must be a positive multiple of the store's "
                                f"block_tokens ({block_tokens})")
    split = bs // block_tokens
    if not kind.per_layer:
        t = pool.tensors
        block = layout.block_shape(bs)
        if not isinstance(t, torch.Tensor) or t.dim() != 6 or tuple(t.shape[1:]) != block:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInputError(f"a cross-layer pool must be [num_blocks, {', '.join(map(str, block))}] "
                                    f"{kind.shape_doc()}, got {got}")
        _check_dtype(layout, t, "pool")
        if split == 1:
            return t, t.shape[0]
        n = t.shape[0]
        return _layer_rows([t[:, l, kv].view(n, split, block_tokens, H, D) for l in range(L) for kv in (0, 1)],
                           split), n * split
    tensors = pool.tensors
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in tensors):
        raise InvalidInputError(f"a {kind.value} pool is a list of {L} tensors {kind.shape_doc()}, "
                                f"got {type(tensors).__name__}")
    if len(tensors) != L:
        raise InvalidInputError(f"a per-layer pool needs one tensor per layer ({L}), got {len(tensors)}")
    nblocks = kind.num_blocks(tensors[0]) if tensors[0].dim() >= 2 else -1
    want = kind.layer_shape(max(nblocks, 0), bs, H, D)
    for i, p in enumerate(tensors):
        if tuple(p.shape) != want:
            raise InvalidInputError(f"pool[{i}] must be {list(want)} {kind.shape_doc()}, got {tuple(p.shape)}")
        _check_dtype(layout, p, f"pool[{i}]")
        if p.device != tensors[0].device:
            raise InvalidInputError(f"pool[{i}] is on {p.device}, pool[0] on {tensors[0].device}: one device please")
    return _layer_rows([kind.kv_rows(p, kv, split) for p in tensors for kv in (0, 1)], split), nblocks * split


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


def _by_run(split: int, store_idx: Sequence[int], other_idx: Sequence[int]):
    """``(j, pool_rows, other_rows)`` per run index ``j``: the store rows that are run ``j``
    of their pool block, as pool-block indices, beside the matching other-side indices."""
    if split == 1:
        yield 0, store_idx, other_idx
        return
    for j in range(split):
        pos = [p for p, i in enumerate(store_idx) if i % split == j]
        if pos:
            yield j, [store_idx[p] // split for p in pos], [other_idx[p] for p in pos]


def place(src: torch.Tensor, src_idx: Sequence[int], rows: Rows, dst_idx: Sequence[int]) -> None:
    """``rows[dst_idx[i]] = src[src_idx[i]]`` where ``src`` is ``[n, *block]`` rows (slots).

    Per-layer rows: whole slots first cross to the pool's device (one DMA per run of
    slots), then one copy per layer, K/V and run of the pool block on that device."""
    if not len(src_idx):
        return
    if not isinstance(rows, LayerRows):
        copy_rows(src, src_idx, rows, dst_idx)
        return
    dev = device_of(rows)
    if src.device != dev:
        src, src_idx = gather(src, src_idx, dev), range(len(src_idx))
    for j, pool_idx, s_idx in _by_run(rows.split, list(dst_idx), list(src_idx)):
        for layer, kv, r in rows.parts():
            copy_rows(src[:, layer, kv], s_idx, r[:, j], pool_idx)


def place_out(rows: Rows, src_idx: Sequence[int], dst: torch.Tensor, dst_idx: Sequence[int]) -> None:
    """``dst[dst_idx[i]] = rows[src_idx[i]]``: pool blocks into ``[n, *block]`` rows (slots).

    Same device: straight from the pool (one copy per layer, K/V and run for a per-layer
    pool). Across devices the blocks are assembled on the pool's device first and cross as
    whole runs. Returns once the bytes are in (the caller may reuse its pool blocks)."""
    if not len(src_idx):
        return
    if device_of(rows) != dst.device:
        copy_rows(take(rows, src_idx), range(len(src_idx)), dst, dst_idx)
    elif not isinstance(rows, LayerRows):
        copy_rows(rows, src_idx, dst, dst_idx)
    else:
        for j, pool_idx, d_idx in _by_run(rows.split, list(src_idx), list(dst_idx)):
            for layer, kv, r in rows.parts():
                copy_rows(r[:, j], pool_idx, dst[:, layer, kv], d_idx)
    wait(rows)
    sync(dst)


def take(rows: Rows, idx: Sequence[int]) -> torch.Tensor:
    """``rows[idx]`` as a new ``[len(idx), *block]`` tensor on the rows' device. O(bytes)."""
    if not isinstance(rows, LayerRows):
        return gather(rows, idx)
    r0 = rows[0]
    out = torch.empty((len(idx), len(rows) // 2, 2, *r0.shape[2:]), dtype=r0.dtype, device=r0.device)
    for j, pool_idx, o_idx in _by_run(rows.split, list(idx), list(range(len(idx)))):
        for layer, kv, r in rows.parts():
            copy_rows(r[:, j], pool_idx, out[:, layer, kv], o_idx)
    return out


def wait(rows: Rows) -> None:
    """Wait until copies into or out of ``rows`` are done (CUDA); a no-op on CPU."""
    sync(*(rows if isinstance(rows, LayerRows) else [rows]))
