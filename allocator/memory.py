"""Arenas in memory: the device tier (CUDA when present) and the host tier (pinned when CUDA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from allocator.arena import Arena
from allocator.rowcopy import copy_rows, sync


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class MemoryArena(Arena):
    """One ``[num_slots, slot_bytes]`` uint8 tensor; batched gathers and scatters on it.

    ``write`` and ``read`` are :func:`allocator.rowcopy.copy_rows` (a single strided pass per
    run of slots, also from or into a permuted view of the caller's KV); both are O(bytes)
    with O(runs) Python steps at most.
    """

    kind = "memory"

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device | str | None = None,
                 pin: bool = False) -> None:
        super().__init__(num_slots, slot_bytes)
        dev = torch.device(device) if device is not None else default_device()
        pin = pin and dev.type == "cpu" and torch.cuda.is_available()
        self.data = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, device=dev, pin_memory=pin)
        if dev.type == "cpu" and not pin:
            # Touch every page now (O(capacity), once): a store's first puts would otherwise
            # pay a page fault per 4 KiB on the data path (measured: 10-40x slower copies
            # until the arena is warm), and a machine short of memory fails here, at start.
            self.data.zero_()
        self.pinned = pin

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
        if src.device != self.data.device or self.data.is_cuda:
            sync(src, self.data)  # the bytes are in before the caller indexes the blocks

    def read(self, slots: Sequence[int], out: torch.Tensor) -> None:
        """Slots straight into ``out``'s rows (any strides, any device); returns once they are in."""
        self._check_batch(slots, out)
        n = len(slots)
        if not n:
            return
        copy_rows(self.rows(out.dtype, out.shape[1:]), slots, out, range(n))
        if out.device != self.data.device:
            sync(out, self.data)

    def gather(self, slots: Sequence[int]) -> torch.Tensor:
        """A new ``[len(slots), slot_bytes]`` tensor on this arena's device."""
        if self.slot_bytes % 8 == 0:  # 8-byte elements: indexed copies run several times faster
            return self.data.view(torch.int64).index_select(0, self._index(slots)).view(torch.uint8)
        return self.data.index_select(0, self._index(slots))

    def close(self) -> None:
        self.data = torch.empty((0, self.slot_bytes), dtype=torch.uint8)
