"""``StorePort``: the store's port for another process (``store.port``).

Why it exists: an engine in another process cannot be handed tensors; it can be handed
*slots* of a shared-memory arena it has mapped (``kvstore.sidecar.shm_plane``). The port is
the lease/staging protocol that lets such a process read and write a store's slots in
place, with the store still owning the index, the policies and the slots. Only the sidecar
and the store's own reserved writes (``put_async``, ``save_from``) use it; it is not part
of the embedded API (docs/architecture.md, "Over the sidecar").

The protocol has two phases, as vLLM's ``kv_offload`` cuts prepare_load/complete_load and
prepare_store/complete_store:

- **read**: :meth:`StorePort.acquire` pins a fully cached prefix in place and returns a
  :class:`Lease` (tier index and slot per block); the other process copies the slots and
  verifies them against :meth:`StorePort.lease_checksums`; :meth:`StorePort.release`
  unpins (and promotes lower-tier hits, as ``get`` does). A copy that fails its checksums
  is reported with :meth:`StorePort.report_corrupt`.
- **write**: :meth:`StorePort.reserve` holds slots for the blocks not yet cached (a
  :class:`Reservation`), the writer fills them, :meth:`StorePort.commit` makes them visible
  (or :meth:`StorePort.abort` gives them back). Staging is the one-round-trip variant: a
  client holds spare slots lent by :meth:`StorePort.stage` ahead of its puts and names them
  in :meth:`StorePort.put_staged`; :meth:`StorePort.unstage` takes back what it no longer holds.

Between the phases the claims are protected: a leased block is pinned (never a victim; its
slot's refcount keeps the slot), and reserved or staged slots are allocated but invisible
to the index and the policies, so no lookup sees half-written KV and no eviction reuses a
slot another process is writing. Every claim ends exactly once (release/commit/abort are
idempotent); the sidecar's reaper ends the claims of dead clients.

The port is the store's friend: it works on the store's index and counters under the
store's lock, through the surface :class:`PortedStore` names (``tests/kvstore/test_port.py``
checks it reaches no further). It holds the store weakly, so it never keeps a dropped store
(and its temporary slab files) alive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
import logging
import threading
from typing import Any, Protocol
import weakref

import numpy as np
import torch

from allocator import CorruptSlotError
from kvstore.config import StoreConfig
from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout
from kvstore.remote_tier import RemoteTier
from kvstore.tiers import BlockEntry, Tier, TierManager

log = logging.getLogger(__name__)

TokensLike = Sequence[int] | np.ndarray | torch.Tensor


class PortedStore(Protocol):
    """What the port may touch of its store: its index and tiers (``_tiers``), counters,
    lock, remote tier and key derivation. Nothing else of ``KVStore`` is the port's business."""

    config: StoreConfig
    layout: ModelLayout
    block_tokens: int
    adapter: Any
    _lock: threading.RLock
    _tiers: TierManager
    _counters: dict[str, int]
    _remote: RemoteTier | None
    _closed: bool
    _block_shape: tuple[int, ...]

    def _check_open(self) -> None: ...
    def _keys(self, tokens: TokensLike) -> tuple[np.ndarray, list[bytes]]: ...
    def _whole_block_keys(self, tokens: TokensLike) -> tuple[np.ndarray, list[bytes]]: ...
    def _refuse_lossy(self, exact: bool | None) -> bool: ...
    def _cached_prefix(self, keys: list[bytes], adapter: Any, refuse_lossy: bool = False) -> int: ...
    def _read_blocks(self, placed: list[tuple[BlockEntry, int, int]], rows: Any,
                     positions: Sequence[int] | None = None) -> list[BlockEntry]: ...
    def lookup(self, tokens: TokensLike, adapter: Any = None, *, exact: bool | None = None) -> int: ...


class Lease:
    """Blocks pinned for a client's read: ``blocks[i] = (tier index, slot)`` in prefix order."""

    __slots__ = ("placed", "blocks", "done")

    def __init__(self, placed: list[tuple[BlockEntry, int, int]]) -> None:
        self.placed = placed
        self.blocks = [(t, slot) for _, t, slot in placed]
        self.done = False


class Reservation:
    """Slots held for a client's write: new block ``positions[j]`` goes to ``slots[j]`` of ``tier``."""

    __slots__ = ("keys", "positions", "slots", "tier", "cached", "done")

    def __init__(self, keys: list[bytes], positions: list[int], slots: list[int], tier: int) -> None:
        self.keys, self.positions, self.slots, self.tier = keys, positions, slots, tier
        self.cached = 0
        self.done = not positions


