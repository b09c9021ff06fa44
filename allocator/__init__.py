"""Paged slot allocation and the tiers' memory arenas (device, host, disk).

Knows slots and bytes, not tokens; imports nothing else of this project.
"""

from allocator.arena import Arena, CorruptSlotError
from allocator.disk import (DiskArena, SlabInUseError, SlabMismatchError, SlotRecord, slab_file_bytes,
                            slots_for_bytes)
from allocator.fileops import FileOps
from allocator.memory import MemoryArena, default_device
from allocator.slot_pool import OutOfSlotsError, SlotPool
from allocator.transfer import transfer

__all__ = ["Arena", "CorruptSlotError", "DiskArena", "FileOps", "MemoryArena", "OutOfSlotsError",
           "SlotPool", "default_device", "slab_file_bytes", "slots_for_bytes", "transfer",
           "SlabInUseError", "SlabMismatchError", "SlotRecord"]
