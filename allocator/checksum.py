"""Checksums of slot payloads: xxh3-64 of a row's bytes in its logical (row-major) order.

One function for every place that needs them: a shared-memory arena records the checksum
of what its writer *meant* to store (computed from the writer's own private source, never
from the shared slot), and whoever copies a slot out verifies its private copy. A row may be
any strided view (a block of a ``[layers, 2, tokens, heads, dim]`` KV is ``layers * 2``
contiguous runs): the hash is streamed over the row's contiguous runs, so it equals the hash
of the same bytes laid out contiguously in a slot -- no copy is made to hash.

xxh3 runs at several times memcpy speed and releases the GIL, so :func:`digests_beside`
overlaps the hash of a source with the copy of it (the put path costs max(copy, hash),
not their sum, on two or more cores).

Complexity: O(bytes) plus O(contiguous runs) Python steps per call.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import itertools
import math

import numpy as np
import torch
import xxhash


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """``t`` (CPU) as a uint8 numpy array with the same layout (last dim times itemsize)."""
    if t.dtype != torch.uint8:
        if t.dim() == 0 or t.stride(-1) != 1:
            t = t.contiguous()
        t = t.view(torch.uint8)
    return t.numpy()


def _contiguous_from(a: np.ndarray) -> int:
    """The first dim ``k`` of ``a`` (one row) such that ``a[i0, ..., ik-1]`` is contiguous."""
    expected = a.itemsize
    for k in range(a.ndim - 1, -1, -1):
        if a.shape[k] != 1 and a.strides[k] != expected:
            return k + 1
        expected *= a.shape[k]
    return 0


def digests(rows: torch.Tensor) -> np.ndarray:
    """xxh3-64 of each ``rows[i]``'s bytes, as uint64 (``rows``: ``[n, ...]``, any strides)."""
    n = rows.shape[0]
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    t = rows.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    a = _as_bytes(t)
    k = _contiguous_from(a[0]) if a[0].ndim else 0
    if k == 0:
        for i in range(n):
            out[i] = xxhash.xxh3_64_intdigest(np.ascontiguousarray(a[i]) if not a[i].flags.c_contiguous else a[i])
        return out
    lead = a.shape[1:1 + k]
    for i in range(n):
        h = xxhash.xxh3_64()
        row = a[i]
        for idx in itertools.product(*map(range, lead)):
            h.update(row[idx])
        out[i] = h.intdigest()
    return out


def digests_beside(rows: torch.Tensor, work: Callable[[], None], pool: ThreadPoolExecutor,
                   parts: int = 1) -> np.ndarray:
    """Run ``work()`` (typically the copy of ``rows`` somewhere) while hashing ``rows`` on
    ``pool`` (the caller's), split in ``parts`` batches of rows (at most the pool's workers);
    returns the digests. Small batches are hashed inline. O(bytes)."""
    n = rows.shape[0]
    nbytes = math.prod(rows.shape) * rows.element_size()
    if nbytes < (1 << 20) or n == 0:
        sums = digests(rows)
        work()
        return sums
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    futs = [pool.submit(digests, rows[bounds[i]:bounds[i + 1]]) for i in range(parts)]
    try:
        work()
    finally:
        sums = np.concatenate([f.result() for f in futs])
    return sums


def to_wire(sums: np.ndarray) -> bytes:
    return sums.astype("<u8").tobytes()


def from_wire(data: bytes, n: int) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray)) or len(data) != 8 * n:
        raise ValueError(f"checksums must be {n} little-endian uint64 ({8 * n} bytes)")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)