class StorePort:
    """The lease/staging protocol of one store (see the module docstring); ``store.port``.

    Tiers are named by index, in tier order (:meth:`tier_arenas`). Each call takes the
    store's lock for its index work only; remote-tier I/O runs outside it.
    """

    Lease = Lease
    Reservation = Reservation

    def __init__(self, store: PortedStore) -> None:
        self._store: PortedStore = weakref.proxy(store)

    # -- what another process maps ------------------------------------------------------
    def tier_arenas(self) -> list[tuple[str, Any]]:
        """``(tier name, arena)`` in tier order (the index a lease's blocks refer to). O(tiers)."""
        return [(t.name, t.arena) for t in self._store._tiers.tiers]

    def lookup_nowait(self, tokens: TokensLike, *, exact: bool | None = None) -> int | None:
        """``lookup`` if the lock is free right now, else None (the caller defers it; also
        None when the answer needs a remote-tier round trip). O(tokens)."""
        store = self._store
        with self.nowait() as held:
            if not held:
                return None
            if store._remote is not None:  # a remote lookup is a network round trip: defer unless all local
                _, keys = store._keys(tokens)
                if store._closed or store._cached_prefix(keys, store.adapter) < len(keys):
                    return None
            return store.lookup(tokens, exact=exact)

    # -- reads: lease, copy, release ------------------------------------------------------
    def acquire(self, tokens: TokensLike, tiers: Sequence[int], *, exact: bool | None = None) -> Lease | None:
        """Pin a fully cached whole-block prefix whose blocks all sit in ``tiers``.

        None when a block is missing or elsewhere, or lossy where ``exact`` (as ``get``)
        refuses it (the caller falls back to ``get``, which counts and raises the miss or
        promotes). Counts as a get; O(blocks).
        """
        store = self._store
        store._check_open()
        _, keys = store._whole_block_keys(tokens)
        allowed = set(tiers)
        refuse_lossy = store._refuse_lossy(exact)
        with store._lock:
            store._check_open()
            entries = [store._tiers.index.get(k) for k in keys]
            if any(e is None or e.tier not in allowed or (refuse_lossy and e.lossy) for e in entries):
                return None
            store._counters["gets"] += 1
            store._counters["hits"] += len(entries)
            store._tiers.touch(entries)
            placed = [(e, e.tier, e.slot) for e in entries]
            for e in entries:
                store._tiers.pin(e)
            return Lease(placed)

    @contextmanager
    def nowait(self) -> Iterator[bool]:
        """Hold the store's lock if it is free right now: yields True (held until the block
        ends; the store's own calls re-enter it), else False at once. The sidecar's loop
        answers cheap requests under it, and hands them to a worker when it yields False,
        so the loop never waits on a lock a worker holds through a disk read. O(1)."""
        lock = self._store._lock
        held = lock.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                lock.release()

    def release(self, lease: Lease, *, read: bool = True) -> None:
        """Unpin a lease's blocks (idempotent). O(blocks), plus the promotion's bytes.
        ``read=False``: the lease was refused before anyone could read it -- unpin only
        (no promotion, no hits counted), O(blocks)."""
        store = self._store
        with store._lock:
            if lease.done:
                return
            lease.done = True
            if not read:
                for e, t, slot in lease.placed:
                    store._tiers.unpin(e, t, slot)
                return
            # As ``get``: blocks read from a lower tier are promoted (bytes read while pinned).
            low = [p for p in lease.placed if p[1] > 0] if store.config.promote_on_hit and not store._closed else []
            rows = torch.empty((len(low), *store._block_shape), dtype=store.layout.dtype)
            if low:
                store._read_blocks(low, rows)
            for e, t, slot in lease.placed:
                store._tiers.unpin(e, t, slot)
                store._tiers.tiers[t].counters.hits += 1
            store._counters["get_blocks"] += len(lease.placed)
            if low:
                store._tiers.promote([e for e, _, _ in low], rows)

    def lease_checksums(self, lease: Lease) -> np.ndarray:
        """The recorded checksums of a lease's blocks (what a client verifies its copy
        against; 0 for a block in an arena that keeps none). O(blocks)."""
        arenas = [getattr(a, "checksums", None) for _, a in self.tier_arenas()]
        return np.array([arenas[t][slot] if arenas[t] is not None else 0 for t, slot in lease.blocks],
                        dtype=np.uint64)

    def report_corrupt(self, lease: Lease, positions: Sequence[int]) -> int:
        """A client's copy of these lease blocks failed their checksums: re-check the shared
        slots here and drop the blocks that really are corrupt. Returns how many. O(bytes)."""
        store = self._store
        with store._lock:
            arenas = self.tier_arenas()
            bad = []
            for p in sorted(set(positions)):
                if not 0 <= p < len(lease.placed):
                    continue
                e, t, slot = lease.placed[p]
                arena = arenas[t][1]
                if hasattr(arena, "verify") and arena.verify([slot]):
                    bad.append(e)
            if bad:
                store._counters["corrupt_blocks"] += len(bad)
                log.error("dropped %d shared block(s) whose bytes changed after they were written", len(bad))
                store._tiers.drop(bad)
            return len(bad)

    # -- writes: reserve, fill, commit (or abort) ----------------------------------------
    def reserve(self, tokens: TokensLike, tier: int) -> Reservation | None:
        """Hold slots of tier ``tier`` for the blocks of ``tokens`` not yet cached.

        None when room for all of them cannot be made there (the caller falls back to
        ``put``). A reservation with nothing to write is already done; its ``cached`` is the
        put's result. Counts as a put; O(blocks) plus the demotions that make room.
        """
        store = self._store
        store._check_open()
        _, keys = store._keys(tokens)
        with store._lock:
            store._check_open()
            index = store._tiers.index
            present = [index.get(k) for k in keys]
            new_pos = [i for i, e in enumerate(present) if e is None]
            slots: list[int] = []
            if new_pos:
                if store._tiers.make_room(tier, len(new_pos)) < len(new_pos):
                    return None
                slots = store._tiers.tiers[tier].pool.allocate_many(len(new_pos))
            store._counters["puts"] += 1
            store._counters["dedup_blocks"] += len(keys) - len(new_pos)
            res = Reservation(keys, new_pos, slots, tier)
            if res.done:  # nothing to write: record the use now (else at commit, as put orders it)
                store._tiers.touch([e for e in present if e is not None and e.key in index])
                res.cached = self._cached_blocks(keys) * store.block_tokens
        self._remote_recheck(keys, present)
        return res

    def commit(self, res: Reservation, sums: np.ndarray | None = None) -> int:
        """Make a reservation's written blocks visible; returns the cached prefix length in
        tokens, like ``put``. Blocks someone else committed meanwhile are freed. O(blocks).

        ``sums``: the writer's checksums of what it wrote into ``res.slots`` (required when
        the tier's arena keeps checksums: other processes can write shared slots)."""
        store = self._store
        with store._lock:
            if res.done:
                return res.cached
            tiers, index = store._tiers, store._tiers.index
            tier = tiers.tiers[res.tier]
            if hasattr(tier.arena, "set_checksums"):
                if sums is None or len(sums) != len(res.slots):
                    raise InvalidInputError(f"commit needs the checksums of the {len(res.slots)} written slot(s)")
                tier.arena.set_checksums(res.slots, sums)
            res.done = True
            fresh: list[int] = []
            for i, slot in zip(res.positions, res.slots):
                if res.keys[i] in index or store._closed:  # someone else committed it meanwhile
                    tier.pool.decref(slot)
                else:
                    fresh.append(i)
            slot_of = dict(zip(res.positions, res.slots))
            added = tiers.register([res.keys[i] for i in fresh], [res.keys[i - 1] if i > 0 else None for i in fresh],
                                   res.tier, [slot_of[i] for i in fresh])
            store._counters["put_blocks"] += len(added)
            new = set(res.positions)
            tiers.touch([index[k] for i, k in enumerate(res.keys) if i not in new and k in index])
            res.cached = self._cached_blocks(res.keys) * store.block_tokens
            rows = self._rows_for_remote(tier, [slot_of[i] for i in fresh])
        if rows is not None:
            store._remote.put([res.keys[i] for i in fresh], rows)
        return res.cached

    def abort(self, res: Reservation) -> None:
        """Give a reservation's slots back (a client that died or gave up). Idempotent; O(slots)."""
        store = self._store
        with store._lock:
            if res.done:
                return
            res.done = True
            store._tiers.tiers[res.tier].pool.free_many(res.slots)
            store._counters["rejected_blocks"] += len(res.slots)

    # -- staging: slots a client holds ahead of its puts (one round trip per put) -------
    def stage(self, tier: int, n: int) -> list[int]:
        """Lend up to ``n`` of tier ``tier``'s spare slots (beyond the cache's capacity) to a
        client to write into before it names them in :meth:`put_staged`. O(n)."""
        store = self._store
        store._check_open()
        with store._lock:
            store._check_open()
            t = store._tiers.tiers[tier]
            got = min(n, t.spare - t.staged, t.pool.free_count)
            if got <= 0:
                return []
            t.staged += got
            return t.pool.allocate_many(got)

    def staging_spare(self, tier: int) -> int:
        """How many slots of tier ``tier`` can be lent as staging (beyond its capacity). O(1)."""
        return self._store._tiers.tiers[tier].spare

    def unstage(self, tier: int, slots: Sequence[int]) -> None:
        """Give staged slots back (a client that closed, died or went stale). O(len(slots))."""
        store = self._store
        with store._lock:
            t = store._tiers.tiers[tier]
            t.pool.free_many(slots)
            t.staged -= len(slots)

    def put_staged(self, tokens: TokensLike, tier: int, slots: Sequence[int],
                   sums: np.ndarray) -> tuple[int, list[int]]:
        """The put of a client that already wrote block ``i`` of ``tokens`` into staged slot
        ``slots[i]`` of tier ``tier`` and hashed it (``sums[i]``, from its own source).

        New blocks are indexed where they lie (no copy); blocks already cached leave their
        slot staged. Returns (cached prefix length in tokens, like ``put``; slots consumed).
        O(blocks), plus the write-through with ``persist`` (which verifies the checksums).
        """
        store = self._store
        store._check_open()
        _, keys = store._keys(tokens)
        if len(slots) != len(keys) or len(sums) != len(keys):
            raise InvalidInputError(f"{len(keys)} block(s) need as many staged slots and checksums, got "
                                    f"{len(slots)} and {len(sums)}")
        with store._lock:
            store._check_open()
            store._counters["puts"] += 1
            index = store._tiers.index
            present = [index.get(k) for k in keys]
            new = [i for i, e in enumerate(present) if e is None]
            store._counters["dedup_blocks"] += len(keys) - len(new)
            t = store._tiers.tiers[tier]
            # Staged slots become cached ones: demote as many blocks as are new (pinned ones
            # stay; the blocks that still do not fit are not stored and keep their slots staged).
            fit = store._tiers.make_room(tier, len(new))
            new = new[:fit]
            used = [slots[i] for i in new]
            t.arena.set_checksums(used, sums[new])
            t.staged -= len(used)
            added = store._tiers.register([keys[i] for i in new], [keys[i - 1] if i > 0 else None for i in new],
                                          tier, used)
            store._counters["put_blocks"] += len(added)
            store._tiers.touch([e for e in present if e is not None and e.key in index])
            cached = self._cached_blocks(keys) * store.block_tokens
            rows = self._rows_for_remote(t, used)  # what the client wrote in place goes remote too
        if rows is not None:
            store._remote.put([keys[i] for i in new], rows)
        self._remote_recheck(keys, present)
        return cached, used

    # -- helpers ---------------------------------------------------------------------------
    def _cached_blocks(self, keys: list[bytes]) -> int:
        """Leading ``keys`` whose KV is indexed. Under the lock; O(blocks)."""
        index = self._store._tiers.index
        n = 0
        while n < len(keys) and keys[n] in index:
            n += 1
        return n

    def _remote_recheck(self, keys: list[bytes], present: list[BlockEntry | None]) -> None:
        """As ``put`` does for every block: the blocks a client's put found already cached
        (so it sent no bytes for them) get the remote tier's check too, and those Redis lost
        are refilled from the local copy. No lock held (a network round trip)."""
        remote = self._store._remote
        if remote is None:
            return
        held = [keys[i] for i, e in enumerate(present) if e is not None]
        if held:
            remote.put(held, lambda pos: self._local_rows([held[i] for i in pos]))

    def _local_rows(self, keys: list[bytes]) -> torch.Tensor | None:
        """The KV rows of locally held ``keys`` (for the remote tier to refill what Redis
        lost), or None when one is no longer held or fails its checksum. O(bytes)."""
        store = self._store
        rows = torch.empty((len(keys), *store._block_shape), dtype=store.layout.dtype)
        with store._lock:
            by_tier: dict[int, tuple[list[int], list[int]]] = {}
            for i, k in enumerate(keys):
                e = store._tiers.index.get(k)
                if e is None:
                    return None
                pos, slots = by_tier.setdefault(e.tier, ([], []))
                pos.append(i)
                slots.append(e.slot)
            for t, (pos, slots) in by_tier.items():
                part = torch.empty((len(pos), *store._block_shape), dtype=store.layout.dtype)
                try:
                    store._tiers.tiers[t].arena.read(slots, part)
                except CorruptSlotError:
                    return None
                rows[pos] = part
        return rows

    def _rows_for_remote(self, tier: Tier, slots: list[int]) -> torch.Tensor | None:
        """A private, checked copy of what a client wrote in place into ``slots``, for the
        remote tier (None without one, or when the bytes already fail their checksums: those
        blocks are caught and dropped on their first read). Under the lock. O(bytes)."""
        store = self._store
        if store._remote is None or not slots:
            return None
        rows = torch.empty((len(slots), *store._block_shape), dtype=store.layout.dtype)
        try:
            tier.arena.read(slots, rows)
        except CorruptSlotError:
            return None
        return rows
