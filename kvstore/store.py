"""``KVStore``: the embedded API (docs/architecture.md) over the tier manager.

Thread safety: one re-entrant lock guards the index and the tiers. ``get`` pins its blocks
under the lock, copies them out *without* holding it (disk reads and large copies do not
stall other callers), then takes the lock again to unpin and promote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import hashlib
import logging
import os
from pathlib import Path
import re
import shutil
import tempfile
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from allocator import CorruptSlotError, DiskArena, FileOps, MemoryArena, default_device, slots_for_bytes
from allocator.codec_arena import CodecArena, base_arena
from allocator.codecs import Codec, CodecUnavailableError, make_codec
from allocator.disk import KIND_ACT, KIND_KV, SlabIdentityError, SlabInUseError, SlabMismatchError, slab_file_bytes
from allocator.transfer import copier_of
from allocator.fileops import UnsafePathError
from kvstore import paged
from kvstore.saves import AsyncSaver, PutHandle
from eviction import make_policy
from kvstore.activations import ActDiskArena, put_forms
from kvstore.config import TIERS, StoreConfig
from kvstore.restore.costmodel import (DEFAULT_DECODE_BPS, ComputeCost, CostModel, CostProfile, LinkCost,
                                       decode_rate)
from kvstore.errors import (BlockNotFoundError, ConfigError, InvalidInputError, NamespaceOwnerError,
                            StoreClosedError)
from kvstore.restore.executor import Executor, Recomputer, Source, Timings
from kvstore.hashing import KeyMemo, iter_block_keys, namespace_salt, tokens_to_array
from kvstore.layout import ModelLayout, as_block_rows
from kvstore.validate import check_act, check_kv, check_start, check_whole_blocks
from kvstore.remote_tier import RemoteTier
from kvstore.restore.planner import BlockForms, Plan, TierCodec, plan_restore
from kvstore.tiers import BlockEntry, Tier, TierManager

log = logging.getLogger(__name__)

TokensLike = Sequence[int] | np.ndarray | torch.Tensor


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


#: Planning without activations: only the KV route exists, so the costs are irrelevant.
_TRANSFER_ONLY = CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e9)},
                             recompute=ComputeCost(1e9), prefill=ComputeCost(1e9))


class LoadResult(NamedTuple):
    """What ``KVStore.load`` restored: ``kv`` of the first ``tokens_restored`` tokens (the
    rest of the prompt is the engine's prefill), the plan that chose how, and its timings."""

    kv: torch.Tensor
    tokens_restored: int
    plan: Plan | None
    timings: Timings | None


class KVStore:
    """A paged, tiered store of KV blocks keyed by token prefix. See docs/architecture.md.

    ``put``/``lookup``/``get`` cost O(tokens) for hashing plus O(blocks) index work plus the
    bytes moved; none depends on how many blocks are stored.
    """

    def __init__(self, config: StoreConfig, *, clock=time.monotonic, arena_factory=None,
                 file_ops: FileOps | None = None, adapter: Recomputer | None = None,
                 cost_model: CostModel | None = None, owner: str | None = None) -> None:
        # ``owner``: the authenticated identity (a CurveZMQ key name) this namespace belongs to.
        # It is recorded in the slabs (a restart reopens them for that owner only) and salts
        # the block keys, so ownership lives with the data, not in a server's memory.
        self.owner = owner
        self._file_ops = file_ops  # injectable disk operations (fault-injection tests)
        self._arena_factory = arena_factory  # sidecar: (tier, num_slots, slot_bytes, device) -> Arena
        if config.layout is None:
            raise ConfigError("StoreConfig.layout is required")
        self.config = config
        self.layout: ModelLayout = config.layout
        self.block_tokens = config.block_tokens
        self.block_bytes = self.layout.kv_block_bytes(self.block_tokens)
        self._block_shape = self.layout.block_shape(self.block_tokens)
        self._salt = namespace_salt(config.namespace, repr(sorted(self.layout.to_dict().items())),
                                    self.block_tokens, owner=owner)
        self._key_memo = KeyMemo(self.block_tokens, self._salt)
        self._lock = threading.RLock()
        self._closed = False
        self._remote: RemoteTier | None = None  # the shared tier below disk (kvstore.remote_tier)
        self._remote_lossy = config.remote_codec in ("fp8", "int8", "int4")  # its blocks come back approximated
        self._tmpdir: str | None = None
        self.device = torch.device(config.device) if config.device else default_device()
        self.act_block_bytes = self.layout.act_block_bytes(self.block_tokens)
        self._act_shape = (self.layout.num_layers, self.block_tokens, self.layout.hidden_size)
        self.adapter = adapter
        if adapter is not None and getattr(adapter, "layout", self.layout) != self.layout:
            raise ConfigError(f"adapter layout {adapter.layout} differs from the store's {self.layout}")
        self._cost_model = cost_model
        self._tiers = TierManager(self._build_tiers(), clock=clock, durable=config.persist)
        # Activations: a second manager (own slots, arenas, policies), keyed like the KV one.
        self._acts: TierManager | None = None
        if config.act_share > 0:
            self._acts = TierManager(self._build_tiers("act"), clock=clock, durable=config.persist)
        self.recovered_blocks = 0
        disk = self._tiers.tiers[-1].arena
        act_disk = self._acts.tiers[-1].arena if self._acts is not None else None
        act_records = act_disk.recovered if config.persist and isinstance(act_disk, DiskArena) else []
        kv_records = disk.recovered if config.persist and isinstance(base_arena(disk), DiskArena) else []
        if kv_records or act_records:
            kv_records = [r for r in kv_records if r.kind == KIND_KV]
            act_records = [r for r in act_records if r.kind == KIND_ACT]
            self.recovered_blocks = self._tiers.restore(kv_records, present={r.key for r in act_records})
            if self._acts is not None:
                self._acts.restore(act_records, present={r.key for r in kv_records})
            log.info("recovered %d blocks from %s", self.recovered_blocks, getattr(disk, "path", "?"))
        self._saver = AsyncSaver()
        self._counters = dict(lookups=0, puts=0, gets=0, hits=0, misses=0, put_blocks=0,
                              dedup_blocks=0, get_blocks=0, corrupt_blocks=0, rejected_blocks=0,
                              put_act_blocks=0, recomputed_blocks=0, loads=0, lossy_refused=0)
        if config.remote_url:
            try:
                self._remote = RemoteTier(
                    config.remote_url, layout_desc=repr(sorted(self.layout.to_dict().items())),
                    block_tokens=self.block_tokens, block_shape=self._block_shape, dtype=self.layout.dtype,
                    write=config.remote_write, ttl_s=config.remote_ttl_s, deadline_s=config.remote_deadline_s,
                    queue_bytes=config.remote_queue_bytes, drain_s=config.remote_drain_s, clock=clock,
                    codec=self._codec("remote"))
            except BaseException:  # e.g. a wrong password: release the local tiers built so far
                self.close()
                raise

    # -- construction ------------------------------------------------------------------
    def _build_tiers(self, form: str = "kv") -> list[Tier]:
        """The tiers of one payload form: KV gets ``1 - act_share`` of each tier's bytes,
        activations ``act_share`` (a tier whose share is below one activation block holds none)."""
        cfg = self.config
        tiers: list[Tier] = []
        for name in TIERS:
            codec = self._codec(name) if form == "kv" else None
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
                inner = self._make_disk_arena(capacity, form, codec) if name == "disk" else \
                    MemoryArena(capacity // slot, slot, device=torch.device("cpu"), pin=self._pins_host(name))
                arena = CodecArena(inner, codec)
            elif name == "disk":
                arena = self._make_disk_arena(capacity, form)
            elif form == "act":  # never shared with sidecar clients: a plain arena
                dev = self.device if name == "device" else torch.device("cpu")
                arena = MemoryArena(capacity // slot, slot, device=dev, pin=self._pins_host(name))
            else:
                dev = self.device if name == "device" else torch.device("cpu")
                arena = self._make_memory_arena(name, capacity // self.block_bytes, dev)
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

    def _codec(self, tier: str) -> Codec | None:
        """The codec of ``tier``'s KV (None: raw). The device tier is always raw: the engine
        reads it. Raises ConfigError when the codec cannot run here (checked at start)."""
        name = getattr(self.config, f"{tier}_codec", "none") if tier != "device" else "none"
        if name == "none":
            return None
        try:
            return make_codec(name, self._block_shape, self.layout.dtype)
        except (ValueError, CodecUnavailableError) as exc:
            raise ConfigError(f"{tier}_codec = {name!r}: {exc}") from None

    def _make_disk_arena(self, capacity: int, form: str = "kv", codec: Codec | None = None) -> DiskArena:
        cfg = self.config
        slot = (self.block_bytes if form == "kv" else self.act_block_bytes) if codec is None else codec.encoded_bytes
        if cfg.persist and cfg.disk_path is None:
            raise ConfigError("persist = true needs a disk_path (a temporary directory would not survive)")
        if cfg.disk_path is None:
            if self._tmpdir is None:  # the KV and activation slabs share one directory
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
                       persist=cfg.persist, file_ops=self._file_ops, preallocate=cfg.disk_preallocate,
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

    # -- validation --------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    def _keys(self, tokens: TokensLike) -> tuple[np.ndarray, list[bytes]]:
        arr = tokens_to_array(tokens)
        return arr, self._key_memo.keys(arr)

    def _whole_block_keys(self, tokens: TokensLike) -> tuple[np.ndarray, list[bytes]]:
        arr, keys = self._keys(tokens)
        check_whole_blocks(len(arr), self.block_tokens)
        return arr, keys

    def _check_kv(self, kv: Any, num_tokens: int) -> None:
        check_kv(self.layout, kv, num_tokens)

    def _check_act(self, act: Any, num_tokens: int) -> None:
        check_act(self.layout, act, num_tokens)

    # -- API ---------------------------------------------------------------------------
    def put(self, tokens: TokensLike, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int:
        """Store the full blocks of ``tokens``' KV (and activations, as the config's rule says);
        returns how many leading tokens are now cached (as ``lookup`` counts them).

        ``activations``: ``[layers, len(tokens), hidden]``, the inputs of the K/V projections
        (``HFAdapter.capture``); validated like ``kv`` before anything is stored, and ignored
        when the store keeps none (``act_share = 0``). Each form a block lacks and the rule
        wants is written; forms already cached are not written again (their use is
        recorded). A block the rule keeps as activations ``"instead"`` of KV keeps its KV
        when no room can be made for its activations. If the store cannot make room for
        every new block (all blocks in the way are being read), it stores the leading ones
        that fit. A partial trailing block is ignored.
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        self._check_kv(kv, len(arr))
        if activations is not None:
            self._check_act(activations, len(arr))
        if not keys:
            return 0
        bt = self.block_tokens
        nb = len(keys)
        blocks = as_block_rows(kv, bt, nb)  # [nb, L, 2, bt, H, D]
        if self._remote is not None:  # the shared tier holds every block's KV (outside the lock)
            self._remote.put(keys, blocks)
        return self._put_blocks(keys, blocks, activations)

    def put_async(self, tokens: TokensLike, kv: torch.Tensor, activations: torch.Tensor | None = None) -> PutHandle:
        """``put`` without stalling the caller: returns at once with a :class:`PutHandle`.

        Input is validated here (errors raise now). The bytes are copied on a worker thread
        -- from CUDA memory on a side stream that first waits for the caller's current
        stream, device->host by DMA into pinned slots -- and the blocks become visible to
        ``lookup``/``get`` only once all their bytes are in. The caller must not modify
        ``kv``/``activations`` until ``handle.done()`` (``handle.wait()`` returns ``put``'s
        result). Saves complete in submission order; ``close`` waits for them. Same costs as
        ``put``, off the caller's thread (see :mod:`kvstore.saves`).
        """
        self._check_open()
        arr = np.array(tokens_to_array(tokens), copy=True)  # the caller may reuse its token list
        self._check_kv(kv, len(arr))
        if activations is not None:
            self._check_act(activations, len(arr))
        return self._saver.submit(lambda: self._save(arr, kv, activations), kv, activations)

    def _save(self, arr: np.ndarray, kv: torch.Tensor, activations: torch.Tensor | None) -> int:
        """The worker's half of ``put_async``: reserve top-tier slots (invisible), copy the new
        blocks into them outside the lock, commit. Falls back to ``put`` when the top tier
        cannot take them all or activations are saved too."""
        if activations is not None and self._acts is not None:
            return self.put(arr, kv, activations)
        nb, bt = len(arr) // self.block_tokens, self.block_tokens
        blocks = as_block_rows(kv, bt, nb)

        def write(arena: Any, pos: list[int], slots: list[int]) -> None:
            arena.write(slots, blocks[pos[0]:pos[-1] + 1] if pos[-1] - pos[0] == len(pos) - 1 else blocks[pos])
        return self._write_reserved(arr, write, lambda: self.put(arr, kv, activations))

    def _write_reserved(self, arr: np.ndarray, write: Callable[[Any, list[int], list[int]], None],
                        fallback: Callable[[], int]) -> int:
        """A put in three steps: reserve top-tier slots for the new blocks (invisible to
        lookups), ``write(arena, positions, slots)`` their bytes *outside* the lock, commit.
        ``fallback()`` (a plain put) when the top tier is disk or degraded or cannot make
        room for all of them. Returns the cached prefix in tokens, like ``put``."""
        top = self._tiers.tiers[0]
        if top.is_disk or top.degraded:
            return fallback()
        res = self.reserve(arr, 0)
        if res is None:
            return fallback()
        if res.positions:
            try:
                write(top.arena, res.positions, res.slots)
                if top.arena.device.type == "cuda":  # a same-device copy is only queued: wait for it
                    torch.cuda.current_stream(top.arena.device).synchronize()
            except BaseException:
                self.abort(res)
                raise
        recorded = getattr(top.arena, "checksums", None)  # a shared arena hashed what write() copied in
        return self.commit(res, recorded[res.slots] if recorded is not None else None)

    def _put_blocks(self, keys: list[bytes], blocks: torch.Tensor, activations: torch.Tensor | None) -> int:
        """``put`` of validated input: ``blocks`` is ``[len(keys), *block]`` (any strides/device)."""
        bt = self.block_tokens
        nb = len(keys)
        want_kv, want_act = put_forms(self.config.activations, self.config.act_blocks, nb,
                                      activations is not None and self._acts is not None)
        with self._lock:
            self._check_open()
            self._counters["puts"] += 1
            index = self._tiers.index
            act_index = self._acts.index if self._acts is not None else {}
            present = [index.get(k) for k in keys]
            present_act = [act_index.get(k) for k in keys]
            act_new = [i for i in range(nb) if want_act[i] and present_act[i] is None]
            failed_act: set[int] = set()
            if act_new:
                assert self._acts is not None and activations is not None
                act_rows = activations[:, : nb * bt].unflatten(1, (nb, bt)).permute(1, 0, 2, 3)[act_new]
                stored_act = self._acts.add([keys[i] for i in act_new],
                                            [keys[i - 1] if i > 0 else None for i in act_new], act_rows)
                self._counters["put_act_blocks"] += stored_act
                failed_act = set(act_new[stored_act:])
                act_new = act_new[:stored_act]
            new_pos = [i for i, e in enumerate(present) if e is None and (want_kv[i] or i in failed_act)]
            self._counters["dedup_blocks"] += nb - len(set(new_pos) | set(act_new))
            stored = 0
            if new_pos:
                src = blocks[new_pos[0]:new_pos[-1] + 1] if new_pos[-1] - new_pos[0] == len(new_pos) - 1 \
                    else blocks[new_pos]  # a run (the usual new tail) stays a view: one pass
                parents = [keys[i - 1] if i > 0 else None for i in new_pos]
                stored = self._tiers.add([keys[i] for i in new_pos], parents, src)
                self._counters["put_blocks"] += stored
                self._counters["rejected_blocks"] += len(new_pos) - stored
            self._tiers.touch([e for e in present if e is not None and e.key in index])
            if self._acts is not None:
                self._acts.touch([e for e in present_act if e is not None and e.key in act_index])
            return self._cached_prefix(keys, self.adapter) * bt

    def _cached_prefix(self, keys: list[bytes], adapter: Recomputer | None, refuse_lossy: bool = False) -> int:
        """Blocks of the longest prefix with KV, or activations when ``adapter`` can recompute
        them (never counting a block the caller could not restore; with ``refuse_lossy`` a
        block whose KV went through a lossy codec counts only through its activations).
        Under the lock; O(blocks)."""
        index = self._tiers.index
        n = 0
        act_index = self._acts.index if self._acts is not None and adapter is not None else {}
        for key in keys:
            e = index.get(key)
            if (e is None or (refuse_lossy and e.lossy)) and key not in act_index:
                break
            n += 1
        return n

    def _refuse_lossy(self, exact: bool | None) -> bool:
        """Whether a read must not return KV a lossy codec stored: ``exact`` when the caller
        says, else the namespace's ``lossy_ok`` decides (docs/decisions.md, "Codecs per tier")."""
        return (not self.config.lossy_ok) if exact is None else bool(exact)

    def lookup(self, tokens: TokensLike, adapter: Recomputer | None = None, *, exact: bool | None = None) -> int:
        """Length in tokens of the longest cached prefix of ``tokens`` (a multiple of block_tokens).

        A block kept only as activations counts when a recompute adapter is known (``adapter``
        or the store's own); without one it is a miss. A block stored by a lossy codec counts
        only where a ``get`` with the same ``exact`` would return it (see :meth:`get`).
        """
        self._check_open()
        arr = tokens_to_array(tokens)
        total = len(arr) // self.block_tokens
        keys = self._key_memo.cached(arr)
        if keys is None and self._remote is not None:
            keys = self._key_memo.keys(arr)  # the remote tier may extend the prefix: every key
        if keys is None:
            # Hash only as far as the index knows the chain (read without the lock: the answer
            # is recomputed under it), so a long prompt costs O(cached prefix), not O(tokens).
            adapter_known = adapter or self.adapter
            act_index = self._acts.index if self._acts is not None and adapter_known is not None else {}
            index, keys = self._tiers.index, []
            for key in iter_block_keys(arr, self.block_tokens, self._salt):
                keys.append(key)
                if key not in index and key not in act_index:
                    break
            if len(keys) == total:
                self._key_memo.remember(arr, keys)
        with self._lock:
            self._check_open()
            n = self._cached_prefix(keys, adapter or self.adapter, self._refuse_lossy(exact))
            self._counters["lookups"] += 1
            remote = self._remote is not None and n < len(keys) \
                and not (self._remote_lossy and self._refuse_lossy(exact))
            if not remote:
                self._counters["hits"] += n
                self._counters["misses"] += total - n
                return n * self.block_tokens
        n += self._remote.count_prefix(keys[n:])  # one batched existence check, no lock held
        with self._lock:
            self._counters["hits"] += n
            self._counters["misses"] += total - n
            return n * self.block_tokens

    def get(self, tokens: TokensLike, device: torch.device | str | None = None, *,
            adapter: Recomputer | None = None, exact: bool | None = None, out: torch.Tensor | None = None,
            on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """The KV of ``tokens`` (all full blocks).

        ``tokens`` must be a whole number of blocks and fully cached; otherwise
        :class:`BlockNotFoundError` is raised and nothing is returned. Blocks restored from
        stored KV are byte for byte what was put. With a recompute adapter (``adapter`` or
        the store's) and activations in the store, the planner decides per block whether
        to read its KV or recompute it from its activations (within the dtype's tolerance;
        ``exact=True`` recomputes only blocks that have no KV), and the executor runs reads
        and recompute overlapped into ``out`` (if given), calling ``on_layer(i)`` as layer
        ``i`` becomes usable. Every block stays pinned until the restore completes.

        Lossy codecs (``host_codec``/``disk_codec`` of fp8, int8, int4): ``exact=True`` never
        returns KV that went through one (such a block counts as missing), ``exact=False``
        accepts it, and ``None`` (the default) follows the namespace's ``lossy_ok``. For
        recompute, ``None`` is ``False``. Encoded blocks decode straight into ``out``.
        """
        self._check_open()
        refuse_lossy = self._refuse_lossy(exact)
        asked, exact = exact, bool(exact)
        arr, keys = self._whole_block_keys(tokens)
        bt = self.block_tokens
        out_device = torch.device(device) if device is not None else self.device
        adapter = adapter or self.adapter
        if self._remote is not None and not (self._remote_lossy and refuse_lossy):
            kv = self._get_with_remote(arr, keys, adapter, exact=asked, out=out, on_layer=on_layer,
                                       device=out_device)
            if kv is not None:
                return kv
        if (adapter is not None and self._acts is not None) or on_layer is not None:
            kv, _, _, _ = self._restore(keys, adapter, allow_prefill=False, exact=exact, out=out,
                                        on_layer=on_layer, device=out_device, refuse_lossy=refuse_lossy)
            return kv
        result = self._output(len(keys) * bt, out, out_device)
        placed, _ = self._pin_prefix(keys, len(arr), refuse_lossy)
        target = result
        if result.device.type == "cpu" and placed and all(
                self._tiers.tiers[t].arena.device.type == "cuda" for _, t, _ in placed):
            # From GPU memory into CPU memory: lay the prefix out on the GPU, then one
            # contiguous copy crosses the link (not one strided piece per block and layer).
            target = torch.empty(result.shape, dtype=result.dtype, device=self._tiers.tiers[placed[0][1]].arena.device)
        self._read_pinned(placed, self._block_rows(target), list(range(len(placed))))
        if target is not result:
            result.copy_(target)
        return result

    def _output(self, tokens: int, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """``out`` checked as a contiguous ``[layers, 2, tokens, kv_heads, head_dim]`` tensor of
        the layout's dtype, or a new one on ``device``."""
        shape = self.layout.kv_shape(tokens)
        if out is None:
            return torch.empty(shape, dtype=self.layout.dtype, device=device)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != self.layout.dtype \
                or not out.is_contiguous():
            raise InvalidInputError(f"out must be a contiguous {shape} tensor of {self.layout.dtype}, got "
                                    + (f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor)
                                       else type(out).__name__))
        return out

    def _block_rows(self, kv: torch.Tensor) -> torch.Tensor:
        """``kv`` (``[layers, 2, T, kv_heads, head_dim]``) viewed as ``[T / bt, *block]`` rows: block
        ``i`` of the prefix is row ``i``, laid out like a slot (a strided view, no copy)."""
        return as_block_rows(kv, self.block_tokens)

    def _pin_prefix(self, keys: list[bytes], num_tokens: int, refuse_lossy: bool = False,
                    ) -> tuple[list[tuple[BlockEntry, int, int]], list[BlockEntry]]:
        """Count a get of ``keys`` and pin all their blocks, or raise :class:`BlockNotFoundError`
        (counted as misses) when one is missing -- or, with ``refuse_lossy``, was stored by a
        lossy codec. Returns ``(entry, tier, slot)`` per block. O(blocks)."""
        bt = self.block_tokens
        with self._lock:
            self._check_open()
            self._counters["gets"] += 1
            entries: list[BlockEntry] = []
            lossy = False
            for k in keys:
                e = self._tiers.index.get(k)
                if e is None:
                    break
                if refuse_lossy and e.lossy:
                    lossy = True
                    self._counters["lossy_refused"] += 1
                    break
                entries.append(e)
            if len(entries) < len(keys):
                self._counters["misses"] += len(keys) - len(entries)
                self._counters["hits"] += len(entries)
                raise BlockNotFoundError(f"only {len(entries) * bt} of {num_tokens} tokens are cached "
                                         + (f"exactly (block {len(entries)} was stored by a lossy codec; "
                                            "exact=False or lossy_ok accepts it)" if lossy else
                                            f"(block {len(entries)} is missing)"))
            self._counters["hits"] += len(entries)
            self._tiers.touch(entries)
            placed = [(e, e.tier, e.slot) for e in entries]
            self._tiers.pin_many(entries)
        return placed, entries

    def _read_pinned(self, placed: list[tuple[BlockEntry, int, int]], rows: paged.Rows,
                     positions: Sequence[int]) -> None:
        """Copy pinned blocks into ``rows[positions[i]]`` (any layout/device), then unpin them,
        drop corrupt ones (raising :class:`BlockNotFoundError`) and promote lower-tier hits."""
        corrupt: list[BlockEntry] = []
        try:
            corrupt = self._read_blocks(placed, rows, positions)
        finally:
            with self._lock:
                self._tiers.unpin_many(placed)
                if corrupt:
                    self._counters["corrupt_blocks"] += len(corrupt)
                    log.error("dropped %d block(s) that failed their checksum", len(corrupt))
                    self._tiers.drop(corrupt)
                else:
                    self._counters["get_blocks"] += len(placed)
                    for _, t, _ in placed:
                        self._tiers.tiers[t].counters.hits += 1
                    if self.config.promote_on_hit and not self._closed:
                        low = [i for i, (_, t, _) in enumerate(placed) if t > 0]
                        if low:
                            self._tiers.promote([placed[i][0] for i in low],
                                                paged.take(rows, [positions[i] for i in low]))
        if corrupt:
            raise BlockNotFoundError(f"{len(corrupt)} block(s) failed their checksum and were dropped; "
                                     "recompute them")

    def load_into(self, tokens: TokensLike, pool: torch.Tensor | Sequence[torch.Tensor],
                  block_ids: Sequence[int] | torch.Tensor, *, exact: bool | None = None, start: int = 0) -> int:
        """Copy the KV of ``tokens`` (whole blocks, fully cached) straight into an engine's
        paged KV pool: block ``i`` of the prefix lands in pool block ``block_ids[i]``.

        ``start``: copy only blocks ``start...`` of the prefix, block ``start + j`` into pool
        block ``block_ids[j]`` (one id per copied block); the blocks before it are the
        engine's own (its prefix-cache hit) and are neither read nor written, but the whole
        prefix must still be cached (else :class:`BlockNotFoundError`, pool untouched).
        ``0 <= start <= len(tokens) / block_tokens``.

        ``pool``: one tensor ``[num_blocks, layers, 2, block_tokens, kv_heads, head_dim]``
        (cross-layer blocks) or a list of one ``[2, num_blocks, block_tokens, kv_heads,
        head_dim]`` tensor per layer, of the layout's dtype, on any one device.
        ``block_ids``: distinct ids, one per block. Returns the tokens loaded
        (``len(tokens)``); raises :class:`BlockNotFoundError` when a block is missing (the
        pool is then untouched) and :class:`InvalidInputError` on a bad pool or ids (checked
        before anything is read). Pool blocks not named are never written. Costs as ``get``:
        O(bytes) + O(runs of slots) (times layers for a per-layer pool). ``exact``: as
        :meth:`get` (a block a lossy codec stored is missing unless accepted); encoded
        blocks decode straight into the pool's rows.
        """
        self._check_open()
        arr, keys = self._whole_block_keys(tokens)
        start = check_start(start, len(keys))
        rows, num_blocks = paged.pool_rows(self.layout, self.block_tokens, pool)
        ids = paged.block_ids(block_ids, len(keys) - start, num_blocks)
        if not keys:
            return 0
        placed, _ = self._pin_prefix(keys, len(arr), self._refuse_lossy(exact))
        if start:  # cached, so counted and touched; not read
            with self._lock:
                self._tiers.unpin_many(placed[:start])
        self._read_pinned(placed[start:], rows, ids)
        return len(arr)

    def save_from(self, tokens: TokensLike, pool: torch.Tensor | Sequence[torch.Tensor],
                  block_ids: Sequence[int] | torch.Tensor) -> int:
        """``put`` of the full blocks of ``tokens`` whose KV sits in an engine's paged pool:
        block ``i`` is pool block ``block_ids[i]`` (layouts as :meth:`load_into`). One more id
        for a partial trailing block is accepted and ignored. Returns the cached prefix
        length in tokens, like ``put``. The new blocks go straight from the pool into reserved
        top-tier slots and become visible once written (across devices they are assembled on
        the pool's device first and cross as whole runs). O(bytes) + O(runs).
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        rows, num_blocks = paged.pool_rows(self.layout, self.block_tokens, pool)
        ids = paged.block_ids(block_ids, len(keys), num_blocks, spare=1 if len(arr) % self.block_tokens else 0)
        if not keys:
            return 0

        def write(arena: Any, pos: list[int], slots: list[int]) -> None:
            src = [ids[p] for p in pos]
            if isinstance(arena, MemoryArena):
                paged.place_out(rows, src, arena.rows(self.layout.dtype, self._block_shape), slots)
            else:
                arena.write(slots, paged.take(rows, src))
        return self._write_reserved(arr, write, lambda: self._put_blocks(keys, paged.take(rows, ids), None))

    def load(self, tokens: TokensLike, adapter: Recomputer | None = None, *, device: torch.device | str | None = None,
             out: torch.Tensor | None = None, on_layer: Callable[[int], None] | None = None,
             exact: bool | None = None) -> LoadResult:
        """Restore as much of ``tokens``' cached prefix as is worth restoring.

        Unlike ``get``, the planner may leave a suffix of the cached blocks to the engine's
        prefill (when recomputing them from tokens is faster than any restore), so
        ``tokens_restored`` may be less than ``lookup``. ``kv`` is
        ``[layers, 2, tokens_restored, kv_heads, head_dim]``; when ``out`` is given (a
        contiguous ``[layers, 2, T, kv_heads, head_dim]`` buffer with ``T`` at least the
        restored length, e.g. the whole prompt's) its leading tokens are filled and ``kv`` is
        a view of them. A block that fails its checksum ends the restored
        prefix there (it is dropped). Costs as ``get`` plus planning (bounded search).
        ``exact`` as :meth:`get`: where lossy KV is refused, a block a lossy codec stored is
        recomputed from its activations if it has them, else the restored prefix ends there
        (the engine prefills from there).
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        adapter = adapter or self.adapter
        out_device = torch.device(device) if device is not None else self.device
        if self._remote is not None:
            self._promote_from_remote(keys, adapter)
        return LoadResult(*self._restore(keys, adapter, allow_prefill=True, exact=False, out=out,
                                         on_layer=on_layer, device=out_device,
                                         refuse_lossy=self._refuse_lossy(exact)))

    # -- planned restores --------------------------------------------------------------
    @property
    def cost_model(self) -> CostModel:
        """The cost model plans use: injected, else the calibrated profile, else a quick
        measurement (made once, on first use; see :mod:`kvstore.restore.profiles`)."""
        with self._lock:
            if self._cost_model is None:
                from kvstore.restore.profiles import store_profile

                self._cost_model = CostModel(store_profile(self.layout, self.device))
            return self._cost_model

    def _executor(self) -> Executor:
        with self._lock:
            ex = getattr(self, "_exec", None)
            if ex is None or ex.cost_model is not self.cost_model:
                arenas = [t.arena for t in self._tiers.tiers + (self._acts.tiers if self._acts is not None else [])]
                ex = self._exec = Executor(self.layout, self.block_tokens, cost_model=self.cost_model,
                                           copier=copier_of(*arenas))
            return ex

    def _restore(self, keys: list[bytes], adapter: Recomputer | None, *, allow_prefill: bool, exact: bool,
                 out: torch.Tensor | None, on_layer: Callable[[int], None] | None, device: torch.device,
                 refuse_lossy: bool = False) -> tuple[torch.Tensor, int, Plan | None, Timings | None]:
        """Plan and run one restore of ``keys``' cached prefix (``get``: all of it or raise).
        With ``refuse_lossy`` KV a lossy codec stored counts as absent (the block is then
        recomputed from its activations, or missing).

        Pins every form of every block involved in both managers under the lock, plans and
        executes outside it, then unpins, drops corrupt blocks, and promotes blocks whose KV
        was read from a lower tier. O(blocks) index work plus the planner and the bytes.
        """
        bt = self.block_tokens
        acts = self._acts if adapter is not None else None
        with self._lock:
            self._check_open()
            self._counters["gets" if not allow_prefill else "loads"] += 1
            kv_es: list[BlockEntry | None] = []
            act_es: list[BlockEntry | None] = []
            for k in keys:
                e = self._tiers.index.get(k)
                a = acts.index.get(k) if acts is not None else None
                if refuse_lossy and e is not None and e.lossy:
                    self._counters["lossy_refused"] += 1
                    e = None
                if e is None and a is None:
                    break
                kv_es.append(e)
                act_es.append(a)
            n = len(kv_es)
            self._counters["hits"] += n
            self._counters["misses"] += len(keys) - n
            if n < len(keys) and not allow_prefill:
                raise BlockNotFoundError(f"only {n * bt} of {len(keys) * bt} tokens are cached "
                                         f"(block {n} is missing)")
            kv_placed = [(e, e.tier, e.slot) if e is not None else None for e in kv_es]
            act_placed = [(a, a.tier, a.slot) if a is not None else None for a in act_es]
            self._tiers.touch([e for e in kv_es if e is not None])
            self._tiers.pin_many([e for e in kv_es if e is not None])
            if acts is not None:
                acts.touch([a for a in act_es if a is not None])
                acts.pin_many([a for a in act_es if a is not None])
        corrupt: list[tuple[int, str]] = []
        io_errors: list = []
        plan: Plan | None = None
        result: torch.Tensor | None = None
        timings: Timings | None = None
        try:
            kv_tiers = [self._tiers.tiers[p[1]] if p else None for p in kv_placed]
            act_tiers = [acts.tiers[p[1]] if p and acts is not None else None for p in act_placed]
            forms = [BlockForms(kv=kt.name if kt else None,
                                act=at.name if at is not None and (not exact or kt is None) else None)
                     for kt, at in zip(kv_tiers, act_tiers)]
            if acts is None or all(f.act is None for f in forms):
                plan = plan_restore(forms, self.layout, bt, _TRANSFER_ONLY, allow_prefill=False)
            else:
                profile = self.cost_model.profile
                plan = plan_restore(forms, self.layout, bt, profile, allow_prefill=allow_prefill,
                                    codecs=self.planner_codecs(profile))
            m = n - plan.prefill_tokens // bt
            shape = self.layout.kv_shape(m * bt)
            if out is None:
                result = torch.empty(shape, dtype=self.layout.dtype, device=device)
            else:
                # load(): the engine's buffer may be longer than what the plan restores (a suffix
                # left to prefill); its leading tokens are filled
                fits = (isinstance(out, torch.Tensor) and out.dim() == 5
                        and tuple(out.shape) == self.layout.kv_shape(out.shape[2])
                        and (out.shape[2] >= m * bt if allow_prefill else out.shape[2] == m * bt)
                        and out.dtype == self.layout.dtype and out.is_contiguous())
                if not fits:
                    want = f"at least {shape}" if allow_prefill else str(shape)
                    raise InvalidInputError(f"out must be a contiguous tensor of {self.layout.dtype}, shape {want}; "
                                            f"got {tuple(out.shape) if isinstance(out, torch.Tensor) else out!r}")
                result = out[:, :, : m * bt]
            kv_src = [Source(t.name, t.arena, p[2]) if p and t else None for p, t in zip(kv_placed, kv_tiers)]
            act_src = [Source(t.name, t.arena, p[2]) if p and t else None for p, t in zip(act_placed, act_tiers)]
            res = self._executor().run(plan.steps, kv_src, act_src, result, adapter, on_layer)
            corrupt, io_errors, timings = res.corrupt, res.io_errors, res.timings
        finally:
            with self._lock:
                self._tiers.unpin_many([p for p in kv_placed if p is not None])
                if acts is not None:
                    acts.unpin_many([p for p in act_placed if p is not None])
                for tier_name, exc in io_errors:
                    for mgr in (self._tiers, acts):
                        for ti, t in enumerate(mgr.tiers if mgr is not None else []):
                            if t.name == tier_name:
                                mgr.fail(ti, exc)
                if corrupt:
                    self._counters["corrupt_blocks"] += len(corrupt)
                    log.error("dropped %d block payload(s) that failed their checksum", len(corrupt))
                    self._tiers.drop([kv_placed[b][0] for b, form in corrupt if form == "kv"])
                    if acts is not None:
                        acts.drop([act_placed[b][0] for b, form in corrupt if form == "act"])
                elif plan is not None and result is not None and timings is not None:
                    kv_steps = [s.block for s in plan.steps if s.action == "kv"]
                    self._counters["get_blocks"] += len(kv_steps) + plan.count("recompute")
                    self._counters["recomputed_blocks"] += plan.count("recompute")
                    for b in kv_steps:
                        self._tiers.tiers[kv_placed[b][1]].counters.hits += 1
                    low = [b for b in kv_steps if kv_placed[b][1] > 0]
                    if low and self.config.promote_on_hit and not self._closed:
                        # where the restore put them (a CUDA result feeds a CUDA top tier directly)
                        rows = as_block_rows(result, bt)[low]
                        self._tiers.promote([kv_placed[b][0] for b in low], rows)
        if corrupt:
            first = min(b for b, _ in corrupt)
            if not allow_prefill:
                raise BlockNotFoundError(f"{len(corrupt)} block(s) failed their checksum and were dropped; "
                                         "recompute them")
            assert result is not None and plan is not None
            return result[:, :, : first * bt], first * bt, plan, timings
        assert result is not None
        return result, result.shape[2], plan, timings

    def _read_blocks(self, placed: list[tuple[BlockEntry, int, int]], rows: paged.Rows,
                     positions: Sequence[int] | None = None) -> list[BlockEntry]:
        """Copy every pinned block into ``rows[positions[i]]`` (default ``rows[i]``): ``rows`` is
        any ``[n, *block]`` view (the caller's KV seen as blocks, an engine's paged pool, plain
        staging) on any device. Memory tiers copy straight from their slots (runs of slots by
        DMA across devices, re-layout on the device); other tiers read into staging (pinned
        when the rows are on CUDA) first. Returns entries whose bytes are corrupt (their rows
        are undefined); returns once every byte is in. O(bytes) + O(runs)."""
        corrupt: list[BlockEntry] = []
        pos = list(range(len(placed))) if positions is None else list(positions)
        by_tier: dict[int, list[int]] = {}
        for i, (_, t, _) in enumerate(placed):
            by_tier.setdefault(t, []).append(i)
        for t, idx in by_tier.items():
            arena = self._tiers.tiers[t].arena
            slots = [placed[i][2] for i in idx]
            if isinstance(arena, CodecArena):
                corrupt.extend(self._decode_into(t, arena, [placed[i] for i in idx], rows, [pos[i] for i in idx]))
                continue
            if isinstance(arena, MemoryArena) and getattr(arena, "checksums", None) is None:
                # only this process writes these slots: straight into the caller's layout.
                # Shared-memory slots (others can write them) go through the arena's checked read.
                paged.place(arena.rows(self.layout.dtype, self._block_shape), slots, rows, [pos[i] for i in idx])
                continue
            staging = torch.empty((len(idx), *self._block_shape), dtype=self.layout.dtype,
                                  pin_memory=paged.device_of(rows).type == "cuda")
            bad: set[int] = set()
            try:
                arena.read(slots, staging)
            except CorruptSlotError as exc:
                bad = set(exc.slots)
            except OSError as exc:  # EIO and friends: the blocks are missing, the tier degraded
                with self._lock:
                    self._tiers.fail(t, exc)
                bad = set(slots)
            corrupt.extend(placed[i][0] for i in idx if placed[i][2] in bad)
            good = [j for j, i in enumerate(idx) if placed[i][2] not in bad]
            paged.place(staging, good, rows, [pos[idx[j]] for j in good])
        paged.wait(rows)
        return corrupt

    def planner_codecs(self, profile: CostProfile) -> dict[str, TierCodec]:
        """Per coded tier, what the planner charges for its KV: encoded bytes on the links and
        a decode time per block, from the profile's calibrated rate, else this store's own
        measured one, else ``DEFAULT_DECODE_BPS``. O(tiers)."""
        out: dict[str, TierCodec] = {}
        for tier in self._tiers.tiers:
            arena = tier.arena
            if isinstance(arena, CodecArena) and arena.codec.name != "none":
                rate = decode_rate(profile, arena.codec.name) or arena.decode_rate or DEFAULT_DECODE_BPS
                out[tier.name] = TierCodec(arena.codec.encoded_bytes, arena.codec.raw_bytes / rate)
        return out

    def _decode_into(self, t: int, arena: CodecArena, placed: list[tuple[BlockEntry, int, int]],
                     rows: torch.Tensor, pos: list[int]) -> list[BlockEntry]:
        """Decode encoded blocks into ``rows[pos[i]]``. Runs of consecutive positions in a
        tensor of rows are decoded straight into them (the codec writes the caller's rows); a
        per-layer pool, or positions so scattered that runs are short (an engine's free
        blocks), go through one chunk of staging at a time (bounded by the arena's chunk,
        never the whole batch) and one scatter per chunk. Returns the entries whose encoded
        bytes failed their check. O(bytes) + O(runs or chunks)."""
        corrupt: list[BlockEntry] = []
        runs = 1 + sum(1 for a, b in zip(pos, pos[1:]) if b != a + 1)
        if isinstance(rows, paged.LayerRows) or runs > max(1, len(pos) // 4):
            per = arena.blocks_per_chunk
            dev = paged.device_of(rows)
            for lo in range(0, len(pos), per):
                part = placed[lo:lo + per]
                slots = [p[2] for p in part]
                staging = torch.empty((len(part), *self._block_shape), dtype=self.layout.dtype, device=dev)
                bad: set[int] = set()
                try:
                    arena.read(slots, staging)
                except CorruptSlotError as exc:
                    bad = set(exc.slots)
                except OSError as exc:
                    with self._lock:
                        self._tiers.fail(t, exc)
                    bad = set(slots)
                corrupt.extend(p[0] for p in part if p[2] in bad)
                good = [j for j, p in enumerate(part) if p[2] not in bad]
                paged.place(staging, good, rows, [pos[lo + j] for j in good])
            return corrupt
        i = 0
        while i < len(pos):
            j = i + 1
            while j < len(pos) and pos[j] == pos[j - 1] + 1:
                j += 1
            slots = [placed[k][2] for k in range(i, j)]
            try:
                arena.read(slots, rows[pos[i]:pos[j - 1] + 1])
            except CorruptSlotError as exc:
                bad = set(exc.slots)
                corrupt.extend(placed[k][0] for k in range(i, j) if placed[k][2] in bad)
            except OSError as exc:
                with self._lock:
                    self._tiers.fail(t, exc)
                corrupt.extend(placed[k][0] for k in range(i, j))
            i = j
        return corrupt

    def clear(self) -> int:
        """Drop every cached block (blocks being read survive until released)."""
        self._check_open()
        with self._lock:
            if self._acts is not None:
                self._acts.clear()
            return self._tiers.clear()

    @staticmethod
    def _tier_stats(manager: TierManager, block_bytes: int) -> dict[str, dict]:
        """Per tier; bytes are what the tier holds (encoded blocks for a codec's tier)."""
        tiers = {}
        for tier in manager.tiers:
            c = tier.counters
            slot_bytes = tier.arena.codec.encoded_bytes if isinstance(tier.arena, CodecArena) else block_bytes
            tiers[tier.name] = {
                "capacity_blocks": tier.capacity, "used_blocks": tier.pool.used_count - tier.staged,
                "capacity_bytes": tier.capacity * slot_bytes,
                "used_bytes": (tier.pool.used_count - tier.staged) * slot_bytes,
                "staged_blocks": tier.staged,
                "policy": tier.policy.name, "device": str(tier.arena.device) if not tier.is_disk else "disk",
                **KVStore._codec_stats(tier),
                "hits": c.hits, "evictions": c.evictions, "demotions_in": c.demotions_in,
                "promotions_in": c.promotions_in, "drops": c.drops,
                "io_errors": c.io_errors, "degraded": tier.degraded,
            }
        return tiers

    @staticmethod
    def _codec_stats(tier: Tier) -> dict[str, Any]:
        """The tier's codec, its encoded block size and ratio (raw bytes per byte of slot:
        what capacity is multiplied by) and, for ``lossless``, the payload ratio achieved so far."""
        arena = tier.arena
        if not isinstance(arena, CodecArena):
            return {"codec": "none", "codec_ratio": 1.0}
        codec = arena.codec
        out: dict[str, Any] = {"codec": codec.name, "encoded_block_bytes": codec.encoded_bytes,
                               "codec_ratio": round(codec.ratio, 4), "lossy": codec.lossy,
                               "decode_bytes_per_s": arena.decode_rate}
        achieved = getattr(codec, "achieved_ratio", None)
        if codec.name == "lossless":
            out["payload_ratio"] = round(achieved, 4) if achieved is not None else None
        return out

    def stats(self) -> dict[str, Any]:
        """Counters and per-tier occupancy (a plain dict, JSON-serialisable). The KV figures
        keep their historical keys; activations, when kept, are under ``"activations"``."""
        with self._lock:
            tiers = self._tier_stats(self._tiers, self.block_bytes)
            extra: dict[str, Any] = {}
            if self._acts is not None:
                extra["activations"] = {"blocks": len(self._acts.index), "block_bytes": self.act_block_bytes,
                                        "orphans_dropped": self._acts.orphans_dropped,
                                        "tiers": self._tier_stats(self._acts, self.act_block_bytes)}
            total = lambda field: sum(t[field] for t in tiers.values())  # noqa: E731
            return {
                "namespace": self.config.namespace, "block_tokens": self.block_tokens,
                "block_bytes": self.block_bytes, "blocks": len(self._tiers.index),
                **self._counters,
                "evictions": total("evictions"),
                "demotions": sum(t["demotions_in"] for n, t in tiers.items()),
                "promotions": total("promotions_in"),
                "dropped": total("drops"), "orphans_dropped": self._tiers.orphans_dropped,
                "tiers": tiers, **extra,
                "corrupt_blocks": self._counters["corrupt_blocks"] + self._tiers.corrupt_dropped,
                **({"remote": self._remote.stats()} if self._remote is not None else {}),
            }

    def _check(self) -> None:
        """Assert every invariant of both tier managers (KV and activations)."""
        with self._lock:
            self._tiers._check()
            if self._acts is not None:
                self._acts._check()

    def close(self) -> None:
        saver = getattr(self, "_saver", None)
        if saver is not None:
            saver.close()  # saves already accepted complete first (they need the tiers)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._remote is not None:
                self._remote.close()
            for tier in self._tiers.tiers + (self._acts.tiers if self._acts is not None else []):
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

    # -- the remote tier (kvstore.remote_tier) --
    # Inclusive and below the local tiers: put writes every block there too; lookup and
    # get/load extend the local prefix with remote blocks, read in one batch and promoted
    # into the local tiers. Remote I/O never runs under the store's lock.

    def _local_prefix(self, keys: list[bytes], adapter: Recomputer | None) -> int:
        with self._lock:
            self._check_open()
            return self._cached_prefix(keys, adapter)

    def _admit_remote(self, keys: list[bytes], start: int, rows: torch.Tensor) -> None:
        """Promote remote blocks ``keys[start:start+len(rows)]`` into the local tiers (the
        ones no one cached meanwhile; a block is stored only after its parent). Under the lock."""
        index = self._tiers.index
        pos = [start + i for i in range(len(rows)) if keys[start + i] not in index]
        if pos and self.config.promote_on_hit and not self._closed:
            src = rows[[p - start for p in pos]] if len(pos) < len(rows) else rows
            self._tiers.add([keys[p] for p in pos], [keys[p - 1] if p > 0 else None for p in pos], src)
            if self._remote_lossy:  # decoded from a lossy remote codec: approximate wherever it lands
                for p in pos:
                    e = self._tiers.index.get(keys[p])
                    if e is not None:
                        e.lossy = True

    def _get_with_remote(self, arr: np.ndarray, keys: list[bytes], adapter: Recomputer | None, *, exact: bool,
                         out: torch.Tensor | None, on_layer: Callable[[int], None] | None,
                         device: torch.device) -> torch.Tensor | None:
        """``get`` when the local prefix falls short: the local part as ``get`` reads it, the
        rest from the remote tier in one batch; None when everything is local (the caller
        goes on as usual). Raises :class:`BlockNotFoundError` when the remote lacks a block."""
        assert self._remote is not None
        bt = self.block_tokens
        n = self._local_prefix(keys, adapter)
        if n == len(keys):
            return None
        nb = len(keys)
        shape = self.layout.kv_shape(nb * bt)
        if out is not None and (tuple(out.shape) != shape or out.dtype != self.layout.dtype):
            raise InvalidInputError(f"out must be a {shape} tensor of {self.layout.dtype}, "
                                    f"got {tuple(out.shape)} {out.dtype}")
        kv = torch.empty(self.layout.kv_shape(nb * bt), dtype=self.layout.dtype)
        blocks = as_block_rows(kv, bt)  # block i's KV, in place
        _, m = self._remote.fetch(keys[n:], out=blocks[n:])  # lands in the result: one copy
        with self._lock:
            self._counters["gets"] += 1
            if n + m < nb:
                self._counters["hits"] += n + m
                self._counters["misses"] += nb - n - m
                self._admit_remote(keys, n, blocks[n:n + m])  # what was found is kept for next time
                raise BlockNotFoundError(f"only {(n + m) * bt} of {len(arr)} tokens are cached "
                                         f"(block {n + m} is missing locally and remotely)")
        first = n
        if n:
            try:
                kv[:, :, : n * bt] = self.get(arr[: n * bt], device="cpu", adapter=adapter, exact=exact)
            except BlockNotFoundError:  # evicted locally meanwhile: the remote has it too
                if self._remote.fetch(keys[:n], out=blocks[:n])[1] < n:
                    raise
                first = 0
        with self._lock:
            self._counters["hits"] += nb - first
            self._counters["get_blocks"] += nb - first
            self._admit_remote(keys, first, blocks[first:])
        if out is not None:
            out.copy_(kv)
            kv = out
        else:
            kv = kv.to(device)
        if on_layer is not None:
            for layer in range(self.layout.num_layers):
                on_layer(layer)
        return kv

    def _promote_from_remote(self, keys: list[bytes], adapter: Recomputer | None) -> int:
        """Before a planned ``load``: bring the remote continuation of the local prefix into
        the local tiers when the cost model says reading it beats prefilling it. Returns the
        blocks promoted."""
        assert self._remote is not None
        n = self._local_prefix(keys, adapter)
        if n == len(keys):
            return 0
        want = self._remote.count_prefix(keys[n:])
        if not want:
            return 0
        profile = self._cost_model.profile if self._cost_model is not None else None
        if profile is not None:
            from kvstore.restore.planner import remote_worth_reading

            rc = self._remote.codec
            codec = TierCodec(rc.encoded_bytes, rc.raw_bytes / (decode_rate(profile, rc.name) or DEFAULT_DECODE_BPS)) \
                if rc is not None else None
            if not remote_worth_reading(profile, self.layout, self.block_tokens, want, self._remote.link, codec=codec):
                return 0
        rows, m = self._remote.fetch(keys[n:n + want])
        if m:
            with self._lock:
                self._admit_remote(keys, n, rows)
        return m

    def flush_remote(self, timeout_s: float | None = None) -> bool:
        """Wait for the remote tier's write-behind queue to drain (True; also without a remote
        tier) or ``timeout_s`` to pass (False)."""
        return self._remote.flush(timeout_s) if self._remote is not None else True

    # -- sidecar support (two-phase reads, shared memory) --
    # Used by kvstore.sidecar.server: a memory tier may live in a shared-memory arena that clients
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
                if self._pins_host(tier) and hasattr(arena, "register_host"):
                    arena.register_host()  # a shared host arena: DMA to/from the GPU, as the planner assumes
                return arena
        return MemoryArena(num_slots, self.block_bytes, device=device, pin=self._pins_host(tier))

    def _pins_host(self, tier: str) -> bool:
        """Whether ``tier``'s memory is page-locked: the host tier, and only when this store's
        device is CUDA (a CPU store creates no CUDA context and pins nothing)."""
        return tier == "host" and self.device.type == "cuda"

    def tier_arenas(self) -> list[tuple[str, Any]]:
        """``(tier name, arena)`` in tier order (the index a lease's blocks refer to)."""
        return [(t.name, t.arena) for t in self._tiers.tiers]

    def lookup_nowait(self, tokens: TokensLike, *, exact: bool | None = None) -> int | None:
        """``lookup`` if the lock is free right now, else None (the caller defers it). O(tokens)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._remote is not None:  # a remote lookup is a network round trip: defer unless all local
                _, keys = self._keys(tokens)
                if self._closed or self._cached_prefix(keys, self.adapter) < len(keys):
                    return None
            return self.lookup(tokens, exact=exact)
        finally:
            self._lock.release()

    def _cached_blocks(self, keys: list[bytes]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self._tiers.index:
            n += 1
        return n

    def acquire(self, tokens: TokensLike, tiers: Sequence[int], *, exact: bool | None = None,
                ) -> "KVStore.Lease | None":
        """Pin a fully cached whole-block prefix whose blocks all sit in ``tiers``.

        None when a block is missing or elsewhere, or lossy where ``exact`` (as :meth:`get`)
        refuses it (the caller falls back to ``get``, which counts and raises the miss or
        promotes). Counts as a get; O(blocks).
        """
        self._check_open()
        arr, keys = self._whole_block_keys(tokens)
        allowed = set(tiers)
        refuse_lossy = self._refuse_lossy(exact)
        with self._lock:
            self._check_open()
            entries = [self._tiers.index.get(k) for k in keys]
            if any(e is None or e.tier not in allowed or (refuse_lossy and e.lossy) for e in entries):
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
        self._remote_recheck(keys, present)
        return res

    def _remote_recheck(self, keys: list[bytes], present: list) -> None:
        """As ``put`` does for every block: the blocks a client's put found already cached
        (so it sent no bytes for them) get the remote tier's check too, and those Redis lost
        are refilled from the local copy. No lock held (a network round trip)."""
        if self._remote is None:
            return
        held = [keys[i] for i, e in enumerate(present) if e is not None]
        if held:
            self._remote.put(held, lambda pos: self._local_rows([held[i] for i in pos]))

    def _local_rows(self, keys: list[bytes]) -> torch.Tensor | None:
        """The KV rows of locally held ``keys`` (for the remote tier to refill what Redis
        lost), or None when one is no longer held or fails its checksum. O(bytes)."""
        rows = torch.empty((len(keys), *self._block_shape), dtype=self.layout.dtype)
        with self._lock:
            by_tier: dict[int, tuple[list[int], list[int]]] = {}
            for i, k in enumerate(keys):
                e = self._tiers.index.get(k)
                if e is None:
                    return None
                pos, slots = by_tier.setdefault(e.tier, ([], []))
                pos.append(i)
                slots.append(e.slot)
            for t, (pos, slots) in by_tier.items():
                part = torch.empty((len(pos), *self._block_shape), dtype=self.layout.dtype)
                try:
                    self._tiers.tiers[t].arena.read(slots, part)
                except CorruptSlotError:
                    return None
                rows[pos] = part
        return rows

    def commit(self, res: "KVStore.Reservation", sums: np.ndarray | None = None) -> int:
        """Make a reservation's written blocks visible; returns the cached prefix length in
        tokens, like ``put``. Blocks someone else committed meanwhile are freed. O(blocks).

        ``sums``: the writer's checksums of what it wrote into ``res.slots`` (required when
        the tier's arena keeps checksums: other processes can write shared slots)."""
        with self._lock:
            if res.done:
                return res.cached
            tiers, index = self._tiers, self._tiers.index
            tier = tiers.tiers[res.tier]
            if hasattr(tier.arena, "set_checksums"):
                if sums is None or len(sums) != len(res.slots):
                    raise InvalidInputError(f"commit needs the checksums of the {len(res.slots)} written slot(s)")
                tier.arena.set_checksums(res.slots, sums)
            res.done = True
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
            rows = self._rows_for_remote(tier, [slot_of[i] for i in fresh])
        if rows is not None:
            self._remote.put([res.keys[i] for i in fresh], rows)
        return res.cached

    def _rows_for_remote(self, tier: Tier, slots: list[int]) -> torch.Tensor | None:
        """A private, checked copy of what a client wrote in place into ``slots``, for the
        remote tier (None without one, or when the bytes already fail their checksums: those
        blocks are caught and dropped on their first read). Under the lock. O(bytes)."""
        if self._remote is None or not slots:
            return None
        rows = torch.empty((len(slots), *self._block_shape), dtype=self.layout.dtype)
        try:
            tier.arena.read(slots, rows)
        except CorruptSlotError:
            return None
        return rows

    # -- staging: slots a client holds ahead of its puts (one round trip per put) -------
    def stage(self, tier: int, n: int) -> list[int]:
        """Lend up to ``n`` of tier ``tier``'s spare slots (beyond the cache's capacity) to a
        client to write into before it names them in :meth:`put_staged`. O(n)."""
        self._check_open()
        with self._lock:
            self._check_open()
            t = self._tiers.tiers[tier]
            got = min(n, t.spare - t.staged, t.pool.free_count)
            if got <= 0:
                return []
            t.staged += got
            return t.pool.allocate_many(got)

    def staging_spare(self, tier: int) -> int:
        """How many slots of tier ``tier`` can be lent as staging (beyond its capacity)."""
        return self._tiers.tiers[tier].spare

    def unstage(self, tier: int, slots: Sequence[int]) -> None:
        """Give staged slots back (a client that closed, died or went stale). O(len(slots))."""
        with self._lock:
            t = self._tiers.tiers[tier]
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
        self._check_open()
        _, keys = self._keys(tokens)
        if len(slots) != len(keys) or len(sums) != len(keys):
            raise InvalidInputError(f"{len(keys)} block(s) need as many staged slots and checksums, got "
                                    f"{len(slots)} and {len(sums)}")
        with self._lock:
            self._check_open()
            self._counters["puts"] += 1
            index = self._tiers.index
            present = [index.get(k) for k in keys]
            new = [i for i, e in enumerate(present) if e is None]
            self._counters["dedup_blocks"] += len(keys) - len(new)
            t = self._tiers.tiers[tier]
            # Staged slots become cached ones: demote as many blocks as are new (pinned ones
            # stay; the blocks that still do not fit are not stored and keep their slots staged).
            fit = self._tiers.make_room(tier, len(new))
            new = new[:fit]
            used = [slots[i] for i in new]
            t.arena.set_checksums(used, sums[new])
            t.staged -= len(used)
            added = self._tiers.register([keys[i] for i in new], [keys[i - 1] if i > 0 else None for i in new],
                                         tier, used)
            self._counters["put_blocks"] += len(added)
            self._tiers.touch([e for e in present if e is not None and e.key in index])
            cached = self._cached_blocks(keys) * self.block_tokens
            rows = self._rows_for_remote(t, used)  # what the client wrote in place goes remote too
        if rows is not None:
            self._remote.put([keys[i] for i in new], rows)
        self._remote_recheck(keys, present)
        return cached, used

    def lease_checksums(self, lease: "KVStore.Lease") -> np.ndarray:
        """The recorded checksums of a lease's blocks (what a client verifies its copy against)."""
        arenas = [getattr(a, "checksums", None) for _, a in self.tier_arenas()]
        return np.array([arenas[t][slot] if arenas[t] is not None else 0 for t, slot in lease.blocks],
                        dtype=np.uint64)

    def report_corrupt(self, lease: "KVStore.Lease", positions: Sequence[int]) -> int:
        """A client's copy of these lease blocks failed their checksums: re-check the shared
        slots here and drop the blocks that really are corrupt. Returns how many. O(bytes)."""
        with self._lock:
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
                self._counters["corrupt_blocks"] += len(bad)
                log.error("dropped %d shared block(s) whose bytes changed after they were written", len(bad))
                self._tiers.drop(bad)
            return len(bad)

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
