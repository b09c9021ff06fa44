"""The ``remote`` tier: a Redis / Valkey server or Redis Cluster shared by a fleet of stores.

It sits below the local tiers (device, host, disk) and is *inclusive*: every block a
store puts is also written remotely, write-through (during ``put``) or write-behind (a
bounded queue drained by one thread); Redis owns the remote capacity (its ``maxmemory``
policy evicts), so nothing here counts slots. Its key is the block's chained,
namespace-salted key (:mod:`kvstore.hashing`), so equal prefixes from any machine meet and
tenants never do; its value is one self-checking record per block
(:func:`allocator.remote.pack_block`: payload, form, layout fingerprint, checksum).

The *local view* is the set of keys this store knows to be remote (it wrote or saw them);
it spares re-sending bytes on repeated puts, but is never trusted blindly: a put of blocks
it holds is checked first (one pipelined ``STRLEN`` per shard, with ``PEXPIRE`` when a TTL
is set: the TTL is refreshed on re-put, not on reads), and blocks Redis lost since (a
flush, a restart, eviction, expiry) are written again by that put. A lookup or read that
finds a block gone drops it from the view; a key of another Redis type is deleted and
counted.

Faults never reach the engine as exceptions: a shard that is down, slow or full makes its
blocks misses for a backoff period (:class:`allocator.remote.RemoteBackend`), and no call
waits longer than ``remote_deadline_s`` (the whole call: check, pool wait, send, reads).
Only a wrong password, found at start, is an error. Write-behind durability: queued blocks
wait out an outage (bounded by the queue's bytes); what a full queue, an ACL refusal or
the end of the close grace period drops is counted as ``dropped_unsent_blocks``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
import hashlib
import logging
import math
import threading
import time
from typing import Any

import numpy as np
import torch

from allocator.rowcopy import DEFAULT_COPIER, copy_host_bytes
from allocator.remote import (FORM_KV, HEADER_BYTES, MIN_TTL_S, REDIS_MAX_TTL_S, RemoteAuthError, RemoteBackend,
                              RemoteURLError, block_buffer, parse_remote_url, seal_blocks, ttl_ms, unpack_block)
from kvstore.errors import ConfigError

_HOST = torch.empty(0)  # "host memory", for the copier
log = logging.getLogger(__name__)

KEY_PREFIX = b"kvs1:"
#: at most this many keys are remembered as "known remote" (oldest forgotten first)
VIEW_LIMIT = 1 << 20
#: a write-behind batch sends at most this many blocks in one round trip per shard
WRITE_BATCH = 256
#: write-through keeps one send buffer per thread up to this size (larger puts allocate)
SCRATCH_LIMIT = 256 << 20


#: rows of the given positions of a put's keys, or None when they cannot be had any more
RowsOf = Callable[[list[int]], "torch.Tensor | None"]


def _rows(blocks: "torch.Tensor | RowsOf", positions: list[int], n: int) -> "torch.Tensor | None":
    if callable(blocks):
        return blocks(positions)
    return blocks if len(positions) == n else blocks[positions]


def layout_fingerprint(layout_desc: str, block_tokens: int, form: int = FORM_KV) -> bytes:
    """16 bytes naming what a value's payload is laid out as (layout, block size, form)."""
    h = hashlib.blake2b(digest_size=16, person=b"kvstore-remote1")
    h.update(f"{layout_desc}\x00{block_tokens}\x00{form}".encode())
    return h.digest()


#: remote deadlines and drain grace periods are finite and at most this long (an hour: past
#: it a "deadline" no longer bounds anything an engine waits for)
MAX_DEADLINE_S = 3600.0


