"""``KVStore``: the embedded API (DESIGN.md) over the tier manager.

Thread safety: one re-entrant lock guards the index and the tiers. ``get`` pins its blocks
under the lock, copies them out *without* holding it (disk reads and large copies do not
stall other callers), then takes the lock again to unpin and promote.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import os
from pathlib import Path
import re
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

from allocator import CorruptSlotError, DiskArena, FileOps, MemoryArena, default_device, slots_for_bytes
from allocator.disk import KIND_KV, SlabInUseError, SlabMismatchError, slab_file_bytes
from eviction import make_policy
from kvstore.config import TIERS, StoreConfig
from kvstore.errors import (BlockNotFoundError, ConfigError, InvalidInputError, StoreClosedError)
from kvstore.hashing import block_keys, namespace_salt, tokens_to_array
from kvstore.layout import ModelLayout
from kvstore.tiers import BlockEntry, Tier, TierManager

log = logging.getLogger(__name__)

TokensLike = Sequence[int] | np.ndarray | torch.Tensor


class KVStore:
    """A paged, tiered store of KV blocks keyed by token prefix. See DESIGN.md.

    ``put``/``lookup``/``get`` cost O(tokens) for hashing plus O(blocks) index work plus the
    bytes moved; none depends on how many blocks are stored.
    """

    def __init__(self, config: StoreConfig, *, clock=time.monotonic, arena_factory=None,
                 file_ops: FileOps | None = None) -> None:
        self._file_ops = file_ops  # injectable disk operations (fault-injection tests)
        self._arena_factory = arena_factory  # sidecar: (tier, num_slots, slot_bytes, device) -> Arena
        if config.layout is None:
            raise ConfigError("StoreConfig.layout is required")
        self.config = config
        self.layout: ModelLayout = config.layout
        self.block_tokens = config.block_tokens
        self.block_bytes = self.layout.kv_block_bytes(self.block_tokens)
        self._block_shape = (self.layout.num_layers, 2, self.block_tokens, self.layout.num_kv_heads,
                             self.layout.head_dim)
        self._salt = namespace_salt(config.namespace, repr(sorted(self.layout.to_dict().items())),
                                    self.block_tokens)
        self._lock = threading.RLock()
        self._closed = False
        self._tmpdir: str | None = None
        self.device = torch.device(config.device) if config.device else default_device()
        self._tiers = TierManager(self._build_tiers(), clock=clock, durable=config.persist)
        self.recovered_blocks = 0
        disk = self._tiers.tiers[-1].arena
        if config.persist and isinstance(disk, DiskArena) and disk.recovered:
            self.recovered_blocks = self._tiers.restore([r for r in disk.recovered if r.kind == KIND_KV])
            log.info("recovered %d blocks from %s", self.recovered_blocks, disk.path)
        self._counters = dict(lookups=0, puts=0, gets=0, hits=0, misses=0, put_blocks=0,
                              dedup_blocks=0, get_blocks=0, corrupt_blocks=0, rejected_blocks=0)

    # -- construction ------------------------------------------------------------------
    def _build_tiers(self) -> list[Tier]:
        cfg = self.config
        tiers: list[Tier] = []
        for name in TIERS:
            capacity = getattr(cfg, f"{name}_bytes")
            if capacity == 0:
                continue
            if capacity < self.block_bytes:
                raise ConfigError(f"{name}_bytes={capacity} is below one block ({self.block_bytes} bytes "
                                  f"for block_tokens={self.block_tokens}); use 0 to disable the tier")
            if name == "disk":
                arena = self._make_disk_arena(capacity)
            else:
                dev = self.device if name == "device" else torch.device("cpu")
                arena = self._make_memory_arena(name, capacity // self.block_bytes, dev)
            try:
                policy = make_policy(cfg.policy_for(name), arena.num_slots)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            tiers.append(Tier(name, arena, policy))
        if not tiers:
            raise ConfigError("every tier is disabled: set device_bytes, host_bytes or disk_bytes")
        return tiers

    def _make_disk_arena(self, capacity: int) -> DiskArena:
        cfg = self.config
        if cfg.persist and cfg.disk_path is None:
            raise ConfigError("persist = true needs a disk_path (a temporary directory would not survive)")
        if cfg.disk_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="kvstore-")
            directory = Path(self._tmpdir)
        else:
            directory = Path(cfg.disk_path)
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"disk_path {directory} cannot be created: {exc.strerror}") from None
            if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
                raise ConfigError(f"disk_path {directory} is not a writable directory")
        num_slots = slots_for_bytes(capacity, self.block_bytes)
        if num_slots == 0:
            raise ConfigError(f"disk_bytes={capacity} is below one block on disk "
                              f"({slab_file_bytes(1, self.block_bytes)} bytes with header and alignment)")
        need = slab_file_bytes(num_slots, self.block_bytes)
        safe_ns = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.namespace)[:64]
        path = directory / f"{safe_ns}-kv.slab"
        existing = path.stat().st_size if path.exists() else 0
        free = shutil.disk_usage(directory).free + existing
        if free < need:
            raise ConfigError(f"disk_path {directory} has {free} bytes free; disk_bytes needs {need}")
        try:
            return DiskArena(path, num_slots, self.block_bytes, fsync=cfg.fsync,
                             fsync_interval_s=cfg.fsync_interval_s, persist=cfg.persist,
                             file_ops=self._file_ops)
        except SlabInUseError as exc:
            raise ConfigError(f"{exc.strerror}: each store needs its own disk_path") from None
        except SlabMismatchError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            if not cfg.persist:
                path.unlink(missing_ok=True)
            raise ConfigError(f"cannot create slab file {path} ({need} bytes): {exc.strerror or exc}") from None

    # -- validation --------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    def _keys(self, tokens: TokensLike) -> tuple[np.ndarray, list[bytes]]:
        arr = tokens_to_array(tokens)
        return arr, block_keys(arr, self.block_tokens, self._salt)

    def _check_kv(self, kv: Any, num_tokens: int) -> None:
        if not isinstance(kv, torch.Tensor):
            raise InvalidInputError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != self.layout.dtype:
            raise InvalidInputError(f"kv dtype is {kv.dtype}, the layout says {self.layout.dtype}")
        expected = self.layout.kv_shape(num_tokens)
        if tuple(kv.shape) != expected:
            raise InvalidInputError(f"kv shape is {tuple(kv.shape)}, expected {expected} "
                                    "[layers, 2, len(tokens), kv_heads, head_dim]")

    # -- API ---------------------------------------------------------------------------
    def put(self, tokens: TokensLike, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int:
        """Store the full blocks of ``tokens``' KV; returns how many leading tokens are now cached.

        Blocks already cached are not written again (their use is recorded). If the store
        cannot make room for every new block (all blocks in the way are being read), it
        stores the leading ones that fit. A partial trailing block is ignored.
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        self._check_kv(kv, len(arr))
        if activations is not None:
            raise NotImplementedError("activations are not stored by this build yet")
        if not keys:
            return 0
        bt = self.block_tokens
        nb = len(keys)
        blocks = kv[:, :, : nb * bt].unflatten(2, (nb, bt)).permute(2, 0, 1, 3, 4, 5)  # [nb, L, 2, bt, H, D]
        with self._lock:
            self._check_open()
            self._counters["puts"] += 1
            index = self._tiers.index
            present = [index.get(k) for k in keys]
            new_pos = [i for i, e in enumerate(present) if e is None]
            self._counters["dedup_blocks"] += nb - len(new_pos)
            stored = 0
            if new_pos:
                src = blocks if len(new_pos) == nb else blocks[new_pos]
                parents = [keys[i - 1] if i > 0 else None for i in new_pos]
                stored = self._tiers.add([keys[i] for i in new_pos], parents, src)
                self._counters["put_blocks"] += stored
                self._counters["rejected_blocks"] += len(new_pos) - stored
            self._tiers.touch([e for e in present if e is not None and e.key in index])
            cached = 0
            while cached < nb and keys[cached] in index:
                cached += 1
            return cached * bt

    def lookup(self, tokens: TokensLike) -> int:
        """Length in tokens of the longest cached prefix of ``tokens`` (a multiple of block_tokens)."""
        self._check_open()
        _, keys = self._keys(tokens)
        with self._lock:
            self._check_open()
            index = self._tiers.index
            n = 0
            while n < len(keys) and keys[n] in index:
                n += 1
            self._counters["lookups"] += 1
            self._counters["hits"] += n
            self._counters["misses"] += len(keys) - n
            return n * self.block_tokens

    def get(self, tokens: TokensLike, device: torch.device | str | None = None) -> torch.Tensor:
        """The KV of ``tokens`` (all full blocks), bytes equal to what was put.

        ``tokens`` must be a whole number of blocks and fully cached; otherwise
        :class:`BlockNotFoundError` is raised and nothing is returned.
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        bt = self.block_tokens
        if len(arr) % bt:
            raise InvalidInputError(f"get needs whole blocks: {len(arr)} tokens is not a multiple of "
                                    f"block_tokens={bt} (use lookup() for the cached length)")
        out_device = torch.device(device) if device is not None else self.device
        with self._lock:
            self._check_open()
            self._counters["gets"] += 1
            entries: list[BlockEntry] = []
            for k in keys:
                e = self._tiers.index.get(k)
                if e is None:
                    break
                entries.append(e)
            if len(entries) < len(keys):
                self._counters["misses"] += len(keys) - len(entries)
                self._counters["hits"] += len(entries)
                raise BlockNotFoundError(f"only {len(entries) * bt} of {len(arr)} tokens are cached "
                                         f"(block {len(entries)} is missing)")
            self._counters["hits"] += len(entries)
            self._tiers.touch(entries)
            placed = [(e, e.tier, e.slot) for e in entries]
            for e in entries:
                self._tiers.pin(e)
        corrupt: list[BlockEntry] = []
        staging = torch.empty((len(keys), *self._block_shape), dtype=self.layout.dtype)
        try:
            corrupt = self._read_blocks(placed, staging)
        finally:
            with self._lock:
                for e, t, slot in placed:
                    self._tiers.unpin(e, t, slot)
                if corrupt:
                    self._counters["corrupt_blocks"] += len(corrupt)
                    log.error("dropped %d block(s) that failed their checksum", len(corrupt))
                    self._tiers.drop(corrupt)
                else:
                    self._counters["get_blocks"] += len(entries)
                    for _, t, _ in placed:
                        self._tiers.tiers[t].counters.hits += 1
                    if self.config.promote_on_hit and not self._closed:
                        low = [i for i, (_, t, _) in enumerate(placed) if t > 0]
                        if low:
                            self._tiers.promote([entries[i] for i in low], staging[low])
        if corrupt:
            raise BlockNotFoundError(f"{len(corrupt)} block(s) failed their checksum and were dropped; "
                                     "recompute them")
        out = staging.permute(1, 2, 0, 3, 4, 5).reshape(self.layout.kv_shape(len(keys) * bt))
        return out.to(out_device)

    def _read_blocks(self, placed: list[tuple[BlockEntry, int, int]], staging: torch.Tensor) -> list[BlockEntry]:
        """Copy every pinned block into ``staging[i]``; returns entries whose bytes are corrupt."""
        corrupt: list[BlockEntry] = []
        by_tier: dict[int, list[int]] = {}
        for i, (_, t, _) in enumerate(placed):
            by_tier.setdefault(t, []).append(i)
        for t, positions in by_tier.items():
            arena = self._tiers.tiers[t].arena
            slots = [placed[i][2] for i in positions]
            if len(positions) == len(placed):
                target = staging
            else:
                target = torch.empty((len(positions), *self._block_shape), dtype=self.layout.dtype)
            try:
                arena.read(slots, target)
            except CorruptSlotError as exc:
                bad = set(exc.slots)
                corrupt.extend(placed[i][0] for i in positions if placed[i][2] in bad)
            except OSError as exc:  # EIO and friends: the blocks are missing, the tier degraded
                with self._lock:
                    self._tiers.fail(t, exc)
                corrupt.extend(placed[i][0] for i in positions)
            if target is not staging:
                staging[positions] = target
        return corrupt

    def clear(self) -> int:
        """Drop every cached block (blocks being read survive until released)."""
        self._check_open()
        with self._lock:
            return self._tiers.clear()

    def stats(self) -> dict[str, Any]:
        """Counters and per-tier occupancy (a plain dict, JSON-serialisable)."""
        with self._lock:
            tiers = {}
            for tier in self._tiers.tiers:
                c = tier.counters
                tiers[tier.name] = {
                    "capacity_blocks": tier.pool.num_slots, "used_blocks": tier.pool.used_count,
                    "capacity_bytes": tier.pool.num_slots * self.block_bytes,
                    "used_bytes": tier.pool.used_count * self.block_bytes,
                    "policy": tier.policy.name, "device": str(tier.arena.device) if not tier.is_disk else "disk",
                    "hits": c.hits, "evictions": c.evictions, "demotions_in": c.demotions_in,
                    "promotions_in": c.promotions_in, "drops": c.drops,
                    "io_errors": c.io_errors, "degraded": tier.degraded,
                }
            total = lambda field: sum(t[field] for t in tiers.values())  # noqa: E731
            return {
                "namespace": self.config.namespace, "block_tokens": self.block_tokens,
                "block_bytes": self.block_bytes, "blocks": len(self._tiers.index),
                **self._counters,
                "evictions": total("evictions"),
                "demotions": sum(t["demotions_in"] for n, t in tiers.items()),
                "promotions": total("promotions_in"),
                "dropped": total("drops"), "orphans_dropped": self._tiers.orphans_dropped,
                "tiers": tiers,
            }

    def _check(self) -> None:
        with self._lock:
            self._tiers._check()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for tier in self._tiers.tiers:
                tier.arena.close()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: temp slab files must not outlive the store
        try:
            if not self._closed and self._tmpdir is not None:
                self.close()
        except Exception:
            pass

    # -- sidecar support (two-phase reads, shared memory) --
    # Used by kvstore.server: a memory tier may live in a shared-memory arena that clients
    # map (``arena_factory``); a read pins blocks in place and hands out their slots (a
    # lease) so the client copies them out itself; a write reserves slots, the client
    # fills them, and ``commit`` makes them visible. Reserved slots are invisible to the
    # index and the policies until committed, so a lookup never sees half-written KV.

    class Lease:
        """Blocks pinned for a client's read: ``blocks[i] = (tier index, slot)`` in prefix order."""

        __slots__ = ("placed", "blocks", "done")

        def __init__(self, placed: list) -> None:
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

    def _make_memory_arena(self, tier: str, num_slots: int, device: torch.device):
        if self._arena_factory is not None:
            arena = self._arena_factory(tier, num_slots, self.block_bytes, device)
            if arena is not None:
                return arena
        return MemoryArena(num_slots, self.block_bytes, device=device, pin=(tier == "host"))

    def tier_arenas(self) -> list[tuple[str, Any]]:
        """``(tier name, arena)`` in tier order (the index a lease's blocks refer to)."""
        return [(t.name, t.arena) for t in self._tiers.tiers]

    def lookup_nowait(self, tokens: TokensLike) -> int | None:
        """``lookup`` if the lock is free right now, else None (the caller defers it). O(tokens)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.lookup(tokens)
        finally:
            self._lock.release()

    def _cached_blocks(self, keys: list[bytes]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self._tiers.index:
            n += 1
        return n

    def acquire(self, tokens: TokensLike, tiers: Sequence[int]) -> "KVStore.Lease | None":
        """Pin a fully cached whole-block prefix whose blocks all sit in ``tiers``.

        None when a block is missing or elsewhere (the caller falls back to ``get``, which
        counts and raises the miss or promotes). Counts as a get; O(blocks).
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        bt = self.block_tokens
        if len(arr) % bt:
            raise InvalidInputError(f"get needs whole blocks: {len(arr)} tokens is not a multiple of "
                                    f"block_tokens={bt} (use lookup() for the cached length)")
        allowed = set(tiers)
        with self._lock:
            self._check_open()
            entries = [self._tiers.index.get(k) for k in keys]
            if any(e is None or e.tier not in allowed for e in entries):
                return None
            self._counters["gets"] += 1
            self._counters["hits"] += len(entries)
            self._tiers.touch(entries)
            placed = [(e, e.tier, e.slot) for e in entries]
            for e in entries:
                self._tiers.pin(e)
            return KVStore.Lease(placed)

    def release(self, lease: "KVStore.Lease") -> None:
        """Unpin a lease's blocks (idempotent). O(blocks)."""
        with self._lock:
            if lease.done:
                return
            lease.done = True
            # As ``get``: blocks read from a lower tier are promoted (bytes read while pinned).
            low = [p for p in lease.placed if p[1] > 0] if self.config.promote_on_hit and not self._closed else []
            rows = torch.empty((len(low), *self._block_shape), dtype=self.layout.dtype)
            if low:
                self._read_blocks(low, rows)
            for e, t, slot in lease.placed:
                self._tiers.unpin(e, t, slot)
                self._tiers.tiers[t].counters.hits += 1
            self._counters["get_blocks"] += len(lease.placed)
            if low:
                self._tiers.promote([e for e, _, _ in low], rows)

    def reserve(self, tokens: TokensLike, tier: int) -> "KVStore.Reservation | None":
        """Hold slots of tier ``tier`` for the blocks of ``tokens`` not yet cached.

        None when room for all of them cannot be made there (the caller falls back to
        ``put``). A reservation with nothing to write is already done; its ``cached`` is the
        put's result. Counts as a put; O(blocks) plus the demotions that make room.
        """
        self._check_open()
        _, keys = self._keys(tokens)
        with self._lock:
            self._check_open()
            index = self._tiers.index
            present = [index.get(k) for k in keys]
            new_pos = [i for i, e in enumerate(present) if e is None]
            slots: list[int] = []
            if new_pos:
                if self._tiers.make_room(tier, len(new_pos)) < len(new_pos):
                    return None
                slots = self._tiers.tiers[tier].pool.allocate_many(len(new_pos))
            self._counters["puts"] += 1
            self._counters["dedup_blocks"] += len(keys) - len(new_pos)
            res = KVStore.Reservation(keys, new_pos, slots, tier)
            if res.done:  # nothing to write: record the use now (else at commit, as put orders it)
                self._tiers.touch([e for e in present if e is not None and e.key in index])
                res.cached = self._cached_blocks(keys) * self.block_tokens
            return res

    def commit(self, res: "KVStore.Reservation") -> int:
        """Make a reservation's written blocks visible; returns the cached prefix length in
        tokens, like ``put``. Blocks someone else committed meanwhile are freed. O(blocks)."""
        with self._lock:
            if res.done:
                return res.cached
            res.done = True
            tiers, index = self._tiers, self._tiers.index
            tier = tiers.tiers[res.tier]
            fresh: list[int] = []
            for i, slot in zip(res.positions, res.slots):
                if res.keys[i] in index or self._closed:  # someone else committed it meanwhile
                    tier.pool.decref(slot)
                else:
                    fresh.append(i)
            slot_of = dict(zip(res.positions, res.slots))
            added = tiers.register([res.keys[i] for i in fresh], [res.keys[i - 1] if i > 0 else None for i in fresh],
                                   res.tier, [slot_of[i] for i in fresh])
            self._counters["put_blocks"] += len(added)
            new = set(res.positions)
            self._tiers.touch([index[k] for i, k in enumerate(res.keys) if i not in new and k in index])
            res.cached = self._cached_blocks(res.keys) * self.block_tokens
            return res.cached

    def abort(self, res: "KVStore.Reservation") -> None:
        """Give a reservation's slots back (a client that died or gave up). Idempotent."""
        with self._lock:
            if res.done:
                return
            res.done = True
            self._tiers.tiers[res.tier].pool.free_many(res.slots)
            self._counters["rejected_blocks"] += len(res.slots)

    def locate(self, tokens: TokensLike) -> list[str]:
        """Tier names of the cached prefix's blocks, in order (what the planner needs). O(blocks)."""
        self._check_open()
        _, keys = self._keys(tokens)
        with self._lock:
            out = []
            for k in keys:
                e = self._tiers.index.get(k)
                if e is None:
                    break
                out.append(self._tiers.tiers[e.tier].name)
            return out
