"""``KVStore``: the embedded API (docs/architecture.md) over the tier manager.

Thread safety: one re-entrant lock guards the index and the tiers. ``get`` pins its blocks
under the lock, copies them out *without* holding it (disk reads and large copies do not
stall other callers), then takes the lock again to unpin and promote.

The store is the embedded API only. Its tiers are built by :mod:`kvstore.builder` (arenas,
slab files, crash recovery, codecs on tiers, the remote tier), and the lease/staging
protocol another process (the sidecar) uses is its port, ``store.port``
(:class:`kvstore.port.StorePort`), not methods of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import logging
import shutil
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from allocator import CorruptSlotError, FileOps, MemoryArena, default_device
from allocator.codec_arena import CodecArena
from allocator.rowcopy import DEFAULT_COPIER
from allocator.transfer import copier_of
from kvstore import paged
from kvstore.saves import AsyncSaver, PutHandle
from kvstore.activations import put_forms
from kvstore.builder import build_store_tiers, slab_filename  # noqa: F401 (slab_filename: re-exported)
from kvstore.config import StoreConfig
from kvstore.restore.costmodel import (DEFAULT_DECODE_BPS, ComputeCost, CostModel, CostProfile, LinkCost,
                                       decode_rate)
from kvstore.errors import BlockNotFoundError, ConfigError, InvalidInputError, StoreClosedError
from kvstore.port import StorePort
from kvstore.restore.executor import Executor, Recomputer, Source, Timings
from kvstore.hashing import KeyMemo, iter_block_keys, namespace_salt, tokens_to_array
from kvstore.layout import ModelLayout, as_block_rows
from kvstore.validate import check_act, check_kv, check_start, check_whole_blocks
from kvstore.remote_tier import RemoteTier
from kvstore.restore.planner import BlockForms, Plan, TierCodec, plan_restore
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
    """A paged, tiered store of KV blocks keyed by token prefix. See docs/architecture.md.

    ``put``/``lookup``/``get`` cost O(tokens) for hashing plus O(blocks) index work plus the
    bytes moved; none depends on how many blocks are stored. ``port`` (made once with the
    store) is the lease/staging protocol for another process (:mod:`kvstore.port`).
    """

    def __init__(self, config: StoreConfig, *, clock=time.monotonic, arena_factory=None,
                 file_ops: FileOps | None = None, adapter: Recomputer | None = None,
                 cost_model: CostModel | None = None, owner: str | None = None) -> None:
        # ``owner``: the authenticated identity (a CurveZMQ key name) this namespace belongs to.
        # It is recorded in the slabs (a restart reopens them for that owner only) and salts
        # the block keys, so ownership lives with the data, not in a server's memory.
        self.owner = owner
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
        self.port: StorePort = StorePort(self)  # the lease/staging protocol for the sidecar
        # arenas, slabs, crash recovery and the remote tier: kvstore.builder (it cleans up after itself)
        built = build_store_tiers(config, device=self.device, owner=owner, clock=clock, file_ops=file_ops,
                                  arena_factory=arena_factory)
        self._tiers: TierManager = built.tiers
        self._acts: TierManager | None = built.acts  # activations: a second manager, keyed like the KV one
        self._tmpdir = built.tmpdir
        self.recovered_blocks = built.recovered_blocks
        self._remote = built.remote
        self._saver = AsyncSaver()
        self._counters = dict(lookups=0, puts=0, gets=0, hits=0, misses=0, put_blocks=0,
                              dedup_blocks=0, get_blocks=0, corrupt_blocks=0, rejected_blocks=0,
                              put_act_blocks=0, recomputed_blocks=0, loads=0, lossy_refused=0)

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
        res = self.port.reserve(arr, 0)
        if res is None:
            return fallback()
        if res.positions:
            try:
                write(top.arena, res.positions, res.slots)
                if top.arena.device.type == "cuda":  # a same-device copy is only queued: wait for it
                    torch.cuda.current_stream(top.arena.device).synchronize()
            except BaseException:
                self.port.abort(res)
                raise
        recorded = getattr(top.arena, "checksums", None)  # a shared arena hashed what write() copied in
        return self.port.commit(res, recorded[res.slots] if recorded is not None else None)

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
            copier = copier_of(*(self._tiers.tiers[t].arena for _, t, _ in placed[:1]))
            copier.copy(result, target)
            copier.wait(target)
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
            if getattr(arena, "checksums", None) is not None:
                # A shared arena records what its writer meant to store, hashed from the
                # writer's private source beside the copy (never from the shared slots, which
                # another process can change): gather the blocks, bring them to the host, and
                # let the arena copy + hash them. One more copy than a private arena's.
                blocks = paged.take(rows, src)
                copier = copier_of(arena)
                host = copier.to(blocks, arena.data)
                copier.wait(blocks)
                arena.write(slots, host)
            elif isinstance(arena, MemoryArena):
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
            DEFAULT_COPIER.copy(out, kv)
            DEFAULT_COPIER.wait(out)
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
