"""The restore executor: runs a :class:`~kvstore.restore.planner.Plan` with reads and recompute overlapped.

Three workers, matching the planner's resources (so its schedule is what actually runs):

* **disk->host** (a thread): cold reads of disk payloads into host staging, activations
  first, then KV, each in prefix order, in chunks of about ``chunk_bytes`` (one positioned
  ``preadv`` per run of slots; checksums verified by the arena);
* **host->device** (the calling thread): moves payloads into place in priority order --
  host activations, then disk activations as they arrive, then host KV, then disk KV as it
  arrives. KV is copied straight into the caller's ``[layers, 2, T, kv_heads, head_dim]``
  tensor (one strided copy per run of consecutive blocks and slots); activations are laid
  out ``[layers, tokens, hidden]`` for the compute worker;
* **compute** (a thread): recomputes K/V from activations (``adapter.recompute_kv``: one
  GEMM per layer per run of consecutive blocks) straight into the caller's tensor.

On CPU the GEMMs (torch intra-op threads) and the file reads release the GIL, so the three
overlap; on a 2-core machine they also compete for the cores, which the cost model learns
because every observed chunk time (contention included) refines it online
(``CostModel.observe_transfer``/``observe_recompute``). On CUDA the host->device moves run on
a copy stream from pinned memory (whole runs of slots by DMA, re-layout on the device), the
GEMMs on a compute stream that waits on a per-chunk event of the copy stream; both streams
first wait for the caller's current stream (``out`` may still be in use there) and the run
ends by waiting for those two streams only (never the whole device: an engine's own kernels
and NCCL on other streams are not waited for). On CUDA every copy and recompute is timed by
CUDA events recorded on the stream it ran on, read after the run (a host clock around an
asynchronous copy measures its enqueue, which inflated the learned link speed).
Activations in a CUDA tier restored into a CPU ``out`` cross through the copy primitive
(:class:`allocator.rowcopy.Copier`) and are waited for before the CPU reads them.

Layer by layer (``on_layer``): the last stage runs layer-major instead -- for layer ``l``,
copy every KV block's layer ``l`` and recompute every activation block's layer ``l`` -- and
``on_layer(l)`` is called (on the calling thread, in order) as soon as layer ``l`` is
complete, so an engine can start layer ``l`` while ``l + 1`` loads. Disk reads still come
whole (a slot holds all layers of a block), so layer 0 waits for them.

Costs: O(bytes) moved, one Python step per chunk or per run of consecutive blocks (not per
byte); extra memory is the staging of disk payloads and of activations (at most the
restored blocks' payload bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import queue
import threading
import time
from typing import Any, Protocol

import torch

from allocator import Arena, CorruptSlotError, DiskArena, MemoryArena
from allocator.rowcopy import DEFAULT_COPIER, Copier, copy_rows
from kvstore.restore.costmodel import CostModel
from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout, as_block_rows, pair_runs, slot_runs
from kvstore.restore.planner import Step

_TIER_RANK = {"device": 0, "host": 1, "disk": 2}


class Recomputer(Protocol):
    """What the executor needs of a model adapter (``kvstore.models.HFAdapter`` fits)."""

    layout: ModelLayout

    def recompute_kv(self, act: torch.Tensor, start_pos: int = 0, layers: tuple[int, int] | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Source:
    """Where one payload of one block sits: ``arena`` slot ``slot`` of tier ``tier``."""

    tier: str
    arena: Arena
    slot: int


@dataclass
class Timings:
    """What one restore took (seconds, from the executor's clock) and moved."""

    total_s: float = 0.0
    first_layer_s: float | None = None
    busy_s: dict[str, float] = field(default_factory=dict)  # resource -> seconds busy
    bytes: dict[str, int] = field(default_factory=dict)  # resource -> bytes moved
    blocks: dict[str, int] = field(default_factory=dict)  # action -> blocks

    def add(self, resource: str, seconds: float, nbytes: int = 0) -> None:
        self.busy_s[resource] = self.busy_s.get(resource, 0.0) + seconds
        self.bytes[resource] = self.bytes.get(resource, 0) + nbytes


@dataclass
class ExecResult:
    timings: Timings
    corrupt: list[tuple[int, str]]  # (block, "kv" | "act") whose bytes failed their checksum
    io_errors: list[tuple[str, OSError]]  # (tier, error): the tier should be marked degraded


@dataclass
class _Chunk:
    payload: str  # "kv" | "act"
    tier: str
    arena: Arena
    blocks: list[int]
    slots: list[int]
    rows: torch.Tensor | None = None  # [c, *slot shape] once read from disk


def _runs(blocks: Sequence[int], slots: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Split positions into ``(start, end)`` runs of consecutive blocks (and slots, if given). O(len)."""
    return slot_runs(blocks) if slots is None else pair_runs(blocks, slots)


#: disk chunk reads kept in flight during a restore
_DISK_QUEUE_DEPTH = 3


class Executor:
    """Runs restore plans for one layout/block size (see module doc). Thread-safe: every
    ``run`` owns its workers and buffers; the cost model has its own lock.

    ``clock`` is injectable (tests); ``chunk_bytes`` trades pipelining (small chunks let
    compute start early) against per-chunk overhead; ``copier`` is the cross-device copy
    primitive (injectable: the delayed-copy test double).
    """

    def __init__(self, layout: ModelLayout, block_tokens: int, *, cost_model: CostModel | None = None,
                 clock: Callable[[], float] = time.perf_counter, chunk_bytes: int = 4 << 20,
                 copier: Copier | None = None) -> None:
        self.copier = copier or DEFAULT_COPIER
        self.layout = layout
        self.block_tokens = block_tokens
        self.cost_model = cost_model
        self.clock = clock
        self.chunk_bytes = chunk_bytes
        L, bt = layout.num_layers, block_tokens
        self.kv_slot_shape = layout.block_shape(bt)
        self.act_slot_shape = (L, bt, layout.hidden_size)

    # ------------------------------------------------------------------ planning the chunks
    def _chunks(self, steps: Sequence[Step], kv_src: Sequence[Source | None],
                act_src: Sequence[Source | None]) -> list[_Chunk]:
        """Group restored blocks by (payload, tier) in the planner's link priority; cut into chunks."""
        groups: dict[tuple[str, str, int], list[int]] = {}
        arenas: dict[int, Arena] = {}
        for s in steps:
            if s.action == "prefill":
                continue
            payload = "kv" if s.action == "kv" else "act"
            src = (kv_src if payload == "kv" else act_src)[s.block]
            if src is None:
                raise InvalidInputError(f"block {s.block}: plan says {s.action} but no {payload} source")
            arenas[id(src.arena)] = src.arena
            groups.setdefault((payload, src.tier, id(src.arena)), []).append(s.block)
        order = sorted(groups, key=lambda g: (0 if g[0] == "act" else 1, _TIER_RANK[g[1]]))
        chunks: list[_Chunk] = []
        for payload, tier, arena_id in order:
            blocks = groups[(payload, tier, arena_id)]
            srcs = kv_src if payload == "kv" else act_src
            slot_bytes = self.layout.kv_block_bytes(self.block_tokens) if payload == "kv" \
                else self.layout.act_block_bytes(self.block_tokens)
            # KV from memory needs no pipelining of its own (nothing waits on a part of it), and
            # every chunk is one more copy call: cut it coarser
            per = max(1, self.chunk_bytes * (16 if payload == "kv" and tier != "disk" else 1) // slot_bytes)
            for i in range(0, len(blocks), per):
                part = blocks[i:i + per]
                chunks.append(_Chunk(payload, tier, arenas[arena_id], part,
                                     [srcs[b].slot for b in part]))  # type: ignore[union-attr]
        return chunks

    # ------------------------------------------------------------------ run
    def run(self, steps: Sequence[Step], kv_src: Sequence[Source | None], act_src: Sequence[Source | None],
            out: torch.Tensor, adapter: Recomputer | None = None,
            on_layer: Callable[[int], None] | None = None) -> ExecResult:
        """Restore the non-prefill blocks of ``steps`` into ``out``.

        ``kv_src[b]``/``act_src[b]``: block ``b``'s payload sources (None where absent).
        ``out``: ``[layers, 2, m * block_tokens, kv_heads, head_dim]`` (contiguous, or a token
        prefix of a contiguous tensor) of the
        layout's dtype, where ``m`` is the number of restored (leading) blocks; block ``b``
        covers tokens ``b*bt .. (b+1)*bt - 1`` and is recomputed at those positions.
        Blocks that fail their checksum are reported (their rows of ``out`` are undefined).
        """
        lay, bt = self.layout, self.block_tokens
        m = sum(1 for s in steps if s.action != "prefill")
        if any(s.action == "prefill" for s in steps[:m]):
            raise InvalidInputError("only a suffix of the plan may be left for prefill")
        want = lay.kv_shape(m * bt)
        packed = out.dim() == 5 and out.stride(4) == 1 and out.stride(3) == lay.head_dim \
            and out.stride(2) == lay.num_kv_heads * lay.head_dim  # tokens packed: blocks are views
        if tuple(out.shape) != want or out.dtype != lay.dtype or not packed:
            raise InvalidInputError(f"out must be a {want} tensor of {lay.dtype} with packed tokens "
                                    f"(contiguous, or a token prefix of a contiguous one), "
                                    f"got {tuple(out.shape)} {out.dtype}")
        chunks = self._chunks(steps[:m], kv_src, act_src)
        if any(c.payload == "act" for c in chunks) and adapter is None:
            raise InvalidInputError("the plan recomputes blocks but no adapter was given")
        timings = Timings(blocks={a: sum(1 for s in steps if s.action == a) for a in ("kv", "recompute", "prefill")})
        state = _RunState(self, out, adapter, timings, on_layer)
        t0 = self.clock()
        state.run(chunks)
        timings.total_s = self.clock() - t0
        if state.first_layer_at is not None:
            timings.first_layer_s = state.first_layer_at - t0
        return ExecResult(timings, state.corrupt, state.io_errors)


class _RunState:
    """One restore's workers and buffers (see module doc for the roles)."""

    def __init__(self, ex: Executor, out: torch.Tensor, adapter: Recomputer | None, timings: Timings,
                 on_layer: Callable[[int], None] | None) -> None:
        self.ex, self.out, self.adapter, self.timings, self.on_layer = ex, out, adapter, timings, on_layer
        bt = ex.block_tokens
        self.out_rows = as_block_rows(out, bt)  # [blocks, L, 2, bt, H, D]: block b is row b
        self.cuda = out.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=out.device) if self.cuda else None
        self.compute_stream = torch.cuda.Stream(device=out.device) if self.cuda else None
        if self.cuda:
            # ``out`` (and the memory the caching allocator hands either stream) was last used
            # on the caller's stream: both side streams start after it.
            caller = torch.cuda.current_stream(out.device)
            self.copy_stream.wait_stream(caller)
            self.compute_stream.wait_stream(caller)
        self.corrupt: list[tuple[int, str]] = []
        self.io_errors: list[tuple[str, OSError]] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.first_layer_at: float | None = None
        self.compute_q: queue.Queue = queue.Queue()  # (chunk, act tensor, cuda event); None ends
        self.act_left = 0
        self.layer_done: list[_Parts] = []
        self.next_callback = 0
        # CUDA: (start event, end event, what to credit the seconds to), read after the run
        self._spans: list[tuple[Any, Any, Callable[[float], None]]] = []
        self._after_spans: list[Callable[[], None]] = []

    # -- timing --------------------------------------------------------------------------
    def _timed(self, stream: Any, fn: Callable[[], Any], credit: Callable[[float], None]) -> Any:
        """``fn()``, its duration credited: by the executor's clock on CPU (the work is done
        when ``fn`` returns), by CUDA events on ``stream`` around the work it queues on CUDA
        (read after the run, when the streams are idle; the host never waits to time)."""
        if not self.cuda:
            t = self.ex.clock()
            result = fn()
            credit(self.ex.clock() - t)
            return result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        result = fn()
        end.record(stream)
        with self.lock:
            self._spans.append((start, end, credit))
        return result

    def _read_spans(self) -> None:
        """Credit every CUDA span (the streams have been waited for), then the totals."""
        for start, end, credit in self._spans:
            credit(start.elapsed_time(end) / 1e3)
        for fn in self._after_spans:
            fn()

    # -- helpers -------------------------------------------------------------------------
    def _observe_link(self, link: str, nbytes: int, seconds: float) -> None:
        self.timings.add(link, seconds, nbytes)
        cm = self.ex.cost_model
        if cm is not None and link in cm.profile.links:
            cm.observe_transfer(link, nbytes, seconds)

    def _slot_shape(self, payload: str) -> tuple[int, ...]:
        return self.ex.kv_slot_shape if payload == "kv" else self.ex.act_slot_shape

    def _read_disk(self, ch: _Chunk) -> int:
        """disk->host: read a chunk's slots into fresh (pinned on CUDA) staging; drop corrupt rows."""
        rows = torch.empty((len(ch.slots), *self._slot_shape(ch.payload)), dtype=self.ex.layout.dtype,
                           pin_memory=self.cuda)
        t = self.ex.clock()
        try:
            ch.arena.read(ch.slots, rows)
        except CorruptSlotError as exc:
            bad = set(exc.slots)
            keep = [i for i, s in enumerate(ch.slots) if s not in bad]
            with self.lock:
                self.corrupt.extend((b, ch.payload) for b, s in zip(ch.blocks, ch.slots) if s in bad)
            ch.blocks, ch.slots = [ch.blocks[i] for i in keep], [ch.slots[i] for i in keep]
            rows = rows[keep]
        except OSError as exc:  # EIO and friends: every block of the chunk is lost
            with self.lock:
                self.io_errors.append((ch.tier, exc))
                self.corrupt.extend((b, ch.payload) for b in ch.blocks)
            ch.blocks, ch.slots = [], []
            rows = rows[:0]
        ch.rows = rows
        if not isinstance(ch.arena, DiskArena):
            return 0  # an encoded tier: its time is read + decode, not the disk link's (not observed)
        return rows.numel() * rows.element_size()

    def _source(self, ch: _Chunk) -> tuple[torch.Tensor, bool]:
        """(rows, by_slot): disk chunks' staging indexed by position, memory arenas' whole
        slot view indexed by slot (no gather: runs are copied straight from the arena)."""
        if ch.rows is not None:
            return ch.rows, False
        assert isinstance(ch.arena, MemoryArena)
        return ch.arena.rows(self.ex.layout.dtype, self._slot_shape(ch.payload)), True

    def _pieces(self, ch: _Chunk, by_slot: bool):
        """(b0, b1, r0, r1): block range and source row range of each run."""
        for i0, i1 in _runs(ch.blocks, ch.slots if by_slot else None):
            r0, r1 = (ch.slots[i0], ch.slots[i1 - 1] + 1) if by_slot else (i0, i1)
            yield ch.blocks[i0], ch.blocks[i1 - 1] + 1, i0, i1, r0, r1

    def _act_layout(self, ch: _Chunk) -> torch.Tensor:
        """A chunk's activations as ``[L, c*bt, hidden]`` on the compute device (their
        host->device hop: per layer, a run's tokens become one contiguous GEMM input).

        Each run crosses with the copy primitive; when the compute device is the host (a CPU
        ``out``) and the activations sit on a device, the host waits for those copies before
        it reads them (a non_blocking device->host copy returns before its bytes land)."""
        rows, by_slot = self._source(ch)
        L, bt, hid = self.ex.act_slot_shape
        act = torch.empty((L, len(ch.blocks) * bt, hid), dtype=self.ex.layout.dtype, device=self.out.device)
        act4 = act.view(L, len(ch.blocks), bt, hid)
        copier = self.ex.copier
        here = [(i0, i1, copier.to(rows[r0:r1], self.out)) for _, _, i0, i1, r0, r1 in self._pieces(ch, by_slot)]
        if not self.cuda and copier.crosses(rows, self.out):
            copier.wait(rows)  # device -> host: the copies below read the staging on the CPU
        for i0, i1, src in here:
            act4[:, i0:i1].copy_(src.permute(1, 0, 2, 3))
        return act

    def _place_kv(self, ch: _Chunk, layer: int | None = None) -> int:
        """Copy a chunk's KV (all layers, or one) into ``out`` with :func:`allocator.rowcopy.copy_rows`
        (one strided copy per run; across devices runs of slots by DMA, re-layout on the device). Bytes."""
        rows, by_slot = self._source(ch)
        src_idx = ch.slots if by_slot else range(len(ch.blocks))
        dst = self.out_rows
        if layer is None:
            copy_rows(rows, src_idx, dst, ch.blocks)
        else:
            copy_rows(rows[:, layer], src_idx, dst[:, layer], ch.blocks)
        if not self.cuda and self.ex.copier.crosses(rows, self.out):
            self.ex.copier.wait(rows)  # device -> host: in before ``out`` is handed back
        per_layer = 1 if layer is not None else self.ex.layout.num_layers
        return len(ch.blocks) * self.ex.layout.kv_block_bytes(self.ex.block_tokens) * per_layer \
            // self.ex.layout.num_layers

    def _on_copy_stream(self, fn: Callable[[], Any]) -> Any:
        if not self.cuda:
            return fn()
        with torch.cuda.stream(self.copy_stream):
            return fn()

    def _recompute(self, ch: _Chunk, act: torch.Tensor, credit: Callable[[float], None],
                   layers: tuple[int, int] | None = None) -> None:
        """Recompute a chunk's blocks (one call per run of consecutive blocks) into ``out``;
        its seconds go to ``credit`` (CUDA: events on the compute stream, see ``_timed``)."""
        bt = self.ex.block_tokens
        a, b = layers if layers is not None else (0, self.ex.layout.num_layers)
        assert self.adapter is not None

        def work() -> None:
            for i0, i1 in _runs(ch.blocks):
                b0, b1 = ch.blocks[i0], ch.blocks[i1 - 1] + 1
                self.adapter.recompute_kv(act[:, i0 * bt:i1 * bt], start_pos=b0 * bt, layers=(a, b),
                                          out=self.out[a:b, :, b0 * bt:b1 * bt])
        self._timed(self.compute_stream, work, credit)

    def _observe_recompute(self, tokens: int, seconds: float) -> None:
        self.timings.add("compute", seconds)
        if self.ex.cost_model is not None and tokens:
            self.ex.cost_model.observe_recompute(self.ex.layout, tokens, seconds)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            try:
                fn()
            except BaseException as exc:  # re-raised on the calling thread
                with self.lock:
                    self.errors.append(exc)
        return wrapped

    # -- workers -------------------------------------------------------------------------
    def _disk_worker(self, disk_chunks: list[_Chunk], arrived: queue.Queue) -> None:
        """Reads disk chunks with a few in flight (a storage device wants a queue depth above
        one) and hands them on in plan order. The link is observed once, over the whole
        phase: per-chunk times of overlapped reads would understate its bandwidth."""
        if not disk_chunks:
            arrived.put(None)
            return
        t0 = self.ex.clock()
        nbytes = 0
        try:
            with ThreadPoolExecutor(max_workers=_DISK_QUEUE_DEPTH, thread_name_prefix="kvstore-restore-read") as pool:
                futures = [pool.submit(self._read_disk, ch) for ch in disk_chunks]
                for ch, fut in zip(disk_chunks, futures):
                    if self.errors:
                        for f in futures:
                            f.cancel()
                        break
                    nbytes += fut.result()
                    arrived.put(ch)
        finally:
            if nbytes:
                self._observe_link("disk->host", nbytes, self.ex.clock() - t0)
            arrived.put(None)

    def _compute_worker(self) -> None:
        if not self.cuda:
            self._compute_loop()
            return
        with torch.cuda.device(self.out.device), torch.cuda.stream(self.compute_stream):
            self._compute_loop()  # GEMMs on their own stream, each chunk after its copy's event

    def _compute_loop(self) -> None:
        bt = self.ex.block_tokens
        wait = (lambda ev: torch.cuda.current_stream(self.out.device).wait_event(ev)) if self.cuda else None
        if self.on_layer is None:
            while (item := self.compute_q.get()) is not None:
                ch, act, ev = item
                if ch.blocks:
                    if ev is not None:
                        wait(ev)
                    tokens = len(ch.blocks) * bt
                    self._recompute(ch, act, lambda sec, tokens=tokens: self._observe_recompute(tokens, sec))
            return
        items = []  # layer-major: every activation chunk first (they are read first)
        while (item := self.compute_q.get()) is not None:
            items.append(item)
            if item[2] is not None:
                wait(item[2])
        total = [0.0]

        def add(sec: float) -> None:
            total[0] += sec
        for layer in range(self.ex.layout.num_layers):
            for ch, act, _ in items:
                if ch.blocks and not self.errors:
                    self._recompute(ch, act, add, (layer, layer + 1))
            if self.cuda:
                self.compute_stream.synchronize()  # layer complete before on_layer may fire
            self.layer_done[layer].set_part("compute")
        tokens = sum(len(ch.blocks) for ch, _, _ in items) * bt
        finish = lambda: self._observe_recompute(tokens, total[0])  # noqa: E731
        if self.cuda:
            with self.lock:
                self._after_spans.append(finish)
        else:
            finish()

    def _send_act(self, ch: _Chunk) -> None:
        ev = None
        nbytes = len(ch.blocks) * self.ex.layout.act_block_bytes(self.ex.block_tokens)
        link = "host->device" if ch.tier != "device" else "device"
        act = self._timed(self.copy_stream, lambda: self._on_copy_stream(lambda: self._act_layout(ch)),
                          lambda sec: self._observe_link(link, nbytes, sec))
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            act.record_stream(self.compute_stream)  # allocated on the copy stream, read by the GEMMs
        self.compute_q.put((ch, act, ev))
        self.act_left -= 1
        if self.act_left == 0:
            self.compute_q.put(None)  # the compute worker has everything

    def _send_kv(self, ch: _Chunk, layer: int | None = None) -> int:
        """Place a chunk's KV (all layers: timed and observed here; one layer: the caller
        times the layer). Queued on the copy stream on CUDA (nothing waits for it here)."""
        if not ch.blocks:
            return 0
        if layer is not None:
            return self._on_copy_stream(lambda: self._place_kv(ch, layer))
        link = "host->device" if ch.tier != "device" else "device"
        nb = [0]

        def place() -> None:
            nb[0] = self._on_copy_stream(lambda: self._place_kv(ch))
        self._timed(self.copy_stream, place, lambda sec: self._observe_link(link, nb[0], sec))
        return nb[0]

    def _fire_callbacks(self, block: bool) -> None:
        """Call ``on_layer`` for every complete layer, in order (waiting for all if ``block``)."""
        while self.next_callback < len(self.layer_done):
            parts = self.layer_done[self.next_callback]
            if not parts.wait(0):
                if not block:
                    return
                while not parts.wait(0.02):
                    if self.errors:
                        return
            if self.first_layer_at is None:
                self.first_layer_at = self.ex.clock()
            assert self.on_layer is not None
            self.on_layer(self.next_callback)
            self.next_callback += 1

    def run(self, chunks: list[_Chunk]) -> None:
        # encoded tiers (a codec arena) decode into staging like a disk read
        disk_chunks = [c for c in chunks if c.tier == "disk" or not isinstance(c.arena, MemoryArena)]
        mem_chunks = [c for c in chunks if c.tier != "disk" and isinstance(c.arena, MemoryArena)]
        self.act_left = sum(1 for c in chunks if c.payload == "act")
        arrived: queue.Queue = queue.Queue()  # disk chunks as read; None ends
        L = self.ex.layout.num_layers
        self.layer_done = [_Parts({"copy", "compute"} if self.act_left else {"copy"}) for _ in range(L)]
        threads = []
        if disk_chunks:
            threads.append(threading.Thread(target=self._guard(lambda: self._disk_worker(disk_chunks, arrived)),
                                            name="kvstore-restore-disk", daemon=True))
        else:
            arrived.put(None)  # nothing to read: no thread to start
        if self.act_left:
            threads.append(threading.Thread(target=self._guard(self._compute_worker),
                                            name="kvstore-restore-compute", daemon=True))
        for th in threads:
            th.start()
        try:
            self._mover(mem_chunks, arrived)
            if self.on_layer is not None:
                self._fire_callbacks(block=True)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.compute_q.put(None)  # unblocks the compute worker after an error
            for th in threads:
                th.join()
            if self.cuda:
                # the two streams this restore used, not the device (see module doc)
                self.copy_stream.synchronize()
                self.compute_stream.synchronize()
        if self.errors:
            raise self.errors[0]
        self._read_spans()

    def _mover(self, mem_chunks: list[_Chunk], arrived: queue.Queue) -> None:
        """host->device worker (calling thread): host activations, disk activations as they
        arrive, host KV, disk KV as it arrives (the planner's link priority)."""
        layerwise = self.on_layer is not None
        kv_chunks: list[_Chunk] = []  # layerwise: KV placed by the layer loop
        disk_done = False

        def drain(block: bool) -> bool:
            nonlocal disk_done
            if disk_done:
                return False
            try:
                ch = arrived.get(block=block)
            except queue.Empty:
                return False
            if ch is None:
                disk_done = True
            elif ch.payload == "act":
                self._send_act(ch)
            elif layerwise:
                kv_chunks.append(ch)
            else:
                self._send_kv(ch)
            return not disk_done

        for ch in mem_chunks:
            if ch.payload == "act":
                self._send_act(ch)
        for ch in mem_chunks:
            if ch.payload == "kv":
                while drain(block=False):  # arrived disk activations overtake host KV
                    pass
                if layerwise:
                    kv_chunks.append(ch)
                else:
                    self._send_kv(ch)
        while drain(block=True):
            pass
        if self.errors:
            raise self.errors[0]
        if not layerwise:
            return
        kv_chunks.sort(key=lambda c: c.blocks[0] if c.blocks else 0)
        for layer in range(self.ex.layout.num_layers):
            nb = [0]

            def place(layer: int = layer) -> None:
                nb[0] = sum(self._send_kv(ch, layer) for ch in kv_chunks)
            self._timed(self.copy_stream, place,
                        lambda sec, nb=nb: self._observe_link("host->device", nb[0], sec) if nb[0] else None)
            if self.cuda:
                self.copy_stream.synchronize()  # layer complete before on_layer fires
            self.layer_done[layer].set_part("copy")
            self._fire_callbacks(block=False)


class _Parts:
    """Set once every named part is done (thread-safe)."""

    def __init__(self, parts: set[str]) -> None:
        self._missing = set(parts)
        self._cond = threading.Condition()

    def set_part(self, name: str) -> None:
        with self._cond:
            self._missing.discard(name)
            if not self._missing:
                self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._missing, timeout)
