"""The tier manager: where every block lives, and how blocks move between tiers.

Tiers are ordered fastest first (device, host, disk; disabled tiers are absent). Caching is
*exclusive*: a block lives in exactly one tier, so capacities add up. New blocks land in the
top tier; when a tier needs room its eviction policy picks victims, which are demoted to
the next tier in one batched copy (that tier making room the same way), and blocks evicted
from the last tier are dropped. A block whose parent is dropped can never be hit again (a
lookup stops at the first missing block), so its descendants are dropped with it.

Pinned blocks (being read) are never chosen as victims, and their slots are reference
counted, so even a ``clear`` cannot hand a slot being read to a writer.

Not thread-safe by itself: :class:`kvstore.store.KVStore` serialises calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import time

import torch

from allocator import Arena, DiskArena, MemoryArena, SlotPool, transfer
from eviction import EvictionPolicy, NoVictimError


@dataclass(slots=True, eq=False)
class BlockEntry:
    """Index entry of one cached block (its KV payload)."""

    key: bytes
    parent: bytes | None
    tier: int
    slot: int
    pins: int = 0
    hits: int = 0
    last_access: float = 0.0
    children: set[bytes] = field(default_factory=set)


@dataclass
class TierCounters:
    hits: int = 0
    evictions: int = 0
    demotions_in: int = 0
    promotions_in: int = 0
    drops: int = 0


class Tier:
    """One tier: an arena, its slot pool and its eviction policy (capacity in blocks)."""

    def __init__(self, name: str, arena: Arena, policy: EvictionPolicy) -> None:
        self.name = name
        self.arena = arena
        self.pool = SlotPool(arena.num_slots)
        self.policy = policy
        self.counters = TierCounters()

    @property
    def is_disk(self) -> bool:
        return isinstance(self.arena, DiskArena)

    def write(self, slots: Sequence[int], src: torch.Tensor, keys: Sequence[bytes]) -> None:
        if isinstance(self.arena, DiskArena):
            self.arena.write(slots, src, keys=keys)
        else:
            self.arena.write(slots, src)


class TierManager:
    """Index + tiers. See the module docstring for the movement rules.

    Complexity: lookups O(1) per block; making room for ``n`` blocks costs ``n`` policy
    evictions per tier crossed plus one batched copy per tier boundary.
    """

    def __init__(self, tiers: list[Tier], clock: Callable[[], float] = time.monotonic) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        self.tiers = tiers
        self.index: dict[bytes, BlockEntry] = {}
        self.clock = clock
        self.orphans_dropped = 0

    # -- placement ---------------------------------------------------------------------
    def make_room(self, t: int, n: int) -> int:
        """Free up to ``n`` slots in tier ``t`` by demoting victims; returns slots now free."""
        tier = self.tiers[t]
        short = n - tier.pool.free_count
        if short <= 0:
            return n
        victims: list[BlockEntry] = []
        for _ in range(short):
            try:
                key = tier.policy.evict()
            except NoVictimError:
                break
            victims.append(self.index[key])
        tier.counters.evictions += len(victims)
        if victims:
            if t + 1 < len(self.tiers):
                room = self.make_room(t + 1, len(victims))
                # Victims come out least valuable first: keep the later (more valuable) ones.
                dropped, moving = victims[:len(victims) - room], victims[len(victims) - room:]
                # Dropping in the lower tier may have dropped some victims as descendants.
                self._move([e for e in moving if e.key in self.index], t + 1)
            else:
                dropped = victims
            for entry in dropped:
                if entry.key in self.index:  # may already be gone as a dropped block's child
                    self._drop(entry, evicted=True)
        return min(n, tier.pool.free_count)

    def _move(self, entries: list[BlockEntry], dst_t: int) -> None:
        """Move blocks (all in one source tier, already out of its policy) to ``dst_t``."""
        if not entries:
            return
        src_t = entries[0].tier
        src = self.tiers[src_t]
        dst = self.tiers[dst_t]
        dst_slots = dst.pool.allocate_many(len(entries))
        transfer(src.arena, [e.slot for e in entries], dst.arena, dst_slots, keys=[e.key for e in entries])
        for entry, slot in zip(entries, dst_slots):
            src.pool.decref(entry.slot)
            entry.tier, entry.slot = dst_t, slot
            dst.policy.insert(entry.key, 1, None, entry.parent)
        if dst_t > src_t:
            dst.counters.demotions_in += len(entries)
        else:
            dst.counters.promotions_in += len(entries)

    def add(self, keys: Sequence[bytes], parents: Sequence[bytes | None], src: torch.Tensor, t: int = 0) -> int:
        """Store new blocks (rows of ``src``, in prefix order) starting at tier ``t``.

        The leading blocks go to tier ``t`` as far as room can be made there; the rest spill
        to the tiers below (a put larger than the top tier still lands whole). Returns how
        many leading blocks were stored (fewer only when every tier is full of pinned blocks).
        """
        if not keys:
            return 0
        n = self.make_room(t, len(keys))
        if n:
            tier = self.tiers[t]
            slots = tier.pool.allocate_many(n)
            try:
                tier.write(slots, src[:n], keys[:n])
            except BaseException:
                tier.pool.free_many(slots)
                raise
            now = self.clock()
            # Insert deepest first so that, for recency-based policies, a parent always looks
            # more recently used than its children: tails go before the prefixes they extend.
            for i in reversed(range(n)):
                entry = BlockEntry(keys[i], parents[i], t, slots[i], last_access=now)
                self.index[keys[i]] = entry
                tier.policy.insert(keys[i], 1, None, parents[i])
                parent = self.index.get(parents[i]) if parents[i] is not None else None
                if parent is not None:
                    parent.children.add(keys[i])
        if n < len(keys) and t + 1 < len(self.tiers):
            n += self.add(keys[n:], parents[n:], src[n:], t + 1)
        return n

    def promote(self, entries: list[BlockEntry], rows: torch.Tensor) -> int:
        """Move blocks from lower tiers to the top tier, writing ``rows`` (their bytes,
        already read) instead of reading them again. Returns how many moved."""
        entries = [e for e in entries if e.tier > 0 and e.key in self.index]
        if not entries:
            return 0
        n = self.make_room(0, len(entries))
        # make_room may have demoted or dropped some of them; keep the ones still below top
        keep = [(i, e) for i, e in enumerate(entries[:n]) if e.key in self.index and e.tier > 0 and e.pins == 0]
        if not keep:
            return 0
        top = self.tiers[0]
        slots = top.pool.allocate_many(len(keep))
        top.write(slots, rows[[i for i, _ in keep]], [e.key for _, e in keep])
        for (_, entry), slot in zip(keep, slots):
            old = self.tiers[entry.tier]
            old.policy.remove(entry.key)
            old.pool.decref(entry.slot)
            entry.tier, entry.slot = 0, slot
            top.policy.insert(entry.key, 1, None, entry.parent)
        top.counters.promotions_in += len(keep)
        return len(keep)

    # -- removal -----------------------------------------------------------------------
    def _drop(self, entry: BlockEntry, *, evicted: bool) -> None:
        """Forget a block (its policy entry is already gone when ``evicted``) and the
        descendants that only it made reachable."""
        stack = [(entry, evicted)]
        while stack:
            e, already_out = stack.pop()
            tier = self.tiers[e.tier]
            if not already_out and e.key in tier.policy:  # an in-flight victim is already out
                tier.policy.remove(e.key)
            del self.index[e.key]
            tier.pool.decref(e.slot)
            tier.counters.drops += 1
            if e.parent is not None and e.parent in self.index:
                self.index[e.parent].children.discard(e.key)
            for child_key in e.children:
                child = self.index.get(child_key)
                if child is not None and child.pins == 0:
                    self.orphans_dropped += 1
                    stack.append((child, False))

    def drop(self, entries: Sequence[BlockEntry]) -> None:
        for e in entries:
            if e.key in self.index:
                self._drop(e, evicted=False)

    def clear(self) -> int:
        """Drop every block not pinned; returns how many were dropped."""
        before = len(self.index)
        for entry in [e for e in self.index.values() if e.pins == 0]:
            if entry.key in self.index:
                self._drop(entry, evicted=False)
        return before - len(self.index)

    # -- pins --------------------------------------------------------------------------
    def pin(self, entry: BlockEntry) -> None:
        tier = self.tiers[entry.tier]
        tier.policy.pin(entry.key)
        tier.pool.incref(entry.slot)
        entry.pins += 1

    def unpin(self, entry: BlockEntry, tier_index: int, slot: int) -> None:
        """Undo :meth:`pin` taken when the block was in ``tier_index``/``slot``."""
        entry.pins -= 1
        if entry.key in self.index and entry.tier == tier_index:
            self.tiers[tier_index].policy.unpin(entry.key)
        self.tiers[tier_index].pool.decref(slot)

    def touch(self, entries: Sequence[BlockEntry]) -> None:
        """Record a hit on a prefix's blocks, deepest first (parents end up most recent)."""
        now = self.clock()
        for e in reversed(entries):
            e.hits += 1
            e.last_access = now
            self.tiers[e.tier].policy.access(e.key)

    def _check(self) -> None:
        """Assert every invariant across index, pools and policies."""
        for t, tier in enumerate(self.tiers):
            tier.pool._check()
            tier.policy._check()
            resident = [e for e in self.index.values() if e.tier == t]
            assert len(tier.policy) == len(resident), f"{tier.name}: policy holds {len(tier.policy)}, index {len(resident)}"
            assert all(e.key in tier.policy for e in resident), f"{tier.name}: index entry missing from policy"
            slots = [e.slot for e in resident]
            assert len(set(slots)) == len(slots), f"{tier.name}: two blocks share a slot"
            for e in resident:
                assert tier.pool.refcount(e.slot) == 1 + e.pins, f"{tier.name}: slot {e.slot} refcount mismatch"
                assert tier.policy.is_pinned(e.key) == (e.pins > 0), f"{tier.name}: pin state mismatch"
            assert tier.pool.used_count == len(resident), f"{tier.name}: {tier.pool.used_count} slots used for {len(resident)} blocks"
            assert tier.pool.used_count <= tier.pool.num_slots
        for e in self.index.values():
            for c in e.children:
                assert c in self.index and self.index[c].parent == e.key, "child link broken"
