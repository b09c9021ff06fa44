"""The ``remote`` tier: a Redis / Valkey server or Redis Cluster shared by a fleet of stores.

It sits below the local tiers (device, host, disk) and is *inclusive*: every block a
store puts is also written remotely, write-through (during ``put``) or write-behind (a
bounded queue drained by one thread); Redis owns the remote capacity (its ``maxmemory``
policy evicts), so nothing here counts slots. Its key is the block's chained,
namespace-salted key (:mod:`kvstore.hashing`), so equal prefixes from any machine meet and
tenants never do; its value is one self-checking record per block
(:func:`allocator.remote.pack_block`: payload, form, layout fingerprint, checksum).

The *local view* is the set of keys this store knows to be remote (it wrote or saw them);
it spares re-sending blocks on repeated puts. A lookup or read that finds a block gone
(Redis evicted it, its TTL ran out, or it was damaged) drops it from the view.

Faults never reach the engine as exceptions: a shard that is down, slow or full makes its
blocks misses for a backoff period (:class:`allocator.remote.RemoteBackend`), and no call
waits longer than ``remote_deadline_s``. Only a wrong password, found at start, is an error.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
import hashlib
import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from allocator.remote import (FORM_KV, HEADER_BYTES, RemoteAuthError, RemoteBackend, RemoteURLError,
                              block_buffer, parse_remote_url, seal_blocks, unpack_block)
from kvstore.errors import ConfigError

log = logging.getLogger(__name__)

KEY_PREFIX = b"kvs1:"
#: at most this many keys are remembered as "known remote" (oldest forgotten first)
VIEW_LIMIT = 1 << 20
#: a write-behind batch sends at most this many blocks in one round trip per shard
WRITE_BATCH = 256
#: write-through keeps one send buffer per thread up to this size (larger puts allocate)
SCRATCH_LIMIT = 256 << 20


def layout_fingerprint(layout_desc: str, block_tokens: int, form: int = FORM_KV) -> bytes:
    """16 bytes naming what a value's payload is laid out as (layout, block size, form)."""
    h = hashlib.blake2b(digest_size=16, person=b"kvstore-remote1")
    h.update(f"{layout_desc}\x00{block_tokens}\x00{form}".encode())
    return h.digest()


def check_remote_config(url: str | None, write: str, ttl_s: float | None, deadline_s: float,
                        queue_bytes: int) -> None:
    """Validate the remote settings when the configuration is built (not at first use)."""
    if write not in ("through", "back"):
        raise ConfigError(f"remote_write must be 'through' or 'back', got {write!r}")
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s <= 0):
        raise ConfigError(f"remote_ttl_s must be a positive number of seconds or None, got {ttl_s!r}")
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not deadline_s > 0:
        raise ConfigError(f"remote_deadline_s must be a positive number of seconds, got {deadline_s!r}")
    if isinstance(queue_bytes, bool) or not isinstance(queue_bytes, int) or queue_bytes <= 0:
        raise ConfigError(f"remote_queue_bytes must be a positive int, got {queue_bytes!r}")
    if url is not None:
        try:
            parse_remote_url(url)
        except RemoteURLError as exc:
            raise ConfigError(str(exc)) from None