def _seconds(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def remote_config_problems(url: str | None, write: str, ttl_s: float | None, deadline_s: float,
                           queue_bytes: int, drain_s: float = 5.0) -> list[str]:
    """Every mistake in the remote settings, one message each (empty: fine): finite, sane
    ranges, so nothing that passes here can break a put later. No I/O. O(1)."""
    out: list[str] = []
    if write not in ("through", "back"):
        out.append(f"remote_write must be 'through' or 'back', got {write!r}")
    if ttl_s is not None:
        try:
            ttl_ms(ttl_s)
        except ValueError:
            out.append(f"remote_ttl_s must be None (no expiry) or a finite number of seconds in "
                       f"[{MIN_TTL_S}, {REDIS_MAX_TTL_S:.3g}] (Redis counts milliseconds), got {ttl_s!r}")
    if not _seconds(deadline_s) or not 0 < deadline_s <= MAX_DEADLINE_S:
        out.append(f"remote_deadline_s must be a finite number of seconds in (0, {MAX_DEADLINE_S:g}], "
                   f"got {deadline_s!r}")
    if not _seconds(drain_s) or not 0 <= drain_s <= MAX_DEADLINE_S:
        out.append(f"remote_drain_s must be a finite number of seconds in [0, {MAX_DEADLINE_S:g}], got {drain_s!r}")
    if isinstance(queue_bytes, bool) or not isinstance(queue_bytes, int) or queue_bytes <= 0:
        out.append(f"remote_queue_bytes must be a positive int, got {queue_bytes!r}")
    if url is not None:
        try:
            parse_remote_url(url)
        except RemoteURLError as exc:
            out.append(str(exc))
    return out


def check_remote_config(url: str | None, write: str, ttl_s: float | None, deadline_s: float,
                        queue_bytes: int, drain_s: float = 5.0) -> None:
    """Raise :class:`ConfigError` listing every problem :func:`remote_config_problems` finds."""
    problems = remote_config_problems(url, write, ttl_s, deadline_s, queue_bytes, drain_s)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "; ".join(problems), problems)


