"""Saves that do not stall the engine: ``KVStore.put_async`` and its completion handle.

A save runs on one worker thread per store (saves complete in submission order). From CUDA
memory the worker first makes a side stream wait for an event recorded on the caller's
stream when it called (so the KV the caller's kernels were still writing is what gets
saved), then copies on that side stream -- device->host by DMA into the host tier's pinned
slots, or device->device -- so neither the caller's thread nor its stream waits. The
caller's tensor is kept alive for the side stream (``record_stream``) even if the caller
drops it.

Visibility: the worker reserves slots (invisible to lookups), copies the bytes in, and only
then commits them to the index, so a lookup never sees a block whose bytes are not all in.
When no room can be reserved (or activations are saved too) the worker falls back to a
plain ``put`` -- which also writes before it indexes.

The caller may reuse (overwrite) its KV buffer once the handle is ``done()``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from kvstore.errors import StoreClosedError


class PutHandle:
    """One save in flight. ``wait()`` returns what ``put`` would (the cached prefix length in
    tokens) or raises its error; ``done()`` is True once the bytes are in and visible, after
    which the caller's buffer may be reused."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the save is complete (``TimeoutError`` after ``timeout`` seconds)."""
        return self._future.result(timeout)

    result = wait


class AsyncSaver:
    """The worker (and, on CUDA, the side streams) behind ``put_async``. ``close`` waits for
    every save already submitted; later submissions raise ``StoreClosedError``."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}
        self._closed = False

    def submit(self, job: Callable[[], int], kv: torch.Tensor, *more: torch.Tensor | None) -> PutHandle:
        """Run ``job`` on the worker; on CUDA after the caller's current stream reaches this
        point, with the worker's current stream set to a side stream."""
        if self._closed:
            raise StoreClosedError("the store is closed")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-save")
        if kv.device.type != "cuda":
            return PutHandle(self._pool.submit(job))
        dev = kv.device
        side = self._streams.get(dev)
        if side is None:
            side = self._streams[dev] = torch.cuda.Stream(device=dev)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
        for t in (kv, *more):
            if t is not None and t.device.type == "cuda":
                t.record_stream(side)

        def on_side() -> int:
            with torch.cuda.device(dev), torch.cuda.stream(side):
                side.wait_event(ready)
                n = job()
                side.synchronize()  # every copy out of the caller's buffer is done
                return n
        return PutHandle(self._pool.submit(on_side))

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