class RemoteTier:
    """One store's view of the shared remote tier (thread-safe).

    ``put`` costs one pipelined round trip per shard for the blocks not known remote
    (write-through) or a copy into the queue (write-behind); ``count_prefix`` one EXISTS
    round trip per shard; ``fetch`` one GET round trip per shard plus a checksum and a copy
    per block. All bounded by the deadline.
    """

    def __init__(self, url: str, *, layout_desc: str, block_tokens: int, block_shape: tuple[int, ...],
                 dtype: torch.dtype, write: str = "through", ttl_s: float | None = None,
                 deadline_s: float = 0.5, queue_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = RemoteBackend(parse_remote_url(url), deadline_s=deadline_s, clock=clock)
        self.write = write
        self.ttl_s = ttl_s
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.block_bytes = int(np.prod(block_shape)) * torch.empty((), dtype=dtype).element_size()
        self.fingerprint = layout_fingerprint(layout_desc, block_tokens, FORM_KV)
        self._lock = threading.Lock()
        self._view: OrderedDict[bytes, None] = OrderedDict()
        self._scratch = threading.local()
        self.counters = dict(written_blocks=0, write_failed_blocks=0, hit_blocks=0, miss_blocks=0,
                             damaged_blocks=0, vanished_blocks=0, lookups=0, fetches=0,
                             queue_dropped_blocks=0)
        # link estimate from observed fetches: (latency_s, bandwidth_Bps); None until measured
        self.link: tuple[float, float] | None = None
        # write-behind
        self.queue_bytes_limit = queue_bytes
        self._queue: deque[tuple[bytes, bytes, memoryview]] = deque()  # (block key, redis key, value)
        self._queued_keys: set[bytes] = set()
        self._queue_bytes = 0
        self._inflight = 0
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
        return KEY_PREFIX + key

    def _send_buffer(self, n: int, reuse: bool):
        """An ``n``-value send buffer. Write-through reuses one per thread (its values are
        sent before the call returns; fresh memory would cost a page fault per 4 KiB on
        every put), up to :data:`SCRATCH_LIMIT` bytes; write-behind values outlive the call."""
        size = n * (HEADER_BYTES + self.block_bytes)
        if not reuse or size > SCRATCH_LIMIT:
            return block_buffer(n, self.block_bytes)
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.shape[0] < n:
            buf = self._scratch.buf = block_buffer(n, self.block_bytes)
        return buf[:n]

    def _encode(self, keys: Sequence[bytes], blocks: torch.Tensor, reuse: bool = False) -> list[memoryview]:
        """Values of ``blocks`` (``[n, *block_shape]``, any strides and device): one batched
        copy into a send buffer, then a header and checksum per block."""
        n = len(keys)
        src = blocks.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        if src.stride(-1) != 1:
            src = src.contiguous()
        buf = self._send_buffer(n, reuse)
        dst = buf[:, HEADER_BYTES:]
        dst.shape = (n, *self.block_shape[:-1], self.block_shape[-1] * src.element_size())  # a view, never a copy
        # numpy's copy is single-threaded: torch's intra-op threads stall badly on a busy host
        np.copyto(dst, src.view(torch.uint8).numpy())
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

    # -- writes ------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], blocks: torch.Tensor) -> int:
        """Write the blocks not known remote (``blocks[i]`` is ``keys[i]``'s KV block).
        Returns how many were written (through) or queued (back)."""
        with self._lock:
            todo = [i for i, k in enumerate(keys) if k not in self._view and k not in self._queued_keys]
            if self.write == "back":  # encode only what the queue can take (its bound holds memory)
                fits = max(0, (self.queue_bytes_limit - self._queue_bytes) // (HEADER_BYTES + self.block_bytes))
                self.counters["queue_dropped_blocks"] += max(0, len(todo) - fits)
                todo = todo[:fits]
        if not todo:
            return 0
        new_keys = [keys[i] for i in todo]
        through = self.write == "through"
        values = self._encode(new_keys, blocks if len(todo) == len(keys) else blocks[todo], reuse=through)
        if not through:
            return self._enqueue(new_keys, values)
        return self._send(new_keys, values)

    def _send(self, keys: Sequence[bytes], values: Sequence[memoryview]) -> int:
        ok = self.backend.set_many([self.redis_key(k) for k in keys], values, self.ttl_s)
        if self.backend.left_running():  # a late send may still read the scratch buffer: let it have it
            self._scratch.buf = None
        done = [k for k, good in zip(keys, ok) if good]
        self._remember(done)
        with self._lock:
            self.counters["written_blocks"] += len(done)
            self.counters["write_failed_blocks"] += len(keys) - len(done)
        return len(done)

    def _enqueue(self, keys: Sequence[bytes], values: Sequence[memoryview]) -> int:
        """Queue writes while the queue stays within its byte bound; the rest are dropped
        (counted): a cache may lose writes, an engine must not wait for them."""
        queued = 0
        with self._cv:
            for k, v in zip(keys, values):
                if self._queue_bytes + len(v) > self.queue_bytes_limit:
                    self.counters["queue_dropped_blocks"] += len(keys) - queued
                    break
                self._queue.append((k, self.redis_key(k), v))
                self._queued_keys.add(k)
                self._queue_bytes += len(v)
                queued += 1
            self._cv.notify()
        return queued

    def _drain(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue and self._stop:
                    return
                batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
                self._inflight = len(batch)
            try:
                self._send([b[0] for b in batch], [b[2] for b in batch])
            except Exception:  # noqa: BLE001 - the writer must outlive any one failure
                log.exception("remote write-behind batch failed")
            with self._cv:
                for k, _, v in batch:
                    self._queued_keys.discard(k)
                    self._queue_bytes -= len(v)
                self._inflight = 0
                self._cv.notify_all()

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
        """How many leading ``keys`` exist remotely (one batched existence check)."""
        if not keys:
            return 0
        present = self.backend.exists_many([self.redis_key(k) for k in keys])
        n = 0
        while n < len(keys) and present[n]:
            n += 1
        self._remember([k for k, p in zip(keys, present) if p])
        self._forget([k for k, p in zip(keys, present) if p is False])  # gone; an unanswered shard is not
        with self._lock:
            self.counters["lookups"] += 1
        return n

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
        t0 = time.perf_counter()
        values = self.backend.get_many([self.redis_key(k) for k in keys])
        elapsed = time.perf_counter() - t0
        unanswered = set(self.backend.unanswered())
        payloads: list[memoryview] = []
        damaged: list[bytes] = []
        gone: list[bytes] = []
        for i, (k, v) in enumerate(zip(keys, values)):
            p = unpack_block(v, k, FORM_KV, self.fingerprint, self.block_bytes)
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
        self._forget(gone + damaged)
        if damaged:
            self.backend.delete_many([self.redis_key(k) for k in damaged])  # let a fresh put replace it
        with self._lock:
            self.counters["fetches"] += 1
            self.counters["hit_blocks"] += m
            self.counters["miss_blocks"] += len(keys) - m
            self.counters["damaged_blocks"] += len(damaged)
            if m and elapsed > self._rtt_s:
                bw = m * self.block_bytes / (elapsed - self._rtt_s)
                self.link = (self._rtt_s, bw if self.link is None else 0.8 * self.link[1] + 0.2 * bw)
        if not m:
            return torch.empty((0, *self.block_shape), dtype=self.dtype), 0
        rows = out[:m] if out is not None else torch.empty((m, *self.block_shape), dtype=self.dtype)
        dst = rows.view(torch.uint8).numpy()  # numpy's copy: single-threaded, no intra-op stalls
        row_shape = dst.shape[1:]
        for i, p in enumerate(payloads):
            dst[i] = np.frombuffer(p, dtype=np.uint8).reshape(row_shape)
        return rows, m

    # -- state ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        b = self.backend
        with self._lock:
            out: dict[str, Any] = {
                "url": b.address.describe(), "write": self.write, "ttl_s": self.ttl_s,
                "deadline_s": b.deadline_s, "known_blocks": len(self._view),
                "queued_blocks": len(self._queue) + self._inflight, "queued_bytes": self._queue_bytes,
                "queue_limit_bytes": self.queue_bytes_limit, **self.counters,
            }
        c = b.counters
        out.update(degraded=b.degraded, shards=b.shard_states(), round_trips=c.round_trips, errors=c.errors,
                   timeouts=c.timeouts, full_errors=c.full, redirects=c.redirects, skipped_keys=c.skipped_keys,
                   degraded_episodes=c.degraded_episodes, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received)
        return out

    def close(self, flush_timeout_s: float | None = None) -> None:
        """Drain the write-behind queue (up to ``flush_timeout_s``, default the deadline x 4),
        stop the writer and disconnect. Writes still queued after that are dropped."""
        if self._writer is not None:
            self.flush(self.backend.deadline_s * 4 if flush_timeout_s is None else flush_timeout_s)
            with self._cv:
                self._stop = True
                dropped = len(self._queue)
                self._queue.clear()
                self._cv.notify_all()
            self._writer.join(self.backend.deadline_s * 2)
            if dropped:
                log.warning("remote write-behind: %d queued block(s) dropped at close", dropped)
        self.backend.close()