class RemoteTier:
    """One store's view of the shared remote tier (thread-safe).

    ``put`` costs, for the blocks the view believes remote, one cheap check round trip per
    shard (``STRLEN``, plus ``PEXPIRE`` with a TTL), then one pipelined ``SET`` round trip per
    shard for the blocks that are not there (write-through) or a copy into the queue
    (write-behind); ``count_prefix`` one ``STRLEN`` round trip per shard; ``fetch`` one
    ``GET`` round trip per shard plus a checksum and a copy per block. Each call holds one
    deadline, whatever it does inside.
    """

    def __init__(self, url: str, *, layout_desc: str, block_tokens: int, block_shape: tuple[int, ...],
                 dtype: torch.dtype, write: str = "through", ttl_s: float | None = None,
                 deadline_s: float = 0.5, queue_bytes: int = 256 << 20, drain_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, max_connections: int = 16,
                 codec: Any = None) -> None:
        check_remote_config(url, write, ttl_s, deadline_s, queue_bytes, drain_s)
        self.backend = RemoteBackend(parse_remote_url(url), deadline_s=deadline_s, clock=clock,
                                     max_connections=max_connections)
        self.write = write
        self.ttl_s = ttl_s
        self.drain_s = float(drain_s)
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.block_bytes = int(np.prod(block_shape)) * torch.empty((), dtype=dtype).element_size()
        #: issue 24: a block codec (``allocator.codecs``) the values carry (None: raw). Values
        #: of a codec live under their own key prefix and fingerprint, so stores on different
        #: codecs never read -- nor delete as "damaged" -- each other's values: a fleet on
        #: mixed codecs shares nothing between codecs (refuses), and each part works alone.
        self.codec = codec if codec is not None and codec.name != "none" else None
        self.payload_bytes = self.codec.encoded_bytes if self.codec is not None else self.block_bytes
        self.value_bytes = HEADER_BYTES + self.payload_bytes
        self.fingerprint = layout_fingerprint(layout_desc + (f"\x00codec={self.codec.spec()}" if self.codec else ""),
                                              block_tokens, FORM_KV)
        self._prefix = KEY_PREFIX if self.codec is None else KEY_PREFIX + f"{self.codec.name}:".encode()
        self._lock = threading.Lock()
        self._view: OrderedDict[bytes, None] = OrderedDict()
        self._scratch = threading.local()
        self.counters = dict(written_blocks=0, write_failed_blocks=0, hit_blocks=0, miss_blocks=0,
                             damaged_blocks=0, vanished_blocks=0, lookups=0, fetches=0,
                             queue_dropped_blocks=0, checked_blocks=0, refilled_blocks=0, wrong_type_blocks=0,
                             behind_failed_blocks=0, close_dropped_blocks=0, put_errors=0)
        # link estimate from observed fetches: (latency_s, bandwidth_Bps); None until measured
        self.link: tuple[float, float] | None = None
        # write-behind: entries are (block key, value) or (block key, None): a check of a block
        # the view believes remote (missing ones leave the view, so the next put resends them)
        self.queue_bytes_limit = queue_bytes
        self._queue: deque[tuple[bytes, memoryview | None, int]] = deque()  # (key, value, attempts)
        self._queued_keys: set[bytes] = set()
        self._queue_bytes = 0
        self._reserved_bytes = 0  # being encoded by puts, not queued yet: counts against the bound
        self._inflight = 0
        self._batch = WRITE_BATCH
        self._cv = threading.Condition(self._lock)
        self._stop = False
        self._writer: threading.Thread | None = None
        try:
            self.backend.connect()
        except RemoteAuthError as exc:
            raise ConfigError(f"remote_url: {exc}") from None
        except ConnectionError as exc:  # start degraded: the store serves locally, retries later
            log.error("remote tier unreachable at start (%s); serving from local tiers, retrying with backoff", exc)
        rtt = self.backend.ping_s()
        self._rtt_s = rtt if rtt != float("inf") else 0.0  # the link's latency, for the planner
        if write == "back":
            self._writer = threading.Thread(target=self._drain, name="kvstore-remote-writer", daemon=True)
            self._writer.start()

    # -- keys and values -------------------------------------------------------------------
    @staticmethod
    def redis_key(key: bytes) -> bytes:
        """The Redis key of a raw block (a coded tier's keys: :meth:`rkey`)."""
        return KEY_PREFIX + key

    def rkey(self, key: bytes) -> bytes:
        """This tier's Redis key of ``key`` (its codec's prefix)."""
        return self._prefix + key

    def _deadline_at(self) -> float:
        return time.monotonic() + self.backend.deadline_s

    def _send_buffer(self, n: int, reuse: bool):
        """An ``n``-value send buffer. Write-through reuses one per thread (its values are
        sent before the call returns; fresh memory would cost a page fault per 4 KiB on
        every put), up to :data:`SCRATCH_LIMIT` bytes; write-behind values outlive the call."""
        size = n * self.value_bytes
        if not reuse or size > SCRATCH_LIMIT:
            return block_buffer(n, self.payload_bytes)
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.shape[0] < n:
            buf = self._scratch.buf = block_buffer(n, self.payload_bytes)
        return buf[:n]

    def _encode(self, keys: Sequence[bytes], blocks: torch.Tensor, reuse: bool = False) -> list[memoryview]:
        """Values of ``blocks`` (``[n, *block_shape]``, any strides and device): one batched
        copy into a send buffer, then a header and checksum per block."""
        n = len(keys)
        src = blocks.detach()
        if src.device.type != "cpu":  # one crossing, through the copy primitive
            host = DEFAULT_COPIER.to(src, _HOST)
            DEFAULT_COPIER.wait(src)
            src = host
        if src.stride(-1) != 1:
            src = src.contiguous()
        buf = self._send_buffer(n, reuse)
        if self.codec is not None:  # encoded straight into the send buffer's payloads
            self.codec.encode(src, torch.from_numpy(buf[:, HEADER_BYTES:]))
            return seal_blocks(buf, keys, FORM_KV, self.fingerprint)
        dst = buf[:, HEADER_BYTES:]
        dst.shape = (n, *self.block_shape[:-1], self.block_shape[-1] * src.element_size())  # a view, never a copy
        copy_host_bytes(dst, src)
        return seal_blocks(buf, keys, FORM_KV, self.fingerprint)

    def _remember(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for k in keys:
                self._view[k] = None
                self._view.move_to_end(k)
            while len(self._view) > VIEW_LIMIT:
                self._view.popitem(last=False)

    def _forget(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for k in keys:
                if self._view.pop(k, 0) is None:
                    self.counters["vanished_blocks"] += 1

    def _classify(self, keys: Sequence[bytes], lengths: Sequence[Any]) -> tuple[list[int], list[int]]:
        """From ``STRLEN`` replies: positions whose value is *not* a whole block of ours
        (absent, another size or another type: to be written) and, among them, those of
        another Redis type (a list or hash planted under our key). Unanswered ones are
        neither (unknown: left alone). O(n)."""
        missing, wrong_type = [], []
        for i, n in enumerate(lengths):
            if n is None:
                continue
            if isinstance(n, BaseException):
                if "WRONGTYPE" in str(n):
                    wrong_type.append(i)
                    missing.append(i)
                continue
            if n != self.value_bytes:
                missing.append(i)
        return missing, wrong_type

    # -- writes ------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], blocks: torch.Tensor | RowsOf) -> int:
        """Write the blocks not in Redis (``blocks[i]`` is ``keys[i]``'s KV block): those
        the view does not know, and those it knows that a check finds gone (flushed,
        restarted, evicted, expired). ``blocks`` may instead be a function of the positions
        needed returning their rows (or None: not available any more), for callers whose
        bytes are only read when a block must really be sent (a store's deduplicated
        blocks). Returns how many were written (through) or queued (back). Never raises: a
        remote failure is counted and logged and costs the caller nothing but the deadline
        (the local copy of a put never depends on it)."""
        try:
            if self.write == "through":
                return self._put_through(keys, blocks)
            return self._put_behind(keys, blocks)
        except Exception:  # noqa: BLE001 - the remote tier is a cache: it must never fail a put
            with self._lock:
                self.counters["put_errors"] += 1
                self.counters["write_failed_blocks"] += len(keys)
            log.exception("remote put of %d block(s) failed; they are kept locally only", len(keys))
            return 0

    def _put_through(self, keys: Sequence[bytes], blocks: torch.Tensor) -> int:
        deadline_at = self._deadline_at()
        with self._lock:
            known = [i for i, k in enumerate(keys) if k in self._view]
        todo = sorted(set(range(len(keys))) - set(known))
        if known:  # one cheap check round trip per shard (and the TTL refreshed): heals the view
            lengths = self.backend.strlen_many([self.rkey(keys[i]) for i in known], self.ttl_s,
                                               deadline_at=deadline_at)
            missing, wrong = self._classify([keys[i] for i in known], lengths)
            gone = [keys[known[j]] for j in missing]
            self._forget(gone)
            with self._lock:
                self.counters["checked_blocks"] += len(known)
                self.counters["refilled_blocks"] += len(gone)
                self.counters["wrong_type_blocks"] += len(wrong)
            todo = sorted(todo + [known[j] for j in missing])
        if not todo:
            return 0
        rows = _rows(blocks, todo, len(keys))
        if rows is None:
            return 0
        new_keys = [keys[i] for i in todo]
        values = self._encode(new_keys, rows, reuse=True)
        return self._send(new_keys, values, deadline_at)

    def _put_behind(self, keys: Sequence[bytes], blocks: torch.Tensor) -> int:
        """Queue the blocks the view does not know (encoded: the queue's bytes bound them,
        counting what concurrent puts are still encoding) and a check for those it knows."""
        with self._cv:
            waiting = [i for i, k in enumerate(keys) if k not in self._queued_keys]
            fresh = [i for i in waiting if keys[i] not in self._view]
            for i in waiting:
                if keys[i] in self._view:
                    self._queue.append((keys[i], None, 0))
                    self._queued_keys.add(keys[i])
            room = self.queue_bytes_limit - self._queue_bytes - self._reserved_bytes
            fits = max(0, room // self.value_bytes)
            self.counters["queue_dropped_blocks"] += max(0, len(fresh) - fits)
            fresh = fresh[:fits]
            self._reserved_bytes += len(fresh) * self.value_bytes
            self._cv.notify()
        if not fresh:
            return 0
        new_keys = [keys[i] for i in fresh]
        try:
            rows = _rows(blocks, fresh, len(keys))
            values = [] if rows is None else self._encode(new_keys, rows)
        except BaseException:
            with self._cv:
                self._reserved_bytes -= len(fresh) * self.value_bytes
            raise
        with self._cv:
            self._reserved_bytes -= len(fresh) * self.value_bytes
            for k, v in zip(new_keys, values):
                self._queue.append((k, v, 0))
                self._queued_keys.add(k)
                self._queue_bytes += len(v)
            self._cv.notify()
        return len(values)

    def _send(self, keys: Sequence[bytes], values: Sequence[memoryview], deadline_at: float | None = None) -> int:
        ok = self.backend.set_many([self.rkey(k) for k in keys], values, self.ttl_s, deadline_at=deadline_at)
        if self.backend.left_running():  # a late send may still read the scratch buffer: let it have it
            self._scratch.buf = None
        done = [k for k, good in zip(keys, ok) if good]
        self._remember(done)
        with self._lock:
            self.counters["written_blocks"] += len(done)
            self.counters["write_failed_blocks"] += len(keys) - len(done)
        return len(done)

    def _drain(self) -> None:
        """The write-behind thread: sends batches (checks first). A batch its shard did not
        answer (down, hung, too slow) goes back to the head of the queue and is retried
        after the shard's backoff, halved (a slow link still gets whole blocks through
        within the deadline): queued blocks wait out an outage, bounded by the queue's
        bytes, until Redis answers or :meth:`close`'s grace period ends. A write the server
        refuses (``NOPERM``) is dropped and counted. Exits once stopped and empty."""
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue and self._stop:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                self._inflight = len(batch)
            retry: list[tuple[bytes, memoryview | None, int]] = []
            lost = 0
            try:
                retry, lost = self._send_batch(batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any one failure
                log.exception("remote write-behind batch failed")
            retry_keys = {e[0] for e in retry}
            with self._cv:
                self._batch = max(1, self._batch // 2) if retry else min(WRITE_BATCH, self._batch * 2)
                for k, v, _ in batch:
                    if k not in retry_keys:
                        self._queued_keys.discard(k)
                        self._queue_bytes -= 0 if v is None else len(v)
                if self._stop:  # closing and the grace period is over: what failed now is dropped
                    self.counters["close_dropped_blocks"] += sum(1 for e in retry if e[1] is not None)
                    for k, v, _ in retry:
                        self._queued_keys.discard(k)
                        self._queue_bytes -= 0 if v is None else len(v)
                    retry = []
                self._queue.extendleft(reversed([(k, v, n + 1) for k, v, n in retry]))
                self.counters["behind_failed_blocks"] += lost
                self._inflight = 0
                self._cv.notify_all()
                if retry and not self._stop:  # wait out the shard's backoff (a close wakes us)
                    self._cv.wait(min(1.0, max(0.01, self.backend.retry_in_s())))
            if lost:
                log.error("remote write-behind: %d acknowledged block(s) refused by the server (NOPERM): "
                          "dropped unsent", lost)

    def _send_batch(self, batch: Sequence[tuple[bytes, memoryview | None, int]]) -> tuple[list, int]:
        """One write-behind batch: checks of known blocks (missing ones leave the view, so
        the next put resends them), then the writes. Returns the entries to retry (their
        shard did not answer) and how many writes the server refused."""
        checks = [e for e in batch if e[1] is None]
        writes = [e for e in batch if e[1] is not None]
        retry: list = []
        refused = 0
        if checks:
            lengths = self.backend.strlen_many([self.rkey(e[0]) for e in checks], self.ttl_s)
            missing, wrong = self._classify([e[0] for e in checks], lengths)
            self._forget([checks[j][0] for j in missing])
            with self._lock:
                self.counters["checked_blocks"] += len(checks)
                self.counters["wrong_type_blocks"] += len(wrong)
        if writes:
            keys = [e[0] for e in writes]
            ok = self.backend.set_many([self.rkey(k) for k in keys], [e[1] for e in writes], self.ttl_s)
            denied = set(self.backend.denied())
            done = [k for k, good in zip(keys, ok) if good]
            self._remember(done)
            refused = len(denied)
            retry = [e for j, (e, good) in enumerate(zip(writes, ok)) if not good and j not in denied]
            with self._lock:
                self.counters["written_blocks"] += len(done)
                self.counters["write_failed_blocks"] += len(writes) - len(done)
        return retry, refused

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the write-behind queue is empty (True) or ``timeout_s`` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self._queue or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # -- reads ----------------------------------------------------------------------------------
    def count_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` hold a whole block remotely (one batched ``STRLEN``:
        existence, size and type in one cheap check). A value of another Redis type is
        deleted and counted (nothing of ours can use it; a put replaces it)."""
        if not keys:
            return 0
        rkeys = [self.rkey(k) for k in keys]
        deadline_at = self._deadline_at()
        lengths = self.backend.strlen_many(rkeys, deadline_at=deadline_at)
        missing, wrong = self._classify(keys, lengths)
        miss = set(missing)
        present = [None if n is None else i not in miss for i, n in enumerate(lengths)]
        n = 0
        while n < len(keys) and present[n]:
            n += 1
        self._remember([k for k, p in zip(keys, present) if p])
        self._forget([k for k, p in zip(keys, present) if p is False])  # gone; an unanswered shard is not
        if wrong:
            self._delete_wrong_type([rkeys[i] for i in wrong], deadline_at)
        with self._lock:
            self.counters["lookups"] += 1
        return n

    def _delete_wrong_type(self, rkeys: Sequence[bytes], deadline_at: float | None) -> None:
        self.backend.delete_many(rkeys, deadline_at=deadline_at)
        with self._lock:
            self.counters["wrong_type_blocks"] += len(rkeys)
        log.warning("remote: %d key(s) under our prefix held another Redis type; deleted", len(rkeys))

    def fetch(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The leading blocks of ``keys`` that are remote and intact: ``(rows, m)`` with
        ``rows`` ``[m, *block_shape]``. A missing, damaged or mismatched value ends the run
        (a miss, never bytes). One GET round trip per shard, then one copy per block,
        straight into ``out`` (``[len(keys), *block_shape]`` on the CPU, any strides with
        the last dimension contiguous, e.g. a permuted view of a KV tensor) when given;
        ``rows`` is then ``out[:m]``."""
        if out is not None and (tuple(out.shape) != (len(keys), *self.block_shape) or out.dtype != self.dtype
                                or out.device.type != "cpu" or out.stride(-1) != 1):
            raise ValueError(f"out must be a CPU {(len(keys), *self.block_shape)} {self.dtype} tensor "
                             f"with a contiguous last dimension, got {tuple(out.shape)} {out.dtype}")
        if not keys:
            return torch.empty((0, *self.block_shape), dtype=self.dtype), 0
        deadline_at = self._deadline_at()
        t0 = time.perf_counter()
        values = self.backend.get_many([self.rkey(k) for k in keys], deadline_at=deadline_at)
        elapsed = time.perf_counter() - t0
        unanswered = set(self.backend.unanswered())
        payloads: list[memoryview] = []
        damaged: list[bytes] = []
        wrong: list[bytes] = []
        gone: list[bytes] = []
        for i, (k, v) in enumerate(zip(keys, values)):
            if isinstance(v, BaseException):
                if "WRONGTYPE" in str(v):
                    wrong.append(k)
                break
            p = unpack_block(v, k, FORM_KV, self.fingerprint, self.payload_bytes)
            if p is None:
                if v is not None:
                    damaged.append(k)
                elif i not in unanswered:  # the server said it is absent (evicted, expired)
                    gone.append(k)
                if v is not None:
                    log.warning("remote value for block %s is damaged or has another layout: a miss", k.hex()[:12])
                break
            payloads.append(p)
        m = len(payloads)
        # blocks after a gap are useless to a prefix, but still valid remotely: leave them be
        self._forget(gone + damaged + wrong)
        if damaged:
            self.backend.delete_many([self.rkey(k) for k in damaged], deadline_at=deadline_at)
        if wrong:
            self._delete_wrong_type([self.rkey(k) for k in wrong], deadline_at)
        with self._lock:
            self.counters["fetches"] += 1
            self.counters["hit_blocks"] += m
            self.counters["miss_blocks"] += len(keys) - m
            self.counters["damaged_blocks"] += len(damaged)
            if m and elapsed > self._rtt_s:
                bw = m * self.payload_bytes / (elapsed - self._rtt_s)
                self.link = (self._rtt_s, bw if self.link is None else 0.8 * self.link[1] + 0.2 * bw)
        if not m:
            return torch.empty((0, *self.block_shape), dtype=self.dtype), 0
        rows = out[:m] if out is not None else torch.empty((m, *self.block_shape), dtype=self.dtype)
        if self.codec is not None:  # checked payloads -> one buffer -> decoded straight into the rows
            enc = np.empty((m, self.payload_bytes), dtype=np.uint8)
            for i, p in enumerate(payloads):
                enc[i] = np.frombuffer(p, dtype=np.uint8)
            self.codec.decode(torch.from_numpy(enc), rows)
            return rows, m
        dst = rows.view(torch.uint8).numpy()  # numpy's copy: single-threaded, no intra-op stalls
        row_shape = dst.shape[1:]
        for i, p in enumerate(payloads):
            dst[i] = np.frombuffer(p, dtype=np.uint8).reshape(row_shape)
        return rows, m

    # -- state ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        b = self.backend
        with self._lock:
            c = self.counters
            out: dict[str, Any] = {
                "url": b.address.describe(), "write": self.write, "ttl_s": self.ttl_s,
                "deadline_s": b.deadline_s, "drain_s": self.drain_s, "known_blocks": len(self._view),
                "queued_blocks": sum(1 for e in self._queue if e[1] is not None) + self._inflight,
                "queued_bytes": self._queue_bytes,
                "queue_limit_bytes": self.queue_bytes_limit, **c,
                # acknowledged by put (queued) and never sent: full queue, retries spent, close
                "dropped_unsent_blocks": (c["queue_dropped_blocks"] + c["behind_failed_blocks"]
                                          + c["close_dropped_blocks"]),
            }
        bc = b.counters
        out.update(degraded=b.degraded, shards=b.shard_states(), round_trips=bc.round_trips, errors=bc.errors,
                   timeouts=bc.timeouts, full_errors=bc.full, redirects=bc.redirects, skipped_keys=bc.skipped_keys,
                   degraded_episodes=bc.degraded_episodes, bytes_sent=bc.bytes_sent,
                   bytes_received=bc.bytes_received, pool_timeouts=bc.pool_timeouts, denied=bc.denied)
        return out

    def close(self, flush_timeout_s: float | None = None) -> None:
        """Drain the write-behind queue for up to ``flush_timeout_s`` (default: the
        configured ``drain_s`` grace period), stop the writer and disconnect. Blocks still
        queued after that are dropped, counted (``close_dropped_blocks``) and logged."""
        if self._writer is not None:
            grace = self.drain_s if flush_timeout_s is None else flush_timeout_s
            drained = self.flush(grace)
            with self._cv:
                before = self.counters["close_dropped_blocks"]
                self._stop = True
                self.counters["close_dropped_blocks"] += sum(1 for e in self._queue if e[1] is not None)
                for k, v, _ in self._queue:  # (a batch in flight keeps its keys and bytes until it ends)
                    self._queued_keys.discard(k)
                    self._queue_bytes -= 0 if v is None else len(v)
                self._queue.clear()
                self._cv.notify_all()
            # a batch in flight ends by its deadline; if it fails, the writer counts it as dropped
            self._writer.join(self.backend.deadline_s * 2 + 1)
            with self._cv:
                dropped = self.counters["close_dropped_blocks"] - before
            if dropped or not drained:
                log.error("remote write-behind: %d queued block(s) dropped unsent at close (grace %.1f s)",
                          dropped, grace)
            elif grace:
                log.info("remote write-behind: queue drained at close")
        self.backend.close()
