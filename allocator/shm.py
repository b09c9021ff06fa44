"""A memory arena whose bytes live in a shared-memory file that other processes map.

Why a file in ``/dev/shm`` mapped with ``torch.from_file(shared=True)`` rather than
``multiprocessing.shared_memory``: a path is all a client needs to map the arena (it
travels in one msgpack string), the mapping is a plain torch tensor on both sides (so the
batched ``index_select``/``copy_`` paths of :class:`MemoryArena` apply unchanged), and the
creator can unlink the name at once when it closes while mapped clients keep their view.

The file is fully allocated up front (``posix_fallocate``): a sparse tmpfs file that runs
out of room later would kill a reader with SIGBUS instead of failing here, at creation.
"""

from __future__ import annotations

import os
from pathlib import Path
import secrets

import torch

from allocator.memory import MemoryArena


class ShmArena(MemoryArena):
    """``num_slots`` slots of ``slot_bytes`` in a shared file; ``path`` is what clients map.

    Same costs as :class:`MemoryArena` (O(bytes) batched copies); creation is O(capacity)
    because the file is allocated eagerly.
    """

    kind = "shm"

    def __init__(self, num_slots: int, slot_bytes: int, directory: str | os.PathLike = "/dev/shm",
                 prefix: str = "kvstore") -> None:
        # Deliberately not calling MemoryArena.__init__: the tensor comes from the file.
        super(MemoryArena, self).__init__(num_slots, slot_bytes)
        directory = Path(directory)
        size = num_slots * slot_bytes
        self.path = str(directory / f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}.shm")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self.data = map_shared(self.path, num_slots, slot_bytes)
        self.pinned = False
        self._owner_pid = os.getpid()

    def describe(self) -> dict:
        """What a client needs to map this arena: path and geometry."""
        return {"path": self.path, "num_slots": self.num_slots, "slot_bytes": self.slot_bytes}

    def close(self) -> None:
        super().close()
        if os.getpid() == self._owner_pid:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def map_shared(path: str, num_slots: int, slot_bytes: int) -> torch.Tensor:
    """Map an existing shared arena file as a ``[num_slots, slot_bytes]`` uint8 tensor.

    Raises ``OSError`` when the file is absent or smaller than the geometry says (a client
    on another host, or a stale path), so callers can fall back to sending bytes.
    """
    size = num_slots * slot_bytes
    actual = os.stat(path).st_size
    if actual < size:
        raise OSError(f"shared arena {path} holds {actual} bytes, expected {size}")
    if size == 0:
        return torch.empty((0, slot_bytes), dtype=torch.uint8)
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8).view(num_slots, slot_bytes)


def shm_free_bytes(directory: str | os.PathLike = "/dev/shm") -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
