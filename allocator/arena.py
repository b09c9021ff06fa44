"""The arena contract: an array of equal-size slots somewhere (device, host, disk).

Arenas move bytes in batches: one call reads or writes many slots, so the per-block cost
is an index entry, not a Python-level copy. Payloads are presented as tensors whose first
dimension is the slot batch; any dtype and trailing shape whose bytes equal ``slot_bytes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
import math

import torch


class CorruptSlotError(IOError):
    """Bytes read back do not match the checksum written with them."""

    def __init__(self, slots: Sequence[int], message: str) -> None:
        super().__init__(message)
        self.slots = list(slots)


class Arena(ABC):
    """``num_slots`` slots of ``slot_bytes`` each."""

    kind: str = ""

    def __init__(self, num_slots: int, slot_bytes: int) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where this arena's bytes live (disk arenas stage through the CPU)."""

    @abstractmethod
    def write(self, slots: Sequence[int], src: torch.Tensor) -> None:
        """Store ``src[i]`` in ``slots[i]``; ``src`` is ``[len(slots), ...]``, any strides."""

    @abstractmethod
    def read(self, slots: Sequence[int], out: torch.Tensor) -> None:
        """Fill ``out[i]`` with the bytes of ``slots[i]``; ``out`` is ``[len(slots), ...]``, contiguous."""

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release resources; further calls are undefined."""

    def _check_batch(self, slots: Sequence[int], t: torch.Tensor) -> None:
        if t.shape[0] != len(slots):
            raise ValueError(f"batch of {t.shape[0]} rows for {len(slots)} slots")
        row_bytes = math.prod(t.shape[1:]) * t.element_size() if len(slots) else self.slot_bytes
        if row_bytes != self.slot_bytes:
            raise ValueError(f"row of {row_bytes} bytes for slots of {self.slot_bytes} bytes")
