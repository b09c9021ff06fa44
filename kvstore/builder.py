"""Building a store's tiers: arenas, slab files, crash recovery, codecs on tiers and the
remote tier (``TierBuilder``; ``KVStore.__init__`` calls :func:`build_store_tiers`).

Why it is apart from the store: assembling tiers is a once-per-store job with its own
failure modes (a disk path that cannot be created, a slab another process holds or
another owner wrote, a codec that cannot run here, a Redis that refuses us) and its own
injection points (``arena_factory`` for the sidecar's shared-memory arenas, ``file_ops``
for fault injection, ``clock``). The store that results only reads and writes blocks.

Costs: O(tiers) arenas, plus creating or reopening the slab files (O(slots) on recovery,
which re-reads every record) and one connection to the remote tier.
"""

from __future__ import annotations

from collections.abc import Callable
import hashlib
import logging
import os
from pathlib import Path
import re
import shutil
import tempfile
from typing import Any, NamedTuple

import torch

from allocator import DiskArena, FileOps, MemoryArena, slots_for_bytes
from allocator.codec_arena import CodecArena, base_arena
from allocator.codecs import Codec, CodecUnavailableError, make_codec
from allocator.disk import KIND_ACT, KIND_KV, SlabIdentityError, SlabInUseError, SlabMismatchError, slab_file_bytes
from allocator.fileops import UnsafePathError
from eviction import make_policy
from kvstore.activations import ActDiskArena
from kvstore.config import TIERS, StoreConfig
from kvstore.errors import ConfigError, NamespaceOwnerError
from kvstore.remote_tier import RemoteTier
from kvstore.tiers import Tier, TierManager

log = logging.getLogger(__name__)

#: the sidecar's shared arenas: ``(tier, num_slots, slot_bytes, device) -> arena or None``
ArenaFactory = Callable[[str, int, int, torch.device], Any]


