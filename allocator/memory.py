"""Arenas in memory: the device tier (CUDA when present) and the host tier (page-locked
when the store's device is CUDA)."""

from __future__ import annotations

from collections.abc import Sequence
import mmap

import torch

from allocator.arena import Arena
from allocator.rowcopy import DEFAULT_COPIER, Copier, copy_rows


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class HostRegistration:
    """Page-locks an existing host allocation for DMA with ``cudaHostRegister`` and undoes
    it with :meth:`release` (idempotent).

    Why not ``pin_memory=True``: torch's caching host allocator rounds every pinned block up
    to a power of two (a 65 GiB host tier would pin 128 GiB) and keeps it cached after the
    tensor dies, so a closed store never gave its pinned memory back. Registering the
    allocation we already hold pins exactly its bytes, and unregistering returns them.
    Registration faults every page in: O(bytes), once.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self.ptr = t.data_ptr()
        self.nbytes = t.numel() * t.element_size()
        self._active = False
        if self.nbytes:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.ptr, self.nbytes, 0))
            self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def release(self) -> None:
        if self._active:
            self._active = False
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.ptr))


def page_aligned_empty(num_slots: int, slot_bytes: int) -> tuple[torch.Tensor, mmap.mmap | None]:
    """An anonymous, page-aligned ``[num_slots, slot_bytes]`` uint8 allocation (and its
    mapping, to keep alive): what ``cudaHostRegister`` pins without rounding. Zero-filled by
    the kernel, pages faulted on first touch (or at registration)."""
    size = num_slots * slot_bytes
    if size == 0:
        return torch.empty((num_slots, slot_bytes), dtype=torch.uint8), None
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mm, dtype=torch.uint8).view(num_slots, slot_bytes), mm


class MemoryArena(Arena):
    """One ``[num_slots, slot_bytes]`` uint8 tensor; batched gathers and scatters on it.

    ``write`` and ``read`` are :func:`allocator.rowcopy.copy_rows` (a single strided pass per
    run of slots, also from or into a permuted view of the caller's KV); both are O(bytes)
    with O(runs) Python steps at most.

    ``pin``: page-lock a host arena for DMA (:class:`HostRegistration`) -- pass it only when
    the store's device is CUDA (a CPU store must not create a CUDA context); ignored for a
    device arena or where CUDA is absent. ``close`` unpins. ``copier``: the cross-device copy
    primitive (:class:`allocator.rowcopy.Copier`; injectable for tests).
    """

    kind = "memory"

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device | str | None = None,
                 pin: bool = False, copier: Copier | None = None) -> None:
        super().__init__(num_slots, slot_bytes)
        self.copier = copier or DEFAULT_COPIER
        dev = torch.device(device) if device is not None else default_device()
        self._registration: HostRegistration | None = None
        self._mapping: mmap.mmap | None = None
        if dev.type == "cpu" and pin and torch.cuda.is_available():
            self.data, self._mapping = page_aligned_empty(num_slots, slot_bytes)
            self._registration = HostRegistration(self.data)
        else:
            self.data = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, device=dev)
            if dev.type == "cpu":
                # Touch every page now (O(capacity), once): a store's first puts would otherwise
                # pay a page fault per 4 KiB on the data path (measured: 10-40x slower copies
                # until the arena is warm), and a machine short of memory fails here, at start.
                self.data.zero_()

    @property
    def pinned(self) -> bool:
        """Whether this arena's host memory is page-locked (registered) right now."""
        return self._registration is not None and self._registration.active

    def register_host(self) -> None:
        """Page-lock this (host) arena's existing memory for DMA; a no-op when already done,
        on a device arena or without CUDA. ``close`` unpins. O(bytes), once."""
        if self._registration is None and self.data.device.type == "cpu" and torch.cuda.is_available():
            self._registration = HostRegistration(self.data)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(slots, dtype=torch.long, device=self.data.device)

    def rows(self, dtype: torch.dtype, row_shape: Sequence[int]) -> torch.Tensor:
        """The whole arena viewed as ``[num_slots, *row_shape]`` of ``dtype`` (no copy)."""
        return self.data.view(dtype).view(self.num_slots, *row_shape)

    def write(self, slots: Sequence[int], src: torch.Tensor) -> None:
        """One strided pass per run of consecutive slots (see :func:`allocator.rowcopy.copy_rows`);
        from another device the rows cross as whole runs. Returns once the bytes are in (the
        caller may reuse ``src``, and blocks indexed afterwards are complete on any stream)."""
        self._check_batch(slots, src)
        n = len(slots)
        if not n:
            return
        copy_rows(src, range(n), self.rows(src.dtype, src.shape[1:]), slots)
        if self.copier.crosses(src, self.data) or self.data.is_cuda:
            self.copier.wait(src, self.data)  # the bytes are in before the caller indexes the blocks

    def read(self, slots: Sequence[int], out: torch.Tensor) -> None:
        """Slots straight into ``out``'s rows (any strides, any device); returns once they are in."""
        self._check_batch(slots, out)
        n = len(slots)
        if not n:
            return
        copy_rows(self.rows(out.dtype, out.shape[1:]), slots, out, range(n))
        if self.copier.crosses(out, self.data):
            self.copier.wait(out, self.data)

    def gather(self, slots: Sequence[int]) -> torch.Tensor:
        """A new ``[len(slots), slot_bytes]`` tensor on this arena's device (allocated by the
        copier, so a test double knows where it lives)."""
        out = self.copier.empty((len(slots), self.slot_bytes), torch.uint8, self.data)
        if self.slot_bytes % 8 == 0:  # 8-byte elements: indexed copies run several times faster
            torch.index_select(self.data.view(torch.int64), 0, self._index(slots), out=out.view(torch.int64))
        else:
            torch.index_select(self.data, 0, self._index(slots), out=out)
        return out

    def close(self) -> None:
        if self._registration is not None:
            self._registration.release()
        self.data = torch.empty((0, self.slot_bytes), dtype=torch.uint8)
        self._mapping = None  # unmapped once no tensor refers to it
