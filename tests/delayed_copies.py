"""A fake device whose asynchronous copies land only when ``wait`` names it.

Injected wherever an :class:`allocator.rowcopy.Copier` is (arenas, ``transfer``, the restore
executor, the clients), it proves on a CPU-only machine what a GPU run would show: that no
reader touches the destination of a cross-device copy before the copy is waited for.

* "On the device" are the tensors whose storage was registered with :meth:`put_on`
  (typically an arena's ``data``) or allocated by :meth:`empty` next to such a tensor; every
  other tensor is host memory. Devices are named, so a wait that names the wrong device
  (``torch.cuda.synchronize()`` on the thread's current device) leaves the copy in flight.
* ``copy``/``to`` from a fake device to the host fill the destination with poison (NaN for
  floats, 0xA5 bytes for integers) and remember a snapshot of the source; the bytes land only
  when :meth:`wait` is called with a tensor of that device. A host reader that runs earlier
  gets poison, so the test that compares bytes fails. Copies *to* a device land at once:
  on a GPU, device-side readers are ordered behind them on the stream, so only the host side
  can read too early (the hazard of items 1, 2 and 4 of issue 26).
* ``crossings`` counts the copies that crossed: a test asserts it is positive, so a path
  that bypasses the primitive (today's direct ``.to(non_blocking=True)``) fails too.
"""

from __future__ import annotations

from collections.abc import Sequence
import threading

import torch

from allocator.rowcopy import Copier

HOST = "host"


def _poison(t: torch.Tensor) -> None:
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.view(torch.uint8).fill_(0xA5) if t.is_contiguous() else t.fill_(-91 if t.dtype.is_signed else 0xA5)


class DelayedCopier(Copier):
    """See module doc. Thread-safe (clients hash on pool threads)."""

    def __init__(self) -> None:
        self._where: dict[int, str] = {}  # storage data_ptr -> device name
        self._keep: list[torch.Tensor] = []  # registered storages stay alive: no address reuse
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self.crossings = 0
        self.waits: list[str] = []

    # -- where tensors live -------------------------------------------------------------
    def put_on(self, t: torch.Tensor, device: str = "dev0") -> torch.Tensor:
        """Declare ``t``'s storage (and every view of it) to live on fake ``device``."""
        with self._lock:
            self._where[t.untyped_storage().data_ptr()] = device
            self._keep.append(t)
        return t

    def where(self, t: torch.Tensor) -> str:
        with self._lock:
            return self._where.get(t.untyped_storage().data_ptr(), HOST) if t.numel() else HOST

    # -- the primitive ------------------------------------------------------------------
    def crosses(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return self.where(a) != self.where(b)

    def empty(self, shape: Sequence[int], dtype: torch.dtype, like: torch.Tensor,
              pinned: bool = False) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype)
        dev = self.where(like)
        if dev != HOST and out.numel():
            self.put_on(out, dev)
        return out

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        a, b = self.where(src), self.where(dst)
        if a == b:
            dst.copy_(src)
            return
        if b != HOST:  # to a device: ordered before any device-side reader (see module doc)
            with self._lock:
                self.crossings += 1
            dst.copy_(src)
            return
        snapshot = src.detach().clone()
        _poison(dst)
        with self._lock:
            self.crossings += 1
            self._pending.setdefault(b if b != HOST else a, []).append((dst, snapshot))

    def wait(self, *tensors: torch.Tensor) -> None:
        for dev in {self.where(t) for t in tensors} - {HOST}:
            with self._lock:
                landing = self._pending.pop(dev, [])
                self.waits.append(dev)
            for dst, snapshot in landing:
                dst.copy_(snapshot)

    def in_flight(self) -> int:
        """Copies queued and not yet waited for."""
        with self._lock:
            return sum(len(v) for v in self._pending.values())
