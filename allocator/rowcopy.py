"""Copies of many rows between any two row-indexed tensors, on one device or across a link.

The one primitive under every read and write of the data path: ``dst[dst_idx[i]] =
src[src_idx[i]]``. Rows are the first dimension; either side may be a strided *view* (an
engine's KV tensor seen as rows of blocks, one layer of a paged pool, an arena's slots), so
a re-layout costs no extra pass: the copy writes straight into the caller's layout.

How it moves the bytes (no Python step per byte, none per block when the rows run):

* **same device, few runs** -- where source and destination indices are both consecutive,
  one strided ``copy_`` per run (a single pass over the bytes, no index tensor);
* **same device, many short runs** -- one indexed pass (``index_copy_`` from a run of
  source rows, ``index_select`` into a contiguous run of destination rows), or, when both
  sides are scattered, an ``index_select`` into staging and an ``index_copy_`` (two passes,
  a fixed number of Python steps). Elements are widened to 8 bytes where the layout allows;
* **CPU -> CUDA** -- runs of whole source rows cross by DMA (``copy_(non_blocking=True)``,
  asynchronous from pinned memory) into device staging, and the re-layout happens on the
  device; **CUDA -> CPU** -- the rows are laid out contiguously on the device first, then one
  copy crosses the link.

Copies are queued on the current CUDA stream; a caller that hands pinned *source* rows back
to others (unpins slots) must synchronise that stream first (:func:`sync`).

**Every copy that crosses between host and a device goes through a** :class:`Copier`
(``copier.copy`` / ``copier.to`` / ``copier.wait``): torch's ``non_blocking`` copies return
before the bytes land (a pinned host destination of a device->host copy holds garbage until
the copy stream is synchronised), so whoever *reads* such a destination on the host must call
``copier.wait`` on the tensors' devices first. The one primitive makes that ordering testable
without a GPU: a test double (``tests/delayed_copies.py``) models a device whose copies
land only when ``wait`` names it, so any reader that runs before the wait sees poison.

Complexity: O(bytes) moved plus O(runs) Python steps, capped at O(1) per call by the
staging path when runs are short.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: when both sides are scattered, runs at least this long are copied one call each (one
#: pass) rather than gathered into staging and scattered (two passes)
_RUN_BYTES = 256 << 10
#: up to this many runs, one strided copy per run; beyond, one indexed copy where the layout
#: allows: every copy call is a fork/join of the intra-op threads, which on a busy machine
#: costs a scheduling quantum each (measured: 32 per-block copies of 4 MiB at 0.05-0.5x of
#: one memcpy when the cores were oversubscribed, one index_copy_ near 1x)
_FEW_RUNS = 8


def pair_runs(src_idx: Sequence[int], dst_idx: Sequence[int]) -> list[tuple[int, int]]:
    """``(i0, i1)`` position ranges where both index lists advance by one. O(len)."""
    out, start, n = [], 0, len(src_idx)
    for i in range(1, n + 1):
        if i == n or src_idx[i] != src_idx[i - 1] + 1 or dst_idx[i] != dst_idx[i - 1] + 1:
            out.append((start, i))
            start = i
    return out


def slot_runs(idx: Sequence[int]) -> list[tuple[int, int]]:
    """``(i0, i1)`` position ranges where ``idx`` advances by one: runs of consecutive slots
    (or blocks), each one slice on that side. The one grouping every batched move uses
    (disk I/O, transfers, restores, replies). O(len)."""
    return pair_runs(idx, idx)


def _row_bytes(t: torch.Tensor) -> int:
    return (t[0].numel() if t.shape[0] else 0) * t.element_size()


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """Contiguous rows as ``[rows, row_bytes / w]`` of the widest integer type dividing the
    row (indexed copies move one element per step); None when ``t`` is not contiguous."""
    if not t.is_contiguous():
        return None
    rows = t.reshape(t.shape[0], -1).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if rows.shape[1] % size == 0 and rows.data_ptr() % size == 0:
            return rows.view(dtype)
    return rows


class Copier:
    """The one primitive for copies between host memory and a CUDA device (see module doc).

    ``copy``/``to`` may return before the bytes land (torch ``non_blocking`` semantics);
    ``wait(*tensors)`` blocks the host until every copy queued on the current stream of
    each CUDA device among ``tensors`` has completed -- it names those devices, so it works
    from any thread whatever its current device (``torch.cuda.synchronize()`` without a
    device would wait on the thread's current device instead), and it waits on the streams
    the copies used, not the whole device (an engine's kernels and NCCL on other streams
    are not waited for). All O(bytes) on the link, O(1) Python steps per call.

    Injectable: arenas, ``transfer``, the restore executor and the clients take a copier; a
    test double that delays every crossing copy until ``wait`` proves the ordering on CPU.
    """

    def crosses(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """True when a copy between ``a`` and ``b`` crosses between devices (may be async)."""
        return a.device != b.device

    def empty(self, shape: Sequence[int], dtype: torch.dtype, like: torch.Tensor,
              pinned: bool = False) -> torch.Tensor:
        """A new tensor where ``like`` lives; page-locked when it is host memory and ``pinned``
        (so a device->host copy into it is a DMA and may run asynchronously)."""
        pin = pinned and like.device.type == "cpu" and torch.cuda.is_available()
        return torch.empty(tuple(shape), dtype=dtype, device=like.device, pin_memory=pin)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst[...] = src``, queued (asynchronous across devices: read ``dst`` on the host, or
        reuse ``src``, only after :meth:`wait`)."""
        dst.copy_(src, non_blocking=True)

    def to(self, src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``src``'s bytes where ``like`` lives (``src`` itself when already there); a host
        result is pinned staging, in flight until :meth:`wait` names ``src``."""
        if not self.crosses(src, like):
            return src
        out = self.empty(src.shape, src.dtype, like, pinned=True)
        self.copy(out, src)
        return out

    def wait(self, *tensors: torch.Tensor) -> None:
        """Block until the copies queued on the current stream of every CUDA device among
        ``tensors`` are complete (see class doc). A no-op when none is on CUDA."""
        sync(*tensors)


#: the copier of every arena, executor and client unless one is injected
DEFAULT_COPIER = Copier()


def gather(src: torch.Tensor, idx: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """``src[idx]`` as contiguous rows on ``device`` (default: ``src``'s); a view of ``src``
    (no copy) when ``idx`` is one run of contiguous rows on the same device.

    Same device: one ``index_select`` (a slice when ``idx`` is one run). To CUDA from the
    CPU: one DMA per run of consecutive rows (asynchronous when ``src`` is pinned). To the
    CPU from CUDA: gathered on the device, then one copy across.
    """
    device = torch.device(device) if device is not None else src.device
    n = len(idx)
    if device == src.device or device.type == "cpu":
        runs = slot_runs(idx)
        if len(runs) == 1 and n:
            rows = src[idx[0]:idx[0] + n]
        else:
            ix = torch.as_tensor(list(idx), dtype=torch.long, device=src.device)
            flat = _flat(src)
            rows = (flat.index_select(0, ix).view(torch.uint8).view(src.dtype).view(n, *src.shape[1:])
                    if flat is not None else src.index_select(0, ix))
        return rows.to(device) if rows.device != device else rows.contiguous()
    staging = torch.empty((n, *src.shape[1:]), dtype=src.dtype, device=device)
    pinned = src.is_pinned()
    for i0, i1 in slot_runs(idx):
        run = src[idx[i0]:idx[i0] + (i1 - i0)]
        if pinned and not run.is_contiguous() and run[0].is_contiguous():
            # A strided pinned view (one layer of many slots) would be staged through pageable
            # memory by torch, not DMA'd: copy each row (contiguous in pinned memory) by DMA.
            for r in range(i1 - i0):
                DEFAULT_COPIER.copy(staging[i0 + r], run[r])
        elif pinned:
            DEFAULT_COPIER.copy(staging[i0:i1], run)
        else:
            staging[i0:i1].copy_(run)
    return staging


def copy_rows(src: torch.Tensor, src_idx: Sequence[int], dst: torch.Tensor, dst_idx: Sequence[int]) -> None:
    """``dst[dst_idx[i]] = src[src_idx[i]]`` for every ``i`` (see the module doc for how).

    ``src``/``dst``: ``[rows, ...]`` tensors of one dtype whose rows hold as many elements
    (the trailing shapes may differ, e.g. a slot's flat bytes against a block's shape, as
    long as both sides are viewable as each other's row shape). ``dst_idx`` must not repeat.
    """
    n = len(src_idx)
    if n != len(dst_idx):
        raise ValueError(f"{n} source rows for {len(dst_idx)} destination rows")
    if not n:
        return
    if src.dtype != dst.dtype:
        raise ValueError(f"dtype {src.dtype} rows cannot be copied into {dst.dtype} rows")
    if src[0].numel() != dst[0].numel():
        raise ValueError(f"rows of {src[0].numel()} elements cannot be copied into rows of {dst[0].numel()}")
    if src.shape[1:] != dst.shape[1:]:
        src = src.view(src.shape[0], *dst.shape[1:]) if src.is_contiguous() else src.reshape(
            src.shape[0], *dst.shape[1:])
    if src.device != dst.device:
        if dst.device.type == "cuda":  # DMA whole runs, re-layout on the device
            copy_rows(gather(src, src_idx, dst.device), range(n), dst, dst_idx)
        else:  # lay out on the device, one copy across
            staged = gather(src, src_idx, src.device)
            d_runs = slot_runs(dst_idx)
            if len(d_runs) == 1:
                dst[dst_idx[0]:dst_idx[0] + n].copy_(staged)
            else:
                copy_rows(staged.to(dst.device), range(n), dst, dst_idx)
        return
    runs = pair_runs(src_idx, dst_idx)
    src, dst = _widen(src, dst)
    if len(runs) <= _FEW_RUNS:
        _copy_runs(src, src_idx, dst, dst_idx, runs)
        return
    s_runs, d_runs = slot_runs(src_idx), slot_runs(dst_idx)
    dev = dst.device
    if len(s_runs) == 1:  # consecutive slots to scattered pool blocks: one indexed pass
        dst.index_copy_(0, torch.as_tensor(list(dst_idx), dtype=torch.long, device=dev),
                        src[src_idx[0]:src_idx[0] + n])
        return
    sidx = torch.as_tensor(list(src_idx), dtype=torch.long, device=src.device)
    if len(d_runs) == 1 and dst[dst_idx[0]:dst_idx[0] + n].is_contiguous():
        torch.index_select(src, 0, sidx, out=dst[dst_idx[0]:dst_idx[0] + n])
        return
    if n * _row_bytes(src) >= _RUN_BYTES * len(runs):  # long rows: one pass, a call per run
        _copy_runs(src, src_idx, dst, dst_idx, runs)
        return
    staged = src.index_select(0, sidx)
    if len(d_runs) == 1:
        dst[dst_idx[0]:dst_idx[0] + n].copy_(staged)
    else:
        dst.index_copy_(0, torch.as_tensor(list(dst_idx), dtype=torch.long, device=dev), staged)


def _copy_runs(src: torch.Tensor, src_idx: Sequence[int], dst: torch.Tensor, dst_idx: Sequence[int],
               runs: list[tuple[int, int]]) -> None:
    for i0, i1 in runs:
        s0, d0, k = src_idx[i0], dst_idx[i0], i1 - i0
        dst[d0:d0 + k].copy_(src[s0:s0 + k])


def _widen(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views with their (contiguous) last dimension reinterpreted as the widest integer
    type both allow: copies and indexed copies move one element per step, so 8-byte
    elements run several times faster than 2-byte ones (same bytes, same result)."""
    es = src.element_size()
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if size <= es:
            break
        try:
            return src.view(dtype), dst.view(dtype)
        except RuntimeError:  # last dim not contiguous, or sizes/offsets not multiples
            continue
    return src, dst


def copy_host_bytes(dst: np.ndarray, src: torch.Tensor) -> None:
    """``dst[...] = src``'s bytes, both in host memory: ``dst`` a uint8 view (of a send
    buffer, a payload) whose rows hold ``src``'s rows as bytes. One numpy pass on the
    calling thread, on purpose: the buffers this fills leave the process (the remote tier's
    values), are filled by threads that run beside the engine, and torch's intra-op
    threads stall badly on a busy host. O(bytes)."""
    np.copyto(dst, src.view(torch.uint8).numpy() if src.dtype != torch.uint8 else src.numpy())


def sync(*tensors: torch.Tensor) -> None:
    """Wait for the current stream of every CUDA device among ``tensors`` (pinned rows may
    then be reused). A no-op on CPU."""
    for dev in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.current_stream(dev).synchronize()
