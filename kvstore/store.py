"""``KVStore``: the embedded API (DESIGN.md) over the tier manager.

Thread safety: one re-entrant lock guards the index and the tiers. ``get`` pins its blocks
under the lock, copies them out *without* holding it (disk reads and large copies do not
stall other callers), then takes the lock again to unpin and promote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from allocator.disk import KIND_ACT, KIND_KV, SlabInUseError, SlabMismatchError, slab_file_bytes
from eviction import make_policy
from kvstore.activations import ActDiskArena, put_forms
from kvstore.config import TIERS, StoreConfig
from kvstore.restore.costmodel import ComputeCost, CostModel, CostProfile, LinkCost
from kvstore.errors import (BlockNotFoundError, ConfigError, InvalidInputError, StoreClosedError)
from kvstore.restore.executor import Executor, Recomputer, Source, Timings
from kvstore.hashing import KeyMemo, iter_block_keys, namespace_salt, tokens_to_array
from kvstore.layout import ModelLayout
from kvstore.validate import check_act, check_kv
from kvstore.restore.planner import BlockForms, Plan, plan_restore
from kvstore.tiers import BlockEntry, Tier, TierManager

log = logging.getLogger(__name__)

TokensLike = Sequence[int] | np.ndarray | torch.Tensor


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
    """A paged, tiered store of KV blocks keyed by token prefix. See DESIGN.md.

    ``put``/``lookup``/``get`` cost O(tokens) for hashing plus O(blocks) index work plus the
    bytes moved; none depends on how many blocks are stored.
    """

    def __init__(self, config: StoreConfig, *, clock=time.monotonic, arena_factory=None,
                 file_ops: FileOps | None = None, adapter: Recomputer | None = None,
                 cost_model: CostModel | None = None) -> None:
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
        self._key_memo = KeyMemo(self.block_tokens, self._salt)
        self._lock = threading.RLock()
        self._closed = False
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
        kv_records = disk.recovered if config.persist and isinstance(disk, DiskArena) else []
        if kv_records or act_records:
            kv_records = [r for r in kv_records if r.kind == KIND_KV]
            act_records = [r for r in act_records if r.kind == KIND_ACT]
            self.recovered_blocks = self._tiers.restore(kv_records, present={r.key for r in act_records})
            if self._acts is not None:
                self._acts.restore(act_records, present={r.key for r in kv_records})
            log.info("recovered %d blocks from %s", self.recovered_blocks, getattr(disk, "path", "?"))
        self._counters = dict(lookups=0, puts=0, gets=0, hits=0, misses=0, put_blocks=0,
                              dedup_blocks=0, get_blocks=0, corrupt_blocks=0, rejected_blocks=0,
                              put_act_blocks=0, recomputed_blocks=0, loads=0)

    # -- construction ------------------------------------------------------------------
    def _build_tiers(self, form: str = "kv") -> list[Tier]:
        """The tiers of one payload form: KV gets ``1 - act_share`` of each tier's bytes,
        activations ``act_share`` (a tier whose share is below one activation block holds none)."""
        cfg = self.config
        tiers: list[Tier] = []
        slot = self.block_bytes if form == "kv" else self.act_block_bytes
        for name in TIERS:
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
                                  f"{name}_bytes={capacity} is below one block ({self.block_bytes} bytes "
                                  f"for block_tokens={self.block_tokens}); use 0 to disable the tier")
            if name == "disk":
                arena = self._make_disk_arena(capacity, form)
            elif form == "act":  # never shared with sidecar clients: a plain arena
                dev = self.device if name == "device" else torch.device("cpu")
                arena = MemoryArena(capacity // slot, slot, device=dev, pin=(name == "host"))
            else:
                dev = self.device if name == "device" else torch.device("cpu")
                arena = self._make_memory_arena(name, capacity // self.block_bytes, dev)
            try:
                policy = make_policy(cfg.policy_for(name), arena.num_slots)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            tiers.append(Tier(name, arena, policy))
        if not tiers:
            raise ConfigError("every tier is disabled: set device_bytes, host_bytes or disk_bytes" if form == "kv"
                              else f"act_share={cfg.act_share} leaves no tier room for one activation block "
                                   f"({slot} bytes)")
        return tiers

    def _make_disk_arena(self, capacity: int, form: str = "kv") -> DiskArena:
        cfg = self.config
        slot = self.block_bytes if form == "kv" else self.act_block_bytes
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
        safe_ns = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.namespace)[:64]
        path = directory / f"{safe_ns}-{form}.slab"
        existing = path.stat().st_size if path.exists() else 0
        free = shutil.disk_usage(directory).free + existing
        if free < need:
            raise ConfigError(f"disk_path {directory} has {free} bytes free; disk_bytes needs {need}")
        try:
            cls = DiskArena if form == "kv" else ActDiskArena
            return cls(path, num_slots, slot, fsync=cfg.fsync, fsync_interval_s=cfg.fsync_interval_s,
                       persist=cfg.persist, file_ops=self._file_ops, preallocate=cfg.disk_preallocate)
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
        if len(arr) % self.block_tokens:
            raise InvalidInputError(f"get needs whole blocks: {len(arr)} tokens is not a multiple of "
                                    f"block_tokens={self.block_tokens} (use lookup() for the cached length)")
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
        blocks = kv[:, :, : nb * bt].unflatten(2, (nb, bt)).permute(2, 0, 1, 3, 4, 5)  # [nb, L, 2, bt, H, D]
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
                src = blocks if len(new_pos) == nb else blocks[new_pos]
                parents = [keys[i - 1] if i > 0 else None for i in new_pos]
                stored = self._tiers.add([keys[i] for i in new_pos], parents, src)
                self._counters["put_blocks"] += stored
                self._counters["rejected_blocks"] += len(new_pos) - stored
            self._tiers.touch([e for e in present if e is not None and e.key in index])
            if self._acts is not None:
                self._acts.touch([e for e in present_act if e is not None and e.key in act_index])
            return self._cached_prefix(keys, self.adapter) * bt

    def _cached_prefix(self, keys: list[bytes], adapter: Recomputer | None) -> int:
        """Blocks of the longest prefix with KV, or activations when ``adapter`` can recompute
        them (never counting a block the caller could not restore). Under the lock; O(blocks)."""
        index = self._tiers.index
        n = 0
        if self._acts is not None and adapter is not None:
            act_index = self._acts.index
            for key in keys:
                if key not in index and key not in act_index:
                    break
                n += 1
            return n
        for key in keys:
            if key not in index:
                break
            n += 1
        return n

    def lookup(self, tokens: TokensLike, adapter: Recomputer | None = None) -> int:
        """Length in tokens of the longest cached prefix of ``tokens`` (a multiple of block_tokens).

        A block kept only as activations counts when a recompute adapter is known (``adapter``
        or the store's own); without one it is a miss.
        """
        self._check_open()
        arr = tokens_to_array(tokens)
        total = len(arr) // self.block_tokens
        keys = self._key_memo.cached(arr)
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
            n = self._cached_prefix(keys, adapter or self.adapter)
            self._counters["lookups"] += 1
            self._counters["hits"] += n
            self._counters["misses"] += total - n
            return n * self.block_tokens

    def get(self, tokens: TokensLike, device: torch.device | str | None = None, *,
            adapter: Recomputer | None = None, exact: bool = False, out: torch.Tensor | None = None,
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
        """
        self._check_open()
        arr, keys = self._whole_block_keys(tokens)
        bt = self.block_tokens
        out_device = torch.device(device) if device is not None else self.device
        adapter = adapter or self.adapter
        if (adapter is not None and self._acts is not None) or out is not None or on_layer is not None:
            kv, _, _, _ = self._restore(keys, adapter, allow_prefill=False, exact=exact, out=out,
                                        on_layer=on_layer, device=out_device)
            return kv
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

    def load(self, tokens: TokensLike, adapter: Recomputer | None = None, *, device: torch.device | str | None = None,
             out: torch.Tensor | None = None, on_layer: Callable[[int], None] | None = None) -> LoadResult:
        """Restore as much of ``tokens``' cached prefix as is worth restoring.

        Unlike ``get``, the planner may leave a suffix of the cached blocks to the engine's
        prefill (when recomputing them from tokens is faster than any restore), so
        ``tokens_restored`` may be less than ``lookup``. ``kv`` is
        ``[layers, 2, tokens_restored, kv_heads, head_dim]``; ``out`` (that shape) is
        filled in place when given. A block that fails its checksum ends the restored
        prefix there (it is dropped). Costs as ``get`` plus planning (bounded search).
        """
        self._check_open()
        arr, keys = self._keys(tokens)
        adapter = adapter or self.adapter
        out_device = torch.device(device) if device is not None else self.device
        return LoadResult(*self._restore(keys, adapter, allow_prefill=True, exact=False, out=out,
                                         on_layer=on_layer, device=out_device))

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
                ex = self._exec = Executor(self.layout, self.block_tokens, cost_model=self.cost_model)
            return ex

    def _restore(self, keys: list[bytes], adapter: Recomputer | None, *, allow_prefill: bool, exact: bool,
                 out: torch.Tensor | None, on_layer: Callable[[int], None] | None, device: torch.device
                 ) -> tuple[torch.Tensor, int, Plan | None, Timings | None]:
        """Plan and run one restore of ``keys``' cached prefix (``get``: all of it or raise).

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
            for e in kv_es:
                if e is not None:
                    self._tiers.pin(e)
            if acts is not None:
                acts.touch([a for a in act_es if a is not None])
                for a in act_es:
                    if a is not None:
                        acts.pin(a)
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
                plan = plan_restore(forms, self.layout, bt, self.cost_model.profile, allow_prefill=allow_prefill)
            m = n - plan.prefill_tokens // bt
            shape = self.layout.kv_shape(m * bt)
            if out is None:
                result = torch.empty(shape, dtype=self.layout.dtype, device=device)
            elif tuple(out.shape) != shape or out.dtype != self.layout.dtype or not out.is_contiguous():
                raise InvalidInputError(f"out must be a contiguous {shape} tensor of {self.layout.dtype}, "
                                        f"got {tuple(out.shape)} {out.dtype}")
            else:
                result = out
            kv_src = [Source(t.name, t.arena, p[2]) if p and t else None for p, t in zip(kv_placed, kv_tiers)]
            act_src = [Source(t.name, t.arena, p[2]) if p and t else None for p, t in zip(act_placed, act_tiers)]
            res = self._executor().run(plan.steps, kv_src, act_src, result, adapter, on_layer)
            corrupt, io_errors, timings = res.corrupt, res.io_errors, res.timings
        finally:
            with self._lock:
                for p in kv_placed:
                    if p is not None:
                        self._tiers.unpin(*p)
                for p in act_placed:
                    if p is not None and acts is not None:
                        acts.unpin(*p)
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
                        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
                        out6 = result.view(L, 2, result.shape[2] // bt, bt, H, D)
                        rows = out6[:, :, low].permute(2, 0, 1, 3, 4, 5).cpu()
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
            if self._acts is not None:
                self._acts.clear()
            return self._tiers.clear()

    @staticmethod
    def _tier_stats(manager: TierManager, slot_bytes: int) -> dict[str, dict]:
        tiers = {}
        for tier in manager.tiers:
            c = tier.counters
            tiers[tier.name] = {
                "capacity_blocks": tier.pool.num_slots, "used_blocks": tier.pool.used_count,
                "capacity_bytes": tier.pool.num_slots * slot_bytes,
                "used_bytes": tier.pool.used_count * slot_bytes,
                "policy": tier.policy.name, "device": str(tier.arena.device) if not tier.is_disk else "disk",
                "hits": c.hits, "evictions": c.evictions, "demotions_in": c.demotions_in,
                "promotions_in": c.promotions_in, "drops": c.drops,
                "io_errors": c.io_errors, "degraded": tier.degraded,
            }
        return tiers

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
            }

    def _check(self) -> None:
        """Assert every invariant of both tier managers (KV and activations)."""
        with self._lock:
            self._tiers._check()
            if self._acts is not None:
                self._acts._check()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
        arr, keys = self._whole_block_keys(tokens)
        bt = self.block_tokens
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
