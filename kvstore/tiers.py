"""The tier manager: where every block lives, and how blocks move between tiers.

Tiers are ordered fastest first (device, host, disk; disabled tiers are absent). By default
caching is *exclusive*: a block lives in exactly one tier, so capacities add up. New blocks
land in the top tier (spilling down when it is too small); when a tier needs room its
eviction policy picks victims, which are demoted to the next tier in one batched copy (that
tier making room the same way), and blocks evicted from the last tier are dropped. A block
whose parent is dropped can never be hit again (a lookup stops at the first missing block),
so its descendants are dropped with it.

With ``durable=True`` (``persist``) the disk tier is *inclusive*: every block written to a
memory tier is also written through to disk (its ``backup`` slot), so an acknowledged put
survives a crash. Demoting such a block to disk is then free (its memory copy is dropped).
The index never holds a block that is not on disk: a block whose write-through fails (no
room that is not pinned, an I/O error, bytes that fail their source checksum) is dropped
before the put returns -- so the put's result counts only durable tokens -- and when the
disk tier evicts a backup, the block leaves memory too. A disk tier smaller than the memory
tiers therefore bounds what is cached: what ``lookup`` reports is what survives a kill.
Every freed disk slot's header is zeroed (and synced with ``fsync="always"``) in every
configuration with ``persist``, the disk-only one included, so nothing cleared comes back.

A sidecar's put tier may own *spare* slots beyond its capacity that clients hold staged to
write puts into (``Tier.spare``/``Tier.staged``): the cache itself never holds more than
``capacity`` blocks there, so staging never shrinks it.

Pinned blocks (being read) are never chosen as victims, and slots are reference counted,
so even a ``clear`` cannot hand a slot being read to a writer.

Not thread-safe by itself: :class:`kvstore.store.KVStore` serialises calls.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
import logging
import time

import torch

from allocator import Arena, CorruptSlotError, DiskArena, SlotPool, SlotRecord, transfer
from allocator.codec_arena import CodecArena, base_arena
from eviction import EvictionPolicy, NoVictimError

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class BlockEntry:
    """Index entry of one cached block. ``tier``/``slot`` is its fastest copy; ``backup`` a
    durable copy's slot on the disk tier while the fastest copy is in memory."""

    key: bytes
    parent: bytes | None
    tier: int
    slot: int
    pins: int = 0
    hits: int = 0
    last_access: float = 0.0
    backup: int | None = None
    children: set[bytes] = field(default_factory=set)
    #: its bytes went through a lossy codec (a lossy tier holds it, or held it before it was
    #: promoted): an exact read must not return it
    lossy: bool = False


@dataclass
class TierCounters:
    hits: int = 0
    evictions: int = 0
    demotions_in: int = 0
    promotions_in: int = 0
    drops: int = 0
    io_errors: int = 0


class Tier:
    """One tier: an arena, its slot pool and its eviction policy (capacity in blocks)."""

    def __init__(self, name: str, arena: Arena, policy: EvictionPolicy) -> None:
        self.name = name
        self.arena = arena
        self.pool = SlotPool(arena.num_slots)
        self.policy = policy
        #: slots beyond the cache's capacity, lent to sidecar clients to write puts into
        #: (``staged`` of them are out); cached blocks use at most ``num_slots - spare``
        self.spare = 0
        self.staged = 0
        self.counters = TierCounters()
        #: set after an I/O error: the tier takes no new blocks; reads of what it holds
        #: are still tried (each verified) and a failure reports a miss.
        self.degraded = False

    @property
    def capacity(self) -> int:
        """Slots the cache may fill (the arena's, less the staging spare)."""
        return self.pool.num_slots - self.spare

    @property
    def cache_free(self) -> int:
        """Slots a new block may take now without evicting (staged slots are not free)."""
        return self.capacity - (self.pool.used_count - self.staged)

    @property
    def is_disk(self) -> bool:
        return isinstance(base_arena(self.arena), DiskArena)

    @property
    def codec_name(self) -> str:
        return self.arena.codec.name if isinstance(self.arena, CodecArena) else "none"

    @property
    def lossy(self) -> bool:
        """Whether blocks stored here come back approximated (a lossy codec)."""
        return isinstance(self.arena, CodecArena) and self.arena.codec.lossy

    def write(self, slots: Sequence[int], src: torch.Tensor, keys: Sequence[bytes],
              parents: Sequence[bytes | None]) -> None:
        if self.is_disk:
            self.arena.write(slots, src, keys=keys, parents=parents)
        else:
            self.arena.write(slots, src)