def slab_filename(namespace: str, form: str, owner: str | None = None) -> str:
    """The slab file of ``namespace``'s ``form`` ("kv" / "act") for ``owner`` (a CurveZMQ
    key's name; None without CURVE): a readable escape of the name plus a hash of the exact
    name and owner, so two names never share a file (``a/b`` and ``a_b``, two non-ASCII
    names, two long names with one start), nor two keys' namespaces of one name (each key
    has its own). The slab also records the exact name and owner and refuses another.
    O(len(namespace))."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", namespace)[:48]
    exact = namespace if owner is None else f"{namespace}\x00owner={owner}"
    digest = hashlib.sha256(exact.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"{safe}-{digest}-{form}.slab"


class BuiltTiers(NamedTuple):
    """What :func:`build_store_tiers` hands the store: its KV tiers, its activation tiers
    (None when ``act_share`` is 0), the remote tier (None without ``remote_url``), the
    temporary directory of its slabs (None with a ``disk_path``; the store removes it on
    close) and how many KV blocks crash recovery brought back."""

    tiers: TierManager
    acts: TierManager | None
    remote: RemoteTier | None
    tmpdir: str | None
    recovered_blocks: int


def build_store_tiers(config: StoreConfig, *, device: torch.device, owner: str | None, clock: Callable[[], float],
                      file_ops: FileOps | None = None, arena_factory: ArenaFactory | None = None) -> BuiltTiers:
    """Build every tier of a store of ``config`` on ``device`` (see :class:`TierBuilder`).
    On failure, what was built is closed (and a temporary slab directory removed) before
    the error propagates."""
    return TierBuilder(config, device=device, owner=owner, file_ops=file_ops, arena_factory=arena_factory).build(clock)


class TierBuilder:
    """Assembles one store's tiers from its config. ``owner`` (a CurveZMQ key name) is
    recorded in the slabs, so a restart reopens them for that owner only."""

    def __init__(self, config: StoreConfig, *, device: torch.device, owner: str | None,
                 file_ops: FileOps | None = None, arena_factory: ArenaFactory | None = None) -> None:
        if config.layout is None:
            raise ConfigError("StoreConfig.layout is required")
        self.config = config
        self.layout = config.layout
        self.block_tokens = config.block_tokens
        self.block_bytes = self.layout.kv_block_bytes(self.block_tokens)
        self.act_block_bytes = self.layout.act_block_bytes(self.block_tokens)
        self.block_shape = self.layout.block_shape(self.block_tokens)
        self.device = device
        self.owner = owner
        self.file_ops = file_ops  # injectable disk operations (fault-injection tests)
        self.arena_factory = arena_factory
        self.tmpdir: str | None = None  # made on first need: the KV and activation slabs share it

    def build(self, clock: Callable[[], float]) -> BuiltTiers:
        """KV tiers, activation tiers, crash recovery, then the remote tier. O(tiers) plus
        the slabs' recovery."""
        cfg = self.config
        tiers: TierManager | None = None
        acts: TierManager | None = None
        try:
            tiers = TierManager(self.build_tiers(), clock=clock, durable=cfg.persist)
            # Activations: a second manager (own slots, arenas, policies), keyed like the KV one.
            if cfg.act_share > 0:
                acts = TierManager(self.build_tiers("act"), clock=clock, durable=cfg.persist)
            recovered = self.recover(tiers, acts)
            remote = self.remote_tier(clock) if cfg.remote_url else None
        except BaseException:  # e.g. a wrong Redis password: release the local tiers built so far
            for mgr in (tiers, acts):
                for tier in mgr.tiers if mgr is not None else []:
                    tier.arena.close()
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        return BuiltTiers(tiers, acts, remote, self.tmpdir, recovered)

    def recover(self, tiers: TierManager, acts: TierManager | None) -> int:
        """With ``persist``: index the blocks the disk slabs recorded (a block's KV and its
        activations each know whether the other form survived). Returns the KV blocks
        recovered. O(records)."""
        cfg = self.config
        disk = tiers.tiers[-1].arena
        act_disk = acts.tiers[-1].arena if acts is not None else None
        act_records = act_disk.recovered if cfg.persist and isinstance(act_disk, DiskArena) else []
        kv_records = disk.recovered if cfg.persist and isinstance(base_arena(disk), DiskArena) else []
        if not (kv_records or act_records):
            return 0
        kv_records = [r for r in kv_records if r.kind == KIND_KV]
        act_records = [r for r in act_records if r.kind == KIND_ACT]
        recovered = tiers.restore(kv_records, present={r.key for r in act_records})
        if acts is not None:
            acts.restore(act_records, present={r.key for r in kv_records})
        log.info("recovered %d blocks from %s", recovered, getattr(disk, "path", "?"))
        return recovered

    def remote_tier(self, clock: Callable[[], float]) -> RemoteTier:
        """The shared tier below disk (``kvstore.remote_tier``), connected now."""
        cfg = self.config
        return RemoteTier(
            cfg.remote_url, layout_desc=repr(sorted(self.layout.to_dict().items())),
            block_tokens=self.block_tokens, block_shape=self.block_shape, dtype=self.layout.dtype,
            write=cfg.remote_write, ttl_s=cfg.remote_ttl_s, deadline_s=cfg.remote_deadline_s,
            queue_bytes=cfg.remote_queue_bytes, drain_s=cfg.remote_drain_s, clock=clock,
            codec=self.codec("remote"))

    def build_tiers(self, form: str = "kv") -> list[Tier]:
        """The tiers of one payload form: KV gets ``1 - act_share`` of each tier's bytes,
        activations ``act_share`` (a tier whose share is below one activation block holds none)."""
        cfg = self.config
        tiers: list[Tier] = []
        for name in TIERS:
            codec = self.codec(name) if form == "kv" else None
            slot = (self.block_bytes if form == "kv" else self.act_block_bytes) if codec is None \
                else codec.encoded_bytes
            total = getattr(cfg, f"{name}_bytes")
            act_part = int(total * cfg.act_share)
            capacity = total - act_part if form == "kv" else act_part
            if total == 0 or (form == "act" and capacity < (slab_file_bytes(1, slot) if name == "disk" else slot)):
                continue
            if capacity < slot:
                raise ConfigError(f"{name}_bytes={total} leaves {capacity} bytes for KV (act_share="
                                  f"{cfg.act_share}), below one block ({slot} bytes "
                                  f"for block_tokens={self.block_tokens}); use 0 to disable the tier"
                                  if cfg.act_share else
                                  f"{name}_bytes={capacity} is below one block ({slot} bytes "
                                  f"for block_tokens={self.block_tokens}"
                                  + (f", encoded by {codec.name}" if codec is not None else "")
                                  + "); use 0 to disable the tier")
            if codec is not None:  # encoded rows in a private arena (never shared with clients)
                inner = self.make_disk_arena(capacity, form, codec) if name == "disk" else \
                    MemoryArena(capacity // slot, slot, device=torch.device("cpu"), pin=self.pins_host(name))
                arena = CodecArena(inner, codec)
            elif name == "disk":
                arena = self.make_disk_arena(capacity, form)
            elif form == "act":  # never shared with sidecar clients: a plain arena
                dev = self.device if name == "device" else torch.device("cpu")
                arena = MemoryArena(capacity // slot, slot, device=dev, pin=self.pins_host(name))
            else:
                dev = self.device if name == "device" else torch.device("cpu")
                arena = self.make_memory_arena(name, capacity // self.block_bytes, dev)
            # a sidecar's shared arena may hold spare slots beyond the cache (staging for puts)
            cache_slots = arena.num_slots if name == "disk" else min(arena.num_slots, capacity // slot)
            try:
                policy = make_policy(cfg.policy_for(name), cache_slots)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            tier = Tier(name, arena, policy)
            tier.spare = arena.num_slots - cache_slots
            tiers.append(tier)
        if not tiers:
            raise ConfigError("every tier is disabled: set device_bytes, host_bytes or disk_bytes" if form == "kv"
                              else f"act_share={cfg.act_share} leaves no tier room for one activation block "
                                   f"({slot} bytes)")
        return tiers

    def codec(self, tier: str) -> Codec | None:
        """The codec of ``tier``'s KV (None: raw). The device tier is always raw: the engine
        reads it. Raises ConfigError when the codec cannot run here (checked at start)."""
        name = getattr(self.config, f"{tier}_codec", "none") if tier != "device" else "none"
        if name == "none":
            return None
        try:
            return make_codec(name, self.block_shape, self.layout.dtype)
        except (ValueError, CodecUnavailableError) as exc:
            raise ConfigError(f"{tier}_codec = {name!r}: {exc}") from None

    def make_disk_arena(self, capacity: int, form: str = "kv", codec: Codec | None = None) -> DiskArena:
        """The disk tier's slab of ``form`` (encoded by ``codec``): under ``disk_path`` (checked
        writable and large enough) or a temporary directory; reopened and recovered with
        ``persist``. Each failure is a ConfigError saying what to change. O(slots) to open."""
        cfg = self.config
        slot = (self.block_bytes if form == "kv" else self.act_block_bytes) if codec is None else codec.encoded_bytes
        if cfg.persist and cfg.disk_path is None:
            raise ConfigError("persist = true needs a disk_path (a temporary directory would not survive)")
        if cfg.disk_path is None:
            if self.tmpdir is None:  # the KV and activation slabs share one directory
                self.tmpdir = tempfile.mkdtemp(prefix="kvstore-")
            directory = Path(self.tmpdir)
        else:
            directory = Path(cfg.disk_path)
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"disk_path {directory} cannot be created: {exc.strerror}") from None
            if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
                raise ConfigError(f"disk_path {directory} is not a writable directory")
        num_slots = slots_for_bytes(capacity, slot)
        if num_slots == 0:
            raise ConfigError(f"disk_bytes={capacity} is below one block on disk "
                              f"({slab_file_bytes(1, slot)} bytes with header and alignment)")
        need = slab_file_bytes(num_slots, slot)
        # another codec writes other rows: its own slab file, so a restart with a changed
        # codec never reads one codec's rows with another (same-size int8/fp8 rows included)
        path = directory / slab_filename(cfg.namespace, form if codec is None else f"{form}-{codec.name}", self.owner)
        try:
            existing = path.lstat().st_size
        except FileNotFoundError:
            existing = 0
        free = shutil.disk_usage(directory).free + existing
        if free < need:
            raise ConfigError(f"disk_path {directory} has {free} bytes free; disk_bytes needs {need}")
        try:
            cls = DiskArena if form == "kv" else ActDiskArena
            return cls(path, num_slots, slot, fsync=cfg.fsync, fsync_interval_s=cfg.fsync_interval_s,
                       persist=cfg.persist, file_ops=self.file_ops, preallocate=cfg.disk_preallocate,
                       identity={"namespace": cfg.namespace, "owner": self.owner})
        except SlabIdentityError as exc:
            if exc.found.get("namespace") == cfg.namespace:
                raise NamespaceOwnerError(f"namespace {cfg.namespace[:100]!r} on disk belongs to another owner; "
                                          "it is not opened for this one") from None
            raise ConfigError(f"{exc} (delete the file or use another disk_path)") from None
        except UnsafePathError as exc:
            raise ConfigError(f"refusing slab {path}: {exc}") from None
        except SlabInUseError as exc:
            raise ConfigError(f"{exc.strerror}: each store needs its own disk_path") from None
        except SlabMismatchError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            if not cfg.persist:
                path.unlink(missing_ok=True)
            raise ConfigError(f"cannot create slab file {path} ({need} bytes): {exc.strerror or exc}") from None

    def make_memory_arena(self, tier: str, num_slots: int, device: torch.device) -> Any:
        """A raw KV memory tier: the ``arena_factory``'s (the sidecar's shared memory) when it
        makes one, else a private ``MemoryArena``. O(1) plus the allocation."""
        if self.arena_factory is not None:
            arena = self.arena_factory(tier, num_slots, self.block_bytes, device)
            if arena is not None:
                if self.pins_host(tier) and hasattr(arena, "register_host"):
                    arena.register_host()  # a shared host arena: DMA to/from the GPU, as the planner assumes
                return arena
        return MemoryArena(num_slots, self.block_bytes, device=device, pin=self.pins_host(tier))

    def pins_host(self, tier: str) -> bool:
        """Whether ``tier``'s memory is page-locked: the host tier, and only when this store's
        device is CUDA (a CPU store creates no CUDA context and pins nothing)."""
        return tier == "host" and self.device.type == "cuda"
