"""A fixed-capacity pool of equal-size slots with reference counts.

Why a pool and not a general allocator: every block of one payload kind has the same size,
so an arena is an array of slots and allocation reduces to handing out free indices. The
free list is a stack (LIFO), which reuses recently freed -- likely still cached -- slots
first. Reference counts let a reader keep a slot alive while the index drops the block
(a slot is only reused once the last reference is gone), so a concurrent ``clear`` or
eviction can never hand a slot being read to a writer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class OutOfSlotsError(RuntimeError):
    """The pool has fewer free slots than asked for. Nothing was allocated."""


class SlotPool:
    """``num_slots`` slots numbered ``0..num_slots-1``.

    Complexity: ``allocate``/``free``/``incref``/``decref`` O(1) per slot;
    ``allocate_many(n)`` O(n) and all-or-nothing; memory O(num_slots).
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        # Highest index on top so slots are first handed out in ascending order: fresh
        # allocations of a batch land in one contiguous run (one I/O on disk).
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._refs = np.zeros(num_slots, dtype=np.int32)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfSlotsError(f"all {self.num_slots} slots are in use")
        slot = self._free.pop()
        self._refs[slot] = 1
        return slot

    def allocate_many(self, n: int) -> list[int]:
        """Allocate ``n`` slots at once, or none (raises) if fewer than ``n`` are free. The
        slots come in ascending order: freed slots tend to form ranges again, and runs of
        consecutive slots are single copies and single disk requests. O(n log n)."""
        if n > len(self._free):
            raise OutOfSlotsError(f"asked for {n} slots, {len(self._free)} of {self.num_slots} free")
        if n <= 0:
            return []
        slots = sorted(self._free[-n:])
        del self._free[-n:]
        self._refs[slots] = 1
        return slots

    def claim(self, slots: Iterable[int]) -> None:
        """Mark specific free slots as allocated (refcount 1), e.g. those a reopened slab
        already holds. O(num_slots)."""
        wanted = set(slots)
        if not wanted:
            return
        taken = [s for s in wanted if not 0 <= s < self.num_slots or self._refs[s] != 0]
        if taken:
            raise ValueError(f"cannot claim slots that are out of range or in use: {sorted(taken)[:8]}")
        self._free = [s for s in self._free if s not in wanted]
        self._refs[list(wanted)] = 1

    def refcount(self, slot: int) -> int:
        return int(self._refs[slot])

    def incref(self, slot: int) -> None:
        if self._refs[slot] <= 0:
            raise ValueError(f"incref of free slot {slot}")
        self._refs[slot] += 1

    def incref_many(self, slots: Sequence[int]) -> None:
        """``incref`` of each slot (one vectorised step; slots may repeat). O(len(slots))."""
        idx = np.asarray(slots, dtype=np.int64)
        if idx.size and (self._refs[idx] <= 0).any():
            raise ValueError(f"incref of free slot(s) {sorted({int(s) for s in idx if self._refs[s] <= 0})[:8]}")
        np.add.at(self._refs, idx, 1)

    def decref_many(self, slots: Sequence[int]) -> list[int]:
        """``decref`` of each slot; returns the slots that became free. O(len(slots))."""
        idx = np.asarray(slots, dtype=np.int64)
        if not idx.size:
            return []
        uniq, counts = np.unique(idx, return_counts=True)
        if (self._refs[uniq] < counts).any():
            raise ValueError("decref of free slot(s)")
        self._refs[uniq] -= counts.astype(self._refs.dtype)
        freed = [int(s) for s in uniq[self._refs[uniq] == 0]]
        self._free.extend(freed)
        return freed

    def decref(self, slot: int) -> bool:
        """Drop one reference; returns True when the slot became free."""
        refs = self._refs[slot]
        if refs <= 0:
            raise ValueError(f"decref of free slot {slot}")
        refs -= 1
        self._refs[slot] = refs
        if refs == 0:
            self._free.append(slot)
            return True
        return False

    def free(self, slot: int) -> None:
        """Release a slot held by exactly one reference."""
        if self._refs[slot] != 1:
            raise ValueError(f"free of slot {slot} with refcount {self._refs[slot]}")
        self.decref(slot)

    def free_many(self, slots: Iterable[int]) -> None:
        for slot in slots:
            self.decref(slot)

    def _check(self) -> None:
        """Assert every invariant: free slots are distinct, in range, exactly the zero-ref ones."""
        free = self._free
        assert len(set(free)) == len(free), "duplicate slot in free list"
        assert all(0 <= s < self.num_slots for s in free), "free slot out of range"
        assert (self._refs >= 0).all(), "negative refcount"
        zero = set(np.flatnonzero(self._refs == 0).tolist())
        assert zero == set(free), "free list differs from zero-refcount slots"