class TierManager:
    """Index + tiers. See the module docstring for the movement rules.

    Complexity: lookups O(1) per block; making room for ``n`` blocks costs ``n`` policy
    evictions per tier crossed plus one batched copy per tier boundary.
    """

    def __init__(self, tiers: list[Tier], clock: Callable[[], float] = time.monotonic,
                 durable: bool = False) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        self.tiers = tiers
        self.index: dict[bytes, BlockEntry] = {}
        self.clock = clock
        self.orphans_dropped = 0
        self.corrupt_dropped = 0  # blocks lost to bytes that failed their checksum while moved
        last = len(tiers) - 1
        self.disk: int | None = last if tiers[last].is_disk else None
        self.durable = durable and self.disk is not None and len(tiers) > 1
        #: freed disk slots are invalidated on disk (a restart must not resurrect them)
        self.persist = durable and self.disk is not None
        self._freed: list[int] | None = None  # batching of invalidations (clear)

    def fail(self, t: int, exc: BaseException) -> None:
        """Record an I/O error on tier ``t``: mark it degraded, log once (not per block)."""
        tier = self.tiers[t]
        tier.counters.io_errors += 1
        if not tier.degraded:
            tier.degraded = True
            log.error("tier %s degraded after an I/O error (%s); it takes no new blocks", tier.name, exc)

    def _next(self, t: int) -> int | None:
        """The tier below ``t`` that still takes blocks."""
        for u in range(t + 1, len(self.tiers)):
            if not self.tiers[u].degraded:
                return u
        return None

    # -- slot bookkeeping --------------------------------------------------------------
    def _decref(self, t: int, slot: int) -> None:
        tier = self.tiers[t]
        if tier.pool.decref(slot) and t == self.disk and self.persist:
            if self._freed is not None:
                self._freed.append(slot)
                return
            self._invalidate([slot])

    def _invalidate(self, slots: list[int]) -> None:
        try:
            self.tiers[self.disk].arena.invalidate(slots)  # a freed slot must not come back after a restart
        except OSError as exc:
            self.fail(self.disk, exc)

    # -- placement ---------------------------------------------------------------------
    def make_room(self, t: int, n: int) -> int:
        """Free up to ``n`` slots in tier ``t`` by demoting victims; returns slots now free."""
        tier = self.tiers[t]
        short = n - tier.cache_free
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
        if t == self.disk:
            for entry in victims:
                if entry.key not in self.index:  # already dropped as a dropped block's child
                    continue
                if entry.tier != t:  # its durable copy goes: so does the block (never cached, not durable)
                    self._drop(entry, evicted=False)
                else:
                    self._drop(entry, evicted=True)
            return max(0, min(n, tier.cache_free))
        nxt = self._next(t)
        backed = [e for e in victims if e.backup is not None and nxt == self.disk]
        to_copy = [e for e in victims if not (e.backup is not None and nxt == self.disk)]
        for entry in backed:  # its durable copy becomes its only copy: no bytes move
            self._decref(t, entry.slot)
            entry.tier, entry.slot, entry.backup = nxt, entry.backup, None
            entry.lossy = entry.lossy or self.tiers[nxt].lossy
        if to_copy:
            if nxt is not None:
                room = self.make_room(nxt, len(to_copy))
                # Victims come out least valuable first: keep the later (more valuable) ones.
                dropped, moving = to_copy[:len(to_copy) - room], to_copy[len(to_copy) - room:]
                # Dropping in the lower tier may have dropped some victims as descendants.
                dropped += self._move([e for e in moving if e.key in self.index], nxt)
            else:
                dropped = to_copy
            for entry in dropped:
                if entry.key in self.index:
                    self._drop(entry, evicted=True)
        return max(0, min(n, tier.cache_free))

    def _move(self, entries: list[BlockEntry], dst_t: int) -> list[BlockEntry]:
        """Move blocks (all in one source tier, already out of its policy) to ``dst_t``.

        Returns the blocks that could not be moved (an I/O error on the destination, which
        is then marked degraded): the caller drops them -- a cache loses a block, it never
        keeps a half-written one.
        """
        if not entries:
            return []
        src_t = entries[0].tier
        src = self.tiers[src_t]
        dst = self.tiers[dst_t]
        dst_slots = dst.pool.allocate_many(len(entries))
        corrupt: list[BlockEntry] = []
        try:
            transfer(src.arena, [e.slot for e in entries], dst.arena, dst_slots, keys=[e.key for e in entries],
                     parents=[e.parent for e in entries])
        except CorruptSlotError as exc:  # bytes changed in shared memory: those blocks are lost, not moved
            bad = set(exc.slots)
            log.error("dropped %d block(s) whose shared-memory bytes failed their checksum", len(bad))
            self.corrupt_dropped += len(bad)
            keep = [(e, s) for e, s in zip(entries, dst_slots) if e.slot not in bad]
            corrupt = [e for e in entries if e.slot in bad]
            for e, s in zip(entries, dst_slots):
                if e.slot in bad:
                    self._decref(dst_t, s)
            entries, dst_slots = [e for e, _ in keep], [s for _, s in keep]
        except OSError as exc:
            dst.pool.free_many(dst_slots)
            self.fail(dst_t, exc)
            return entries
        for entry, slot in zip(entries, dst_slots):
            self._decref(src_t, entry.slot)
            entry.tier, entry.slot = dst_t, slot
            entry.lossy = entry.lossy or dst.lossy
            if not (dst_t == self.disk and entry.key in dst.policy):
                dst.policy.insert(entry.key, 1, None, entry.parent)
        if dst_t > src_t:
            dst.counters.demotions_in += len(entries)
        else:
            dst.counters.promotions_in += len(entries)
        return corrupt

    def add(self, keys: Sequence[bytes], parents: Sequence[bytes | None], src: torch.Tensor, t: int = 0, *,
            reserved: bool = False) -> int:
        """Store new blocks (rows of ``src``, in prefix order) starting at tier ``t``.

        The leading blocks go to tier ``t`` as far as room can be made there; the rest spill
        to the tiers below (a put larger than the top tier still lands whole). Returns how
        many leading blocks were stored (fewer only when every tier is full of pinned blocks).
        """
        if not keys:
            return 0
        if self.durable and t != self.disk and not reserved:
            # Room on disk first, before any of these blocks exist: their write-through then
            # never evicts their own prefix, and what cannot be durable is not stored at all.
            room = 0 if self.tiers[self.disk].degraded else self.make_room(self.disk, len(keys))
            keys, parents, src = keys[:room], parents[:room], src[:room]
            if not room:
                return 0
        if self.tiers[t].degraded:
            nxt = self._next(t)
            return self.add(keys, parents, src, nxt, reserved=True) if nxt is not None else 0
        n = self.make_room(t, len(keys))
        if n:
            tier = self.tiers[t]
            slots = tier.pool.allocate_many(n)
            try:
                tier.write(slots, src[:n], keys[:n], parents[:n])
            except OSError as exc:
                tier.pool.free_many(slots)
                self.fail(t, exc)
                nxt = self._next(t)
                return self.add(keys, parents, src, nxt, reserved=True) if nxt is not None else 0
            except BaseException:
                tier.pool.free_many(slots)
                raise
            self.register(keys[:n], parents[:n], t, slots)
        nxt = self._next(t)
        if n < len(keys) and nxt is not None:
            n += self.add(keys[n:], parents[n:], src[n:], nxt, reserved=True)
        return n

    def register(self, keys: Sequence[bytes], parents: Sequence[bytes | None], t: int,
                 slots: Sequence[int]) -> list[BlockEntry]:
        """Index new blocks whose bytes are already in ``slots`` of tier ``t`` (the caller
        allocated them); write them through to disk when durable. Returns the entries."""
        now = self.clock()
        tier = self.tiers[t]
        entries = [BlockEntry(k, p, t, s, last_access=now, lossy=tier.lossy) for k, p, s in zip(keys, parents, slots)]
        # Insert deepest first so that, for recency-based policies, a parent always looks
        # more recently used than its children: tails go before the prefixes they extend.
        for entry in reversed(entries):
            self.index[entry.key] = entry
            tier.policy.insert(entry.key, 1, None, entry.parent)
        for entry in entries:
            parent = self.index.get(entry.parent) if entry.parent is not None else None
            if parent is not None:
                parent.children.add(entry.key)
        if self.durable and t != self.disk:
            self._write_backups(entries)
        return entries

    def _write_backups(self, entries: list[BlockEntry]) -> None:
        """Write new memory blocks through to disk; drop those that cannot be made durable
        (see the module docstring), so the caller's cached-prefix count says what is durable."""
        disk = self.tiers[self.disk]
        wanted = entries
        room = 0 if disk.degraded else self.make_room(self.disk, len(entries))
        entries = [e for e in entries[:room] if e.key in self.index and e.tier != self.disk and e.backup is None]
        slots = disk.pool.allocate_many(len(entries))
        by_tier: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            by_tier.setdefault(e.tier, []).append(i)
        failed: set[int] = set()  # positions in ``entries``
        for t, idx in by_tier.items():
            try:
                transfer(self.tiers[t].arena, [entries[i].slot for i in idx], disk.arena, [slots[i] for i in idx],
                         keys=[entries[i].key for i in idx], parents=[entries[i].parent for i in idx])
            except CorruptSlotError as exc:  # memory bytes that fail their checksum: not stored
                bad = set(exc.slots)
                self.corrupt_dropped += len(bad)
                failed.update(i for i in idx if entries[i].slot in bad)
            except OSError as exc:
                self.fail(self.disk, exc)
                failed.update(idx)
        for i, (entry, slot) in enumerate(zip(entries, slots)):
            if i in failed:
                self._decref(self.disk, slot)  # never indexed: its header is zeroed again
            else:
                entry.backup = slot
                disk.policy.insert(entry.key, 1, None, entry.parent)
        # Not durable: not cached either (the put's result stops before them).
        self.drop([e for e in wanted if e.key in self.index and e.tier != self.disk and e.backup is None])

    def promote(self, entries: list[BlockEntry], rows: torch.Tensor) -> int:
        """Move blocks from lower tiers to the top tier, writing ``rows`` (their bytes,
        already read) instead of reading them again. Returns how many moved. When durable,
        a promoted block's disk copy stays as its backup."""
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
        top.write(slots, rows[[i for i, _ in keep]], [e.key for _, e in keep], [e.parent for _, e in keep])
        for (_, entry), slot in zip(keep, slots):
            if self.durable and entry.tier == self.disk:
                entry.backup = entry.slot  # stays in the disk policy as the durable copy
            else:
                self.tiers[entry.tier].policy.remove(entry.key)
                self._decref(entry.tier, entry.slot)
            entry.tier, entry.slot = 0, slot
            top.policy.insert(entry.key, 1, None, entry.parent)
        top.counters.promotions_in += len(keep)
        return len(keep)

    def restore(self, records: Sequence[SlotRecord], present: Collection[bytes] = ()) -> int:
        """Rebuild the disk tier's index from a reopened slab's records (oldest first).

        A record whose parent is neither recovered here nor in ``present`` (keys another
        payload's manager recovered: a block kept only as activations still links its
        children's KV into the prefix) is unreachable and is released. Returns how many
        blocks were restored. O(records).
        """
        if self.disk is None or not records:
            return 0
        disk = self.tiers[self.disk]
        present = set(present)
        keys = {r.key for r in records} | present
        usable = [r for r in records if r.parent is None or r.parent in keys]
        # a chain is usable only if every ancestor is: drop descendants of missing parents
        changed = True
        while changed:
            keys = {r.key for r in usable} | present
            kept = [r for r in usable if r.parent is None or r.parent in keys]
            changed = len(kept) != len(usable)
            usable = kept
        disk.pool.claim([r.slot for r in usable])
        stale = sorted({r.slot for r in records} - {r.slot for r in usable})
        if stale:
            disk.arena.invalidate(stale)
        now = self.clock()
        for r in usable:
            self.index[r.key] = BlockEntry(r.key, r.parent, self.disk, r.slot, last_access=now, lossy=disk.lossy)
            disk.policy.insert(r.key, 1, None, r.parent)
        for r in usable:
            if r.parent is not None and r.parent in self.index:
                self.index[r.parent].children.add(r.key)
        return len(usable)

    # -- removal -----------------------------------------------------------------------
    def _drop(self, entry: BlockEntry, *, evicted: bool) -> None:
        """Forget a block (its policy entry in its own tier is already gone when
        ``evicted``) and the descendants that only it made reachable."""
        stack = [(entry, evicted)]
        while stack:
            e, already_out = stack.pop()
            tier = self.tiers[e.tier]
            if not already_out and e.key in tier.policy:  # an in-flight victim is already out
                tier.policy.remove(e.key)
            if e.backup is not None:
                disk = self.tiers[self.disk]
                if e.key in disk.policy:
                    disk.policy.remove(e.key)
                self._decref(self.disk, e.backup)
                e.backup = None
            del self.index[e.key]
            self._decref(e.tier, e.slot)
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
        """Drop every block not pinned; returns how many were dropped. Freed disk slots are
        invalidated in one batch (one sync with ``fsync="always"``)."""
        before = len(self.index)
        self._freed = []
        try:
            for entry in [e for e in self.index.values() if e.pins == 0]:
                if entry.key in self.index:
                    self._drop(entry, evicted=False)
        finally:
            freed, self._freed = self._freed, None
            if freed:
                self._invalidate(freed)
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
        self._decref(tier_index, slot)

    def pin_many(self, entries: Sequence[BlockEntry]) -> None:
        """:meth:`pin` of each entry, the slot counts in one vectorised step per tier."""
        by_tier: dict[int, list[int]] = {}
        for e in entries:
            self.tiers[e.tier].policy.pin(e.key)
            e.pins += 1
            by_tier.setdefault(e.tier, []).append(e.slot)
        for t, slots in by_tier.items():
            self.tiers[t].pool.incref_many(slots)

    def unpin_many(self, placed: Sequence[tuple[BlockEntry, int, int]]) -> None:
        """:meth:`unpin` of each ``(entry, tier, slot)`` taken by :meth:`pin_many`."""
        by_tier: dict[int, list[int]] = {}
        index = self.index
        for entry, t, slot in placed:
            entry.pins -= 1
            if entry.tier == t and entry.key in index:
                self.tiers[t].policy.unpin(entry.key)
            by_tier.setdefault(t, []).append(slot)
        for t, slots in by_tier.items():
            freed = self.tiers[t].pool.decref_many(slots)
            if freed and t == self.disk and self.durable:
                try:
                    self.tiers[t].arena.invalidate(freed)  # a freed slot must not come back after a restart
                except OSError as exc:
                    self.fail(t, exc)

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
            backups = [e for e in self.index.values() if e.backup is not None] if t == self.disk else []
            assert not backups or self.durable, "backup copies without durability"
            members = resident + backups
            assert len(tier.policy) == len(members), f"{tier.name}: policy holds {len(tier.policy)}, index {len(members)}"
            assert all(e.key in tier.policy for e in members), f"{tier.name}: index entry missing from policy"
            slots = [e.slot for e in resident] + [e.backup for e in backups]
            assert len(set(slots)) == len(slots), f"{tier.name}: two blocks share a slot"
            for e in resident:
                assert tier.pool.refcount(e.slot) == 1 + e.pins, f"{tier.name}: slot {e.slot} refcount mismatch"
                assert tier.policy.is_pinned(e.key) == (e.pins > 0), f"{tier.name}: pin state mismatch"
            for e in backups:
                assert e.tier != t and tier.pool.refcount(e.backup) == 1, f"{tier.name}: bad backup of a block"
            assert tier.pool.used_count == len(members) + tier.staged, \
                f"{tier.name}: {tier.pool.used_count} slots used for {len(members)} blocks + {tier.staged} staged"
            assert len(members) <= tier.capacity, f"{tier.name}: {len(members)} blocks over capacity"
        for e in self.index.values():
            for c in e.children:
                assert c in self.index and self.index[c].parent == e.key, "child link broken"
