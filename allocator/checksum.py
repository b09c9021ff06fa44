"""Checksums of slot payloads: xxh3-64 of a row's bytes in its logical (row-major) order.

One function for every place that needs them: a shared-memory arena records the checksum
of what its writer *meant* to store (computed from the writer's own private source, never
from the shared slot), and whoever copies a slot out verifies its private copy. A row may be
any strided view (a block of a ``[layers, 2, tokens, heads, dim]`` KV is ``layers * 2``
contiguous runs): the hash is streamed over the row's contiguous runs, so it equals the hash
of the same bytes laid out contiguously in a slot -- no copy is made to hash.

xxh3 runs at several times memcpy speed and releases the GIL. :func:`copy_digests` copies
rows and hashes each piece of a row right after copying it, while the piece is still in the
core's cache (pieces of :data:`PIECE_BYTES`), on every core at once: a put or a verified read
then costs about one copy, not a copy plus a hash pass over memory. :func:`digests_beside`
(hash a source beside an arbitrary copy) stays for the paths that copy with torch.

Complexity: O(bytes) plus O(contiguous runs) Python steps per call.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import itertools
import math
import os

import numpy as np
import torch
import xxhash


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (``taskset``, a cpuset, a
    container's ``--cpuset-cpus``), not the machine's count -- more copy threads than cores
    only take turns. O(1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


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


#: bytes copied per step of :func:`copy_digests`: each step's bytes are hashed right after
#: their copy, from the core's L2 (measured on a 2-core Xeon with 2 MiB L2 per core: 512 KiB
#: pieces gave 0.85x of a two-thread memcpy for copy+hash, whole 2 MiB blocks 0.73x)
PIECE_BYTES = 512 << 10


def as_u8(t: torch.Tensor) -> np.ndarray | None:
    """A CPU tensor as a uint8 numpy view of the same memory (its last dim times the
    itemsize), or None when that needs a copy (last dim not unit-stride, not on the CPU)."""
    if t.device.type != "cpu" or (t.dim() and t.stride(-1) != 1 and t.shape[-1] != 1):
        return None
    if t.dtype != torch.uint8:
        if t.dim() == 0:
            return None
        t = t.view(torch.uint8)
    return t.numpy()


def row_pieces(src: np.ndarray, dst: np.ndarray, piece_bytes: int = PIECE_BYTES) -> list[tuple[np.ndarray, np.ndarray]]:
    """One row (``src`` and ``dst``: the same shape, any strides) as pieces split along its
    first dimension, each at most ``piece_bytes`` (at least one sub-row), in logical order."""
    if src.shape != dst.shape:
        raise ValueError(f"rows differ in shape: {src.shape} vs {dst.shape}")
    if src.ndim == 0 or src.nbytes <= piece_bytes or src.shape[0] <= 1:
        return [(src, dst)]
    step = max(1, piece_bytes // max(1, src.nbytes // src.shape[0]))
    return [(src[i:i + step], dst[i:i + step]) for i in range(0, src.shape[0], step)]


def _contiguous_runs(a: np.ndarray):
    """``a``'s bytes as contiguous 1-D runs, in logical (row-major) order."""
    if a.flags.c_contiguous:
        yield a.reshape(-1)
        return
    k = _contiguous_from(a)
    if k == a.ndim:  # nothing contiguous beyond single elements
        yield np.ascontiguousarray(a).reshape(-1)
        return
    for idx in itertools.product(*map(range, a.shape[:k])):
        yield a[idx].reshape(-1)


def _copy_hash_row(pieces: list[tuple[np.ndarray, np.ndarray]], hash_dst: bool) -> int:
    h = xxhash.xxh3_64()
    for src, dst in pieces:
        np.copyto(dst, src)
        for run in _contiguous_runs(dst if hash_dst else src):
            h.update(run)
    return h.intdigest()


def copy_digests(jobs: list[list[tuple[np.ndarray, np.ndarray]]], *, hash_dst: bool,
                 pool: ThreadPoolExecutor | None = None, parts: int = 1) -> np.ndarray:
    """Copy rows piece by piece and hash each row while it is copied.

    ``jobs[i]`` is row ``i`` as ``(src, dst)`` pieces in the row's logical order (see
    :func:`row_pieces`); every piece is copied (``dst[...] = src``) and then hashed from the
    cache -- the source's bytes (``hash_dst=False``: a writer records what it *meant* to
    store) or the destination's (``hash_dst=True``: a reader verifies its private copy).
    Returns the xxh3-64 of each row, equal to :func:`digests` of the same bytes.

    Up to ``parts`` threads (the caller and ``parts - 1`` of ``pool``'s) take rows one at a
    time from a shared counter (numpy's copy and xxh3 release the GIL): on a machine whose
    cores are busy with other work, a helper thread that is not scheduled holds up at most
    the row it is copying, never a fixed share of the rows. O(bytes) + O(pieces) Python
    steps.
    """
    n = len(jobs)
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    taken = itertools.count()  # next() on it is atomic under the GIL

    def run() -> None:
        for i in taken:
            if i >= n:
                return
            out[i] = _copy_hash_row(jobs[i], hash_dst)

    helpers = max(0, min(parts, n) - 1) if pool is not None else 0
    futs = [pool.submit(run) for _ in range(helpers)] if helpers else []
    try:
        run()
    finally:
        for f in futs:
            f.result()
    return out


def to_wire(sums: np.ndarray) -> bytes:
    return sums.astype("<u8").tobytes()


def from_wire(data: bytes, n: int) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray)) or len(data) != 8 * n:
        raise ValueError(f"checksums must be {n} little-endian uint64 ({8 * n} bytes)")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)
