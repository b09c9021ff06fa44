"""``SidecarClient``: the client interface over the sidecar (ZeroMQ DEALER, msgpack).

Data plane: when the sidecar is on this host (its host id matches ours and its shared
arenas can be mapped), ``get``/``load_into`` copy KV straight out of the shared host tier
into the result or the engine's pool rows (one copy) and ``put``/``save_from`` copy it
straight in from the caller's KV or pool rows (one copy): the sidecar only moves slot
numbers (see :mod:`kvstore.sidecar.shm_plane`). Every such copy is split over the cores in
512 KiB pieces, each hashed (xxh3) right after its copy while it is in the cache
(:func:`allocator.checksum.copy_digests`): a put records the hash of its own source, a read
verifies its own copy. A put writes into slots this client holds staged ahead of time and
sends one ``put_shm`` (one round trip; the reply tops the staged slots up); the copy runs
outside the client's lock (``put_async``/``save_from_async`` on the save thread never hold
up the caller's loads). A pool whose rows are strided (vLLM-CPU's head-major-packed
pool) cannot be verified in place: its blocks go through a small per-thread bounce a
cache-sized chunk at a time (:mod:`clients.chunked`), still about one pass over memory.
A read checks its copy against the checksums in the reply (a block
that fails is reported to the sidecar, which drops it, and is never returned as other
bytes: ``get`` raises ``BlockNotFoundError``, ``load_into`` names its pool block) and sends
its ``release`` without waiting for the answer. A CUDA pool registered with
:meth:`SidecarClient.register_pool` is reached by the sidecar itself through CUDA IPC. Every reply that names slots names the
arenas' identity; a mismatch with our mapping (the sidecar restarted) makes us map again
and redo the call, never write into an arena nobody reads. Otherwise, or when the shared
tier cannot serve a request (blocks on disk, no room), KV travels as raw ZeroMQ frames,
sent without a copy.

Failure handling: every call has a deadline, the whole time it may take, retries included:
``timeout`` (default :data:`DEFAULT_TIMEOUT_S`, 5 s) for each call, ``connect_timeout``
(default :data:`DEFAULT_CONNECT_TIMEOUT_S`, 3 s) for the first ``hello``, and ``timeout=``
on any single call to override it. Past it the call raises ``SidecarUnavailableError``
(from :mod:`kvstore.errors`). On timeout the socket is closed with ``LINGER=0`` (its queued
messages are dropped) and a fresh one connects; idempotent ops
(``kvstore.sidecar.protocol.IDEMPOTENT``) are retried within the same deadline (each attempt
gets an equal share), others raise. A sidecar that restarted has forgotten our namespace:
the client says ``hello`` again and retries once. A request larger than the sidecar's
``max_message_bytes`` is refused here (``MessageTooLargeError``) without being sent.

Security: ``curve=CurveConfig(secret=".../client.key_secret", server=".../server.key")`` (or a
dict with those keys, or the env vars ``KVSTORE_CURVE_SECRET`` / ``KVSTORE_CURVE_SERVER``)
makes the connection CurveZMQ-encrypted and authenticated; a sidecar that does not know our
key drops the handshake, which surfaces as ``SidecarUnavailableError`` naming CURVE.

Shared-memory claims carry our ``(host, pid, start time)``: the sidecar then never reclaims
a reservation while this process lives, however long a copy stalls (see kvstore.sidecar.procinfo).

Not safe to share between threads without care: calls are serialised by a lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
import functools
import itertools
import os
import socket
import threading
import time
import weakref
from typing import Any

import numpy as np
import torch
import zmq

from allocator.checksum import as_u8, copy_digests, from_wire, row_pieces, to_wire, usable_cpus
from clients.chunked import CHUNK_BYTES, StridedPool, chunk_blocks, chunks_of, run_chunks
from allocator.memory import default_device
from allocator.rowcopy import DEFAULT_COPIER, Copier
from allocator.shm import fresh_memory, map_shared
from kvstore import paged
from clients.base import BlockLoadError, LoadResult
from kvstore.errors import BlockNotFoundError, ConfigError, InvalidInputError, StoreClosedError
from kvstore.hashing import tokens_to_array
from kvstore.layout import ModelLayout, as_block_rows, from_block_rows
from kvstore.saves import AsyncSaver, PutHandle
from kvstore.validate import check_start, check_whole_blocks
from kvstore.sidecar.procinfo import self_identity
from kvstore.errors import SidecarUnavailableError
from kvstore.sidecar.protocol import (IDEMPOTENT, MAGIC, VERSION, MessageTooLargeError, ProtocolError,
                              UnknownLeaseError, UnknownNamespaceError, VersionMismatchError, check_act, check_kv,
                              error_from_reply, request_frames, tensor_desc, tensor_frame, tensor_from_frame,
                              unpack)
from kvstore.sidecar.protocol import SidecarError, StaleArenaError
from kvstore.sidecar.security import CurveKeys, apply_client_curve, load_keys
from kvstore.sidecar.procinfo import host_id

#: results at least this large go into a populated mapping of their own (glibc's malloc maps
#: fresh, unpopulated pages for them anyway: its mmap threshold tops out at 32 MiB); smaller
#: ones come from malloc, which may reuse memory already faulted in
_FRESH_MAPPING_BYTES = 32 << 20

#: seconds a call may take by default, retries included
DEFAULT_TIMEOUT_S = 5.0
#: seconds the first ``hello`` may take by default (nothing listening fails this fast)
DEFAULT_CONNECT_TIMEOUT_S = 3.0

ENV_SECRET = "KVSTORE_CURVE_SECRET"
ENV_SERVER = "KVSTORE_CURVE_SERVER"


@dataclass(frozen=True)
class CurveConfig:
    """The client's key pair (``secret``: a ``.key_secret`` file from ``kvstore keygen``) and
    the sidecar's public key (``server``: its ``.key`` file)."""

    secret: str
    server: str

    @classmethod
    def resolve(cls, curve: "CurveConfig | dict | None") -> "CurveConfig | None":
        """``curve`` as given, else from the environment; None when neither says anything."""
        if curve is None:
            secret, server = os.environ.get(ENV_SECRET), os.environ.get(ENV_SERVER)
            if not secret and not server:
                return None
            curve = {"secret": secret, "server": server}
        if isinstance(curve, dict):
            if not curve.get("secret") or not curve.get("server"):
                raise ConfigError("CurveZMQ needs both secret (client .key_secret) and server (sidecar .key)")
            curve = cls(str(curve["secret"]), str(curve["server"]))
        if not isinstance(curve, cls):
            raise ConfigError(f"curve must be a CurveConfig or a dict, got {type(curve).__name__}")
        return curve

    def load(self) -> tuple[CurveKeys, bytes]:
        return load_keys(self.secret), load_keys(self.server).public


def _with_deadline(method: Callable) -> Callable:
    """Give a public method a keyword-only ``timeout`` (seconds, retries included): every
    request the call makes (e.g. reserve, then commit) shares that one deadline."""

    @functools.wraps(method)
    def call(self: "SidecarClient", *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        outer = getattr(self._tls, "end", None)
        if outer is None:  # nested calls keep the outermost deadline
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                        or timeout <= 0):
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            self._tls.total = self.timeout if timeout is None else timeout
            self._tls.end = time.monotonic() + self._tls.total
        try:
            return method(self, *args, **kwargs)
        finally:
            if outer is None:
                self._tls.end = None

    return call


class _PerLayer:
    """A per-layer pool's ``2 * layers`` row views as uint8 numpy arrays (entry ``2 * l + kv``
    is layer ``l``'s K or V rows): block ``b`` is row ``b`` of each."""

    def __init__(self, views: list[np.ndarray]) -> None:
        self.views = views


def _pool_key(pool: Any) -> tuple:
    """A pool's identity: its tensors' addresses, shapes and strides."""
    tensors = [pool] if isinstance(pool, torch.Tensor) else list(pool)
    return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride())) for t in tensors)


def _pool_u8(rows: paged.Rows) -> "np.ndarray | _PerLayer | None":
    """A CPU pool's rows as uint8 numpy views (no copy), or None when a view is impossible.

    The fused copy treats store block ``b`` as row ``b`` of each view, one contiguous run of
    bytes: that holds for a cross-layer pool and per-layer block-major ``[n, bt, H, D]``
    rows, not where an engine block holds several store blocks (``split > 1``) nor for
    head-major layouts (a store block's rows are strided there). Those go through a small
    per-thread bounce a chunk of blocks at a time on the CPU (:mod:`clients.chunked`), and
    through the reusable pinned bounce rows (``paged.take`` / ``paged.place``) on a GPU."""
    if isinstance(rows, paged.LayerRows):
        if rows.split != 1 or any(r.dim() != 4 or (r.shape[0] and not r[0].is_contiguous()) for r in rows):
            return None
        views = [as_u8(r) for r in rows]
        return None if any(v is None for v in views) else _PerLayer(views)  # type: ignore[arg-type]
    return as_u8(rows)


class SidecarClient:
    """A client of ``kvstore serve`` at ``url`` for one namespace (see module doc).

    ``timeout`` bounds each call (retries included; every method also takes ``timeout=``),
    ``connect_timeout`` the first ``hello``; ``retries`` is how many times an idempotent
    request is resent within that deadline after a lost reply; ``shm`` None means
    use shared memory when the sidecar offers it on this host, False never; ``device`` is
    where ``get`` returns tensors by default (CUDA when present, like the store).
    """

    def __init__(self, url: str, layout: ModelLayout, *, namespace: str = "default", block_tokens: int = 16,
                 timeout: float = DEFAULT_TIMEOUT_S, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 retries: int = 1,
                 shm: bool | None = None, device: torch.device | str | None = None,
                 curve: CurveConfig | dict | None = None) -> None:
        self.url = url
        self.layout = layout
        self.namespace = namespace
        self.block_tokens = block_tokens
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = max(0, int(retries))
        self.device = torch.device(device) if device is not None else default_device()
        self._want_shm = shm
        conf = CurveConfig.resolve(curve)
        self._curve = conf.load() if conf is not None else None
        self._owner = self_identity(host_id())
        self._owner_checked = False
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._tls = threading.local()  # .end: the deadline of the public call in progress
        self._closed = False
        self._oneway_sent = False  # a request went out whose reply we do not wait for
        self._rows: list[torch.Tensor] = []  # mapped shared segments as [slots, L, 2, bt, H, D]
        self._rows_u8: list[np.ndarray] = []  # the same as uint8 numpy views (what the copies use)
        self._writing: set[int] = set()  # staged slots a put in progress is writing (not free)
        # reusable host rows, only where a bounce is unavoidable: one per thread that needs one
        # (the save thread and the caller's may copy at once), freed with the thread (keyed
        # weakly by its Thread object: an engine that calls from short-lived threads does not
        # pile up buffers)
        self._bounces: weakref.WeakKeyDictionary[threading.Thread, torch.Tensor] = weakref.WeakKeyDictionary()
        # a CPU pool whose rows are strided: a few blocks at a time through a cache-sized
        # bounce per thread (the caller's and the copy pool's), see clients.chunked
        self._chunk_bounces: weakref.WeakKeyDictionary[threading.Thread, np.ndarray] = weakref.WeakKeyDictionary()
        self._chunk_bytes = CHUNK_BYTES
        self._saver = AsyncSaver()  # put_async / save_from_async, in submission order
        self._gpu_pools: dict[tuple, int] = {}  # registered CUDA pools (their tensors' identity) -> sidecar id
        self._idents: list[int] = []  # identity of each mapped segment (the server's generation)
        self._staged: list[int] = []  # free slots of segment ``_stage_seg`` held for our puts
        self._stage_seg = 0
        self._stage_claim: int | None = None
        self._staged_at = 0.0  # when the sidecar last confirmed our staged slots
        # every copy in or out of shared memory is split over the cores, each piece hashed
        # right after its copy (numpy's copy and xxh3 release the GIL); the calling thread
        # takes one share, the pool the others
        self._hash_parts = min(4, usable_cpus())
        self._hasher = ThreadPoolExecutor(max_workers=max(1, self._hash_parts - 1),
                                          thread_name_prefix="kvstore-client-copy")
        self.server_info: dict = {}
        self.lease_timeout_s = 30.0
        try:
            self._open_socket()
            self._hello(connect_timeout)
        except BaseException:
            self._teardown()
            raise

    # -- transport ---------------------------------------------------------------------
    def _open_socket(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        if self._curve is not None:
            apply_client_curve(sock, *self._curve)
        sock.connect(self.url)
        self._sock = sock
        self._timeouts: dict[int, int] = {}  # the socket's SNDTIMEO/RCVTIMEO as last set

    def _reset_socket(self) -> None:
        """Give up on the current socket (drop what it queued) and connect a fresh one."""
        if self._sock is not None:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.close()
            self._sock = None
        self._open_socket()

    def _request(self, op: str, args: dict, payload: list | tuple = (), *, timeout: float | None = None,
                 rehello: bool = True) -> tuple[Any, list]:
        """Send one request and wait for its reply; returns (result, payload frames)."""
        with self._lock:
            if self._closed:
                raise StoreClosedError("the client is closed")
            if timeout is None:
                end = getattr(self._tls, "end", None)
                deadline_s = self.timeout if end is None else self._tls.total  # what a timeout names
                # a follow-up (commit, release) keeps a sliver of time so a claim is not left open
                budget = self.timeout if end is None else max(end - time.monotonic(), 0.05)
            else:
                budget = deadline_s = timeout
            limit = self.server_info.get("max_message_bytes")
            if limit and payload:
                size = sum(len(memoryview(f).cast("B")) for f in payload)
                if size > limit:
                    raise MessageTooLargeError(f"{op} of {size} bytes exceeds the sidecar's max_message_bytes "
                                               f"({limit}); send fewer tokens per call")
            attempts = 1 + (self.retries if op in IDEMPOTENT else 0)
            end = time.monotonic() + budget
            for attempt in range(attempts):
                share = (end - time.monotonic()) / (attempts - attempt)
                reply = self._exchange(op, args, payload, share) if share > 0 else None
                if reply is None:
                    self._reset_socket()
                    continue
                header, frames = reply
                if header.get("ok") is True:
                    return header.get("result"), frames
                exc = error_from_reply(header.get("error"))
                if isinstance(exc, UnknownNamespaceError) and rehello and op != "hello":
                    self._hello(self.connect_timeout)  # the sidecar restarted: join again, retry once
                    return self._request(op, args, payload, timeout=timeout, rehello=False)
                raise exc
            what = "hello" if op == "hello" else op
            hint = ipc_diagnosis(self.url) or (
                "is `kvstore serve` running there, and does it know this client's CurveZMQ key?"
                if self._curve is not None else
                "is `kvstore serve` running there (without CurveZMQ, or pass curve=...)?")
            raise SidecarUnavailableError(
                f"no reply from the sidecar at {self.url} to {what!r} within {deadline_s:.3g} s "
                f"({attempts} attempt{'s' if attempts > 1 else ''}); {hint}")

    def _exchange(self, op: str, args: dict, payload: list | tuple, budget: float) -> tuple[dict, list] | None:
        """One send + wait on the current socket; None on timeout. Stale replies are skipped."""
        assert self._sock is not None
        rid = next(self._ids)
        # A DEALER whose only peer refused the handshake (CurveZMQ) has no pipe and would block
        # in send forever: bound the send by the same budget.
        self._set_timeout(zmq.SNDTIMEO, max(1, int(budget * 1000)))
        try:
            # Zero-copy only for tensor payloads: for a small request pyzmq's copy=False path
            # (a Frame per part) cost ~20 us a part here, a copy well under 1 us.
            self._sock.send_multipart(request_frames(rid, op, args, max(1, int(budget * 1000)), payload),
                                      copy=not payload)
        except zmq.Again:
            return None
        end = time.monotonic() + budget
        for _ in range(1000):  # bounded: each pass consumes one reply
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            # A receive bounded by RCVTIMEO: one call into libzmq per reply (no poll before it).
            self._set_timeout(zmq.RCVTIMEO, max(1, int(remaining * 1000)))
            try:
                frames = self._sock.recv_multipart(copy=op != "get")  # only a get's reply carries KV
            except zmq.Again:
                return None
            if len(frames) < 2 or bytes(frames[0]) != MAGIC:
                raise ProtocolError(f"the peer at {self.url} is not a kvstore sidecar (bad reply frames)")
            header = unpack(frames[1])
            if not isinstance(header, dict):
                raise ProtocolError("reply header is not a map")
            if header.get("v") != VERSION:
                err = header.get("error") or {}
                raise VersionMismatchError(f"the sidecar at {self.url} speaks protocol v{header.get('v')!r}, this "
                                           f"client v{VERSION}" + (f": {err.get('message')}" if err else ""))
            if header.get("id") != rid:
                continue  # a late reply to an earlier request
            return header, list(frames[2:])
        return None

    def _set_timeout(self, option: int, ms: int) -> None:
        """Bound the next send or receive by ``ms``, calling setsockopt only when the value
        set is off by more than a slack: pyzmq's setsockopt costs ~40 us here (most of a
        lookup's client-side time when it ran on every request). The value set is ``ms``
        rounded up to 8 ms and kept while the bound asked for is at most that and at least
        that less ``min(value / 16, 50 ms)``: a wait may overrun its deadline by at most
        that slack (<= 58 ms), never end early."""
        cur = self._timeouts.get(option)
        if cur is not None and cur - min(cur // 16, 50) <= ms <= cur:
            return
        value = -(-ms // 8) * 8
        assert self._sock is not None
        self._sock.setsockopt(option, value)
        self._timeouts[option] = value

    def _hello(self, timeout: float) -> None:
        result, _ = self._request("hello", {"ns": self.namespace, "layout": self.layout.to_dict(),
                                            "block_tokens": self.block_tokens, "pid": os.getpid(),
                                            "host": host_id(), "owner": self._owner}, timeout=timeout)
        self.server_info = result
        self._owner_checked = bool(result.get("owner_checked"))
        self.lease_timeout_s = float(result.get("lease_timeout_s", 30.0))
        self._map_shm(result.get("shm"))

    def _map_shm(self, shm: dict | None) -> None:
        self._rows, self._rows_u8, self._idents = [], [], []
        self._staged, self._stage_claim = [], None  # slots of arenas we no longer map
        if self._want_shm is False or not shm or shm.get("host") != host_id():
            return
        block_shape = self.layout.block_shape(self.block_tokens)
        rows, idents = [], []
        try:
            for seg in shm["segments"]:
                data = map_shared(seg["path"], seg["num_slots"], seg["slot_bytes"])
                rows.append(data.view(self.layout.dtype).view(seg["num_slots"], *block_shape))
                idents.append(int(seg["ident"]))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError):
            return  # not mappable here: fall back to frames
        self._rows, self._rows_u8, self._idents = rows, [as_u8(r) for r in rows], idents

    def _remap(self) -> None:
        """The server names other arenas than we mapped (it restarted): join and map again."""
        self._hello(self.connect_timeout)

    def _send_oneway(self, op: str, args: dict) -> None:
        """Send a give-back whose answer we do not wait for, asking for none (a sidecar that
        answers anyway has it skipped by the next call)."""
        with self._lock:
            if self._closed or self._sock is None:
                return
            try:
                self._sock.send_multipart(request_frames(next(self._ids), op, args, int(self.timeout * 1000),
                                                         reply=False), flags=zmq.NOBLOCK)
                self._oneway_sent = True
            except zmq.ZMQError:
                pass  # the claim expires on the server anyway

    @property
    def uses_shm(self) -> bool:
        return bool(self._rows)

    def _ns_args(self, tokens: Any) -> tuple[Any, dict]:
        arr = tokens_to_array(tokens)
        return arr, {"ns": self.namespace, "tokens": arr.tobytes()}

    # -- API ---------------------------------------------------------------------------
    @_with_deadline
    def put(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int:
        """Store ``tokens``' full blocks; returns the cached prefix length (see ``KVStore.put``)."""
        self._check_open()
        arr, args = self._ns_args(tokens)
        check_kv(self.layout, kv, len(arr))
        if activations is not None:
            check_act(self.layout, activations, len(arr))
        nb = len(arr) // self.block_tokens
        if nb == 0:
            return 0
        kv = kv_on_host(kv, getattr(self, "copier", DEFAULT_COPIER))  # once, then hashed and copied from there
        if activations is not None:  # the shared arenas hold KV only
            return self._put_frames(args, kv, activations)
        kv6 = self._block_rows(kv, nb)
        return self._put_rows(args, nb, lambda dst, slots: self._copy(
            self._row_jobs(self._host_rows(kv6), dst, enumerate(slots)), hash_dst=False), lambda: kv)

    def put_async(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> PutHandle:
        """``put`` without stalling the caller (``KVStore.put_async``'s semantics): input is
        checked now (errors raise here), the copy into shared memory and the ``put_shm`` run on
        the client's save thread, and the blocks become visible to every reader only once all
        their bytes are in. Returns a :class:`~kvstore.saves.PutHandle`: ``done()``, ``wait()``
        (``put``'s result, or its error). ``kv`` must not change until ``done()``. Saves
        complete in submission order; ``close()`` waits for them. Each save has the client's
        ``timeout`` from when it starts. Same costs as ``put``, off the caller's thread."""
        self._check_open()
        arr = np.array(tokens_to_array(tokens), copy=True)  # the caller may reuse its token list
        check_kv(self.layout, kv, len(arr))
        if activations is not None:
            check_act(self.layout, activations, len(arr))
        return self._saver.submit(lambda: self.put(arr, kv, activations), kv, activations)

    def _block_rows(self, kv: torch.Tensor, nb: int) -> torch.Tensor:
        """The first ``nb`` blocks of ``kv`` (``[layers, 2, T, kv_heads, head_dim]``) as
        ``[nb, layers, 2, block_tokens, kv_heads, head_dim]`` rows: a strided view, no copy."""
        return as_block_rows(kv.detach(), self.block_tokens, nb)

    def _bounce_rows(self, nb: int) -> torch.Tensor:
        """``nb`` rows of this client's reusable host buffer (pinned on CUDA hosts): where
        blocks of a GPU tensor land before they are copied into shared memory, or after they
        are read from it -- one buffer per calling thread for the client's life, grown when
        a call needs more, freed when the thread is gone.
        Only used when a bounce is unavoidable (GPU memory or an odd layout)."""
        lay, bt = self.layout, self.block_tokens
        me = threading.current_thread()
        buf = self._bounces.get(me)
        if buf is None or buf.shape[0] < nb:
            shape = (nb, *lay.block_shape(bt))
            buf = self._bounces[me] = torch.empty(shape, dtype=lay.dtype, pin_memory=torch.cuda.is_available())
        return buf[:nb]

    def _host_rows(self, rows: torch.Tensor) -> np.ndarray:
        """``rows`` (blocks, any device) as uint8 numpy rows on the host: a view when they are
        already there, else one copy into the bounce buffer (DMA from a GPU)."""
        u8 = as_u8(rows)
        if u8 is not None:
            return u8
        buf = self._bounce_rows(rows.shape[0])
        copier = getattr(self, "copier", DEFAULT_COPIER)
        copier.copy(buf, rows)
        copier.wait(rows)  # a device->host copy lands before the host reads the bounce
        return as_u8(buf)

    def _row_jobs(self, src: np.ndarray | list, dst: np.ndarray | list, pairs: Any) -> list:
        """Copy jobs ``dst[d] <- src[s]`` for ``(s, d)`` in ``pairs`` (see
        :func:`allocator.checksum.copy_digests`). Either side may be a :class:`_PerLayer`
        pool (its block is ``2 * layers`` separate rows)."""
        jobs = []
        for s, d in pairs:
            if isinstance(src, _PerLayer):
                drow = dst[d]
                jobs.append([(v[s], drow[i // 2, i % 2]) for i, v in enumerate(src.views)])
            elif isinstance(dst, _PerLayer):
                srow = src[s]
                jobs.append([(srow[i // 2, i % 2], v[d]) for i, v in enumerate(dst.views)])
            else:
                jobs.append(row_pieces(src[s], dst[d]))
        return jobs

    def _copy(self, jobs: list, *, hash_dst: bool) -> np.ndarray:
        return copy_digests(jobs, hash_dst=hash_dst, pool=self._hasher, parts=self._hash_parts)

    def _put_rows(self, args: dict, nb: int, copy_in: Callable[[np.ndarray, list[int]], np.ndarray],
                  whole: Callable[[], torch.Tensor]) -> int:
        """Put ``nb`` blocks: ``copy_in(slot_rows, slots)`` copies them into staged shared
        slots and returns the checksums of what it copied (hashed from the cache beside the
        copy) when we can, else they go as frames of ``whole()`` (the ``[layers, 2, T, ...]``
        tensor)."""
        if self._rows:
            done = self._put_shm(args, nb, copy_in)
            if done is not None:
                return done
        return self._put_frames(args, whole())

    def _put_frames(self, args: dict, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int:
        tensors = {"kv": kv} if activations is None else {"kv": kv, "act": activations}
        frames = []
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type != "cpu" or not t.is_contiguous():
                t = t.to("cpu").contiguous()
            args = {**args, name: tensor_desc(t)}
            frames.append(tensor_frame(t))
        result, _ = self._request("put", args, frames)
        return int(result)

    def _stage(self, nb: int) -> None:
        """Hold at least ``nb`` staged slots (one extra round trip: first or larger put)."""
        args = {"ns": self.namespace, "blocks": nb, "owner": self._owner}
        if self._stage_claim is not None:
            args["claim"] = self._stage_claim
        res, _ = self._request("stage", args)
        if res.get("mode") != "shm":
            self._staged = []
            return
        if res.get("arena") != self._idents:
            self._remap()
            return
        self._stage_claim, self._stage_seg = res["claim"], res["seg"]
        self._set_staged(res["slots"])

    def _set_staged(self, slots: list[int]) -> None:
        """Record our free staged slots (as the sidecar last confirmed them, less the ones a
        put in progress is writing)."""
        self._staged = [s for s in slots if s not in self._writing]
        self._staged_at = time.monotonic()

    def _put_shm(self, args: dict, nb: int, copy_in: Callable[[np.ndarray, list[int]], np.ndarray]) -> int | None:
        """Copy ``nb`` blocks into staged slots (``copy_in``), then one ``put_shm``; None:
        send frames instead. The slots are taken under the lock, the copy runs outside it (a
        save on another thread never holds up this client's loads), the message under it."""
        with self._lock:
            # A sidecar that cannot check our liveness reclaims staged slots on the timeout
            # alone: slots staged that long ago may be another block's now, so stage anew.
            if not self._writing and not self._owner_checked and \
                    time.monotonic() - self._staged_at > self.lease_timeout_s / 2:
                self._staged, self._stage_claim = [], None
            if len(self._staged) < nb:
                self._stage(nb + len(self._writing))
                if len(self._staged) < nb or not self._rows:
                    return None
            slots = self._staged[:nb]
            del self._staged[:nb]
            self._writing.update(slots)
            dst, claim, arena = self._rows_u8[self._stage_seg], self._stage_claim, list(self._idents)
        try:
            sums = copy_in(dst, slots)
            try:
                res, _ = self._request("put_shm", {**args, "claim": claim, "slots": slots,
                                                   "sums": to_wire(sums), "arena": arena})
            except StaleArenaError:
                if arena == self._idents:
                    self._remap()
                return None
            except UnknownLeaseError:
                with self._lock:
                    if self._stage_claim == claim:
                        self._staged, self._stage_claim = [], None  # reclaimed or the sidecar restarted
                return None
        finally:
            with self._lock:
                self._writing.difference_update(slots)
        with self._lock:
            if self._stage_claim == claim:
                self._set_staged(res["slots"])
        return int(res["tokens"])

    @_with_deadline
    def lookup(self, tokens: Any, *, exact: bool | None = None) -> int:
        """Cached prefix length in tokens (a multiple of block_tokens); ``exact`` as ``get``."""
        self._check_open()
        _, args = self._ns_args(tokens)
        if exact is not None:
            args["exact"] = bool(exact)
        result, _ = self._request("lookup", args)
        return int(result)

    def _lease(self, args: dict) -> tuple[dict, list]:
        """A ``get`` of ``args``' tokens asking for shared memory; maps again (and asks once
        more) when the reply names other arenas than we map."""
        result, frames = self._request("get", {**args, "shm": True, "owner": self._owner})
        if result["mode"] == "shm" and result.get("arena") != self._idents:
            self._send_oneway("release", {"claim": result["claim"]})
            self._remap()  # a stale mapping: map the current arenas, then read again
            result, frames = self._request("get", {**args, "shm": bool(self._rows), "owner": self._owner})
        return result, frames

    @_with_deadline
    def get(self, tokens: Any, device: torch.device | str | None = None, *, exact: bool | None = None) -> torch.Tensor:
        """The KV of ``tokens`` (whole, fully cached blocks), bytes equal to what was put --
        or, where a tier's lossy codec stored them and ``exact`` (None: the namespace's
        ``lossy_ok``) allows, their decoded approximation (``KVStore.get``)."""
        self._check_open()
        arr, args = self._ns_args(tokens)
        if exact is not None:
            args["exact"] = bool(exact)
        out_device = torch.device(device) if device is not None else self.device
        if self._rows:
            result, frames = self._lease(args)
            if result["mode"] == "shm":
                try:
                    out = self._copy_verified(result)
                except BlockNotFoundError:
                    raise  # the corrupt blocks were reported with the release
                except BaseException:  # never leave the lease pinned behind a failed copy
                    self._release_quietly(result["claim"])
                    raise
                return out if out_device.type == "cpu" else out.to(out_device)
        else:
            result, frames = self._request("get", args)
        if len(frames) != 1:
            raise ProtocolError(f"get reply carries {len(frames)} payload frames, expected 1")
        kv = tensor_from_frame(frames[0], result["kv"])
        return kv.to(out_device)

    def _release_quietly(self, claim: int) -> None:
        try:
            self._send_oneway("release", {"claim": claim})
        except Exception:  # it expires on the server anyway
            pass

    def _report_corrupt(self, claim: int, bad: list[int]) -> None:
        """Release a lease naming the positions whose copy failed (the sidecar drops them)."""
        try:
            self._request("release", {"claim": claim, "corrupt": bad})
        except SidecarError:  # reclaimed meanwhile: the sidecar finds them on its own reads
            pass

    @_with_deadline
    def load_into(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any, *,
                  on_error: str = "raise", exact: bool | None = None, start: int = 0) -> LoadResult:
        """``KVStore.load_into`` over the sidecar: block ``i`` of ``tokens``' (whole, fully
        cached) prefix lands in pool block ``block_ids[i]``; the pool layouts and errors are
        the store's. The pool and ids are checked before anything is sent.

        Over shared memory each block is copied once, from its slot straight into its pool
        rows, and the pool rows are hashed right after the copy (from the cache) and checked
        against the checksums the block's writer recorded: the pool is this process's own
        memory, so what is verified there is what the engine will read. A block whose bytes
        were changed in shared memory after it was written fails that check: the sidecar is
        told (it drops the block), and the pool rows of ``block_ids[i]`` now hold unusable
        bytes. A CPU pool whose rows are strided (head-major, or several store blocks per
        engine block) is filled a cache-sized chunk of blocks at a time through a small
        reusable bounce per thread: copied and verified there, then laid out into the pool
        from the cache; a block that fails is not placed at all (its rows keep what they
        held, and are named unusable all the same). A GPU pool is filled through one
        reusable pinned host buffer (verified there, then one DMA of the good blocks);
        without shared memory the blocks arrive as frames.

        Returns a :class:`~clients.base.LoadResult`, an ``int``: the tokens loaded
        (``len(tokens)``), with ``failed_block_ids`` / ``failed_positions`` empty. When blocks
        fail, ``on_error="raise"`` (the default) raises
        :class:`~clients.base.BlockLoadError` (a ``BlockNotFoundError``) carrying the same
        ``LoadResult`` (``.result``, ``.failed_block_ids``); ``on_error="report"`` returns it:
        its int value is then the tokens of the prefix before the first failed block, and
        ``failed_block_ids`` names every pool block whose rows must not be used. A block
        missing from the store fails the whole call before the pool is touched (all its ids
        are named failed in ``"report"`` mode). O(bytes): one copy, hashed from the cache.

        ``start``: only blocks ``start...`` of the prefix are copied, block ``start + j`` into
        pool block ``block_ids[j]`` (one id per copied block): the engine holds the blocks
        before it already (its own prefix-cache hit) and they are neither read nor written,
        though the whole prefix must still be cached. ``failed_positions`` stay positions
        in the whole prefix (``>= start``) and the int value counts the blocks before
        ``start`` as loaded: ``start * block_tokens`` when nothing was. Over shared memory
        the lease names the whole prefix (a few bytes per block) but only blocks
        ``start...`` are copied and verified; as frames only blocks ``start...`` cross.
        """
        self._check_open()
        if on_error not in ("raise", "report"):
            raise InvalidInputError(f"on_error must be 'raise' or 'report', got {on_error!r}")
        arr = tokens_to_array(tokens)
        bt = self.block_tokens
        check_whole_blocks(len(arr), bt)
        nb = len(arr) // bt
        start = check_start(start, nb)
        rows, num_blocks = paged.pool_rows(self.layout, bt, pool)
        ids = paged.block_ids(block_ids, nb - start, num_blocks)
        if nb == 0:
            return LoadResult(0)
        try:
            bad = self._load_blocks(arr, rows, ids, pool, exact=exact, start=start)
        except BlockNotFoundError:
            if on_error == "raise":
                raise
            return LoadResult(start * bt, ids, range(start, nb))
        if not bad:
            return LoadResult(len(arr))
        res = LoadResult(bad[0] * bt, [ids[i - start] for i in bad], bad)
        if on_error == "report":
            return res
        raise BlockLoadError(res, f"{len(bad)} block(s) changed in shared memory after they were written and "
                                  f"were dropped; pool blocks {list(res.failed_block_ids)[:8]} hold unusable "
                                  "bytes: recompute them")

    # -- an engine's GPU pool by CUDA IPC -----------------------------------------------
    def register_pool(self, pool: torch.Tensor | list[torch.Tensor]) -> bool:
        """Let the sidecar reach this CUDA pool directly (once per pool): its memory is shared
        with the sidecar by CUDA IPC (see :mod:`kvstore.sidecar.gpu_pool`), and from then on
        ``load_into`` / ``save_from`` (and ``save_from_async``) of this pool move blocks by DMA
        between the sidecar's host tier and the GPU, with no copy through this process's CPU
        memory. Returns False, changing nothing, when that cannot be done here: a CPU pool,
        a sidecar on another host or without shared memory or without CUDA (those calls then
        go through the client's reusable pinned buffer). The pool must stay allocated (and
        at the same address) until :meth:`unregister_pool` or ``close()``. O(pool tensors)."""
        self._check_open()
        rows, _ = paged.pool_rows(self.layout, self.block_tokens, pool)
        if paged.device_of(rows).type != "cuda" or not self._rows:
            return False
        key = _pool_key(pool)
        if key in self._gpu_pools:
            return True
        from kvstore.sidecar.gpu_pool import export_tensor

        tensors = [pool] if isinstance(pool, torch.Tensor) else list(pool)
        try:
            res, _ = self._request("register_pool", {"ns": self.namespace, "owner": self._owner,
                                                     "tensors": [export_tensor(t) for t in tensors]})
        except SidecarError as exc:
            if exc.code == "unsupported":
                return False
            raise
        self._gpu_pools[key] = int(res["pool"])
        return True

    def unregister_pool(self, pool: torch.Tensor | list[torch.Tensor]) -> None:
        """Forget a pool :meth:`register_pool` shared (the sidecar closes its mapping)."""
        pid = self._gpu_pools.pop(_pool_key(pool), None)
        if pid is not None and not self._closed:
            try:
                self._request("unregister_pool", {"ns": self.namespace, "pool": pid})
            except (SidecarError, InvalidInputError):
                pass  # the sidecar restarted or reaped it: nothing left to close

    def _pool_op(self, op: str, arr: np.ndarray, pool: Any, rows: paged.Rows, ids: list[int],
                 start: int = 0) -> int | None:
        """``load_pool`` / ``save_pool`` on a registered GPU pool; None when ``pool`` is not
        registered (or the sidecar forgot it: then it is registered no longer). ``start``
        (a load's first block) is sent only when set, so a sidecar that predates it serves
        every other load."""
        if not self._gpu_pools:
            return None
        key = _pool_key(pool)
        pid = self._gpu_pools.get(key)
        if pid is None:
            return None
        for t in (rows if isinstance(rows, paged.LayerRows) else [rows])[:1]:
            torch.cuda.current_stream(t.device).synchronize()  # what a save reads is written; a load overwrites nothing in use
        _, args = self._ns_args(arr)
        try:
            res, _ = self._request(op, {**args, "pool": pid, "block_ids": list(ids), **({"start": start} if start else {})})
        except InvalidInputError as exc:
            if "no GPU pool" not in str(exc):
                raise
            self._gpu_pools.pop(key, None)
            return None
        return int(res)

    def _load_blocks(self, arr: np.ndarray, rows: paged.Rows, ids: list[int], pool: Any = None, *,
                     exact: bool | None = None, start: int = 0) -> list[int]:
        """Copy blocks ``start...`` of ``arr`` into pool ``rows`` at ``ids`` (one id each);
        returns the prefix positions of blocks that failed verification (their rows named
        unusable). Raises ``BlockNotFoundError`` (pool untouched) when a block of the
        whole prefix is not cached."""
        nb = len(ids)
        if exact is None and pool is not None and \
                self._pool_op("load_pool", arr, pool, rows, ids, start) is not None:
            return []  # verified by the sidecar before the DMA: any failure raised, pool untouched
        _, args = self._ns_args(arr)
        if exact is not None:  # issue 24: the namespace's lossy_ok decides unless the caller says
            args["exact"] = bool(exact)
        if start:
            args["start"] = start  # a reply as frames carries blocks start... only (a lease names all)
        if self._rows:
            result, frames = self._lease(args)
            if result["mode"] == "shm":
                try:
                    if len(result["blocks"]) != start + nb:
                        raise ProtocolError(f"get lease names {len(result['blocks'])} blocks, expected {start + nb}")
                    blocks = result["blocks"][start:]  # the lease's blocks before start are never read
                    want = from_wire(result["sums"], start + nb)[start:]
                    dev = paged.device_of(rows)
                    if dev.type == "cpu" and (dst := _pool_u8(rows)) is not None:
                        got = self._copy(self._seg_jobs(blocks, dst, ids), hash_dst=True)
                        bad = [int(i) for i in (got != want).nonzero()[0]]
                    elif dev.type == "cpu":  # strided rows: verified a chunk at a time, placed from the cache
                        bad = self._load_chunked(blocks, want, rows, ids)
                    else:  # a GPU pool: verified in the bounce buffer, then one DMA of the good blocks
                        buf = self._bounce_rows(nb)
                        got = self._copy(self._seg_jobs(blocks, as_u8(buf), range(nb)), hash_dst=True)
                        bad = [int(i) for i in (got != want).nonzero()[0]]
                        good = [i for i in range(nb) if i not in set(bad)]
                        paged.place(buf, good, rows, [ids[i] for i in good])
                        paged.wait(rows)  # the buffer is reused by the next call
                    bad = [start + i for i in bad]  # positions in the lease (the whole prefix)
                except BaseException:
                    self._release_quietly(result["claim"])
                    raise
                if bad:
                    self._report_corrupt(result["claim"], bad)
                else:
                    self._send_oneway("release", {"claim": result["claim"]})
                return bad
        else:
            result, frames = self._request("get", args)
        if len(frames) != 1:
            raise ProtocolError(f"get reply carries {len(frames)} payload frames, expected 1")
        kv = tensor_from_frame(frames[0], result["kv"])
        got = kv.shape[2] // self.block_tokens if kv.dim() == 5 else -1
        if got == nb:  # blocks start... only
            paged.place(self._block_rows(kv, nb), range(nb), rows, ids)
        elif got == start + nb:  # the whole prefix (a sidecar that does not cut at start)
            paged.place(self._block_rows(kv, start + nb), range(start, start + nb), rows, ids)
        else:
            raise ProtocolError(f"get reply carries KV of shape {tuple(kv.shape)}, expected {nb} or "
                                f"{start + nb} blocks of {self.block_tokens} tokens")
        paged.wait(rows)
        return []

    def _chunk_bounce(self, per: int) -> np.ndarray:
        """This thread's reusable bounce of ``per`` slot-shaped uint8 rows (see
        :mod:`clients.chunked`): allocated on a thread's first chunked copy, then reused while
        the thread lives (grown only if a call needs more rows). O(1) once allocated."""
        me = threading.current_thread()
        buf = self._chunk_bounces.get(me)
        if buf is None or buf.shape[0] < per:
            shape = (per, *self.layout.block_shape(self.block_tokens))
            buf = self._chunk_bounces[me] = as_u8(torch.empty(shape, dtype=self.layout.dtype))
        return buf[:per]

    def _chunks(self, nb: int) -> tuple[int, list[range]]:
        """``nb`` blocks as cache-sized chunks: ``(blocks per chunk, chunks)``."""
        per = chunk_blocks(self.layout.kv_block_bytes(self.block_tokens), self._chunk_bytes)
        return per, chunks_of(nb, per)

    def _load_chunked(self, blocks: list, want: np.ndarray, rows: paged.LayerRows, ids: list[int]) -> list[int]:
        """Blocks ``blocks[i]`` (lease slots) into strided CPU pool ``rows`` at store block
        ``ids[i]``, a chunk at a time: the chunk's slots are copied into this thread's bounce
        and hashed from the cache, and each block whose digest equals ``want[i]`` is then
        laid out into the pool from the cache. A block that fails is never placed (its pool
        rows keep what they held). Chunks run on the caller and the copy pool's threads.
        Returns the failed indices into ``blocks``, ascending. O(bytes): about one pass."""
        sp = StridedPool(rows)
        per, cuts = self._chunks(len(ids))
        failed: list[list[int]] = [[] for _ in cuts]

        def work(c: int) -> None:
            chunk, buf = cuts[c], self._chunk_bounce(per)
            got = copy_digests(self._seg_jobs([blocks[i] for i in chunk], buf, range(len(chunk))), hash_dst=True)
            for k, i in enumerate(chunk):
                if got[k] == want[i]:
                    sp.put(buf[k], ids[i])
                else:
                    failed[c].append(i)
        run_chunks(len(cuts), work, self._hasher, self._hash_parts)
        return [i for f in failed for i in f]

    def _save_chunked(self, rows: paged.LayerRows, ids: list[int], dst: np.ndarray, slots: list[int]) -> np.ndarray:
        """Store blocks ``ids[i]`` of strided CPU pool ``rows`` into slots ``dst[slots[i]]``,
        a chunk at a time: gathered from the pool into this thread's bounce, then copied into
        the slots with each piece hashed right after its copy from the bounce (in the cache).
        Returns the checksums of what was copied. O(bytes): about one pass."""
        sp = StridedPool(rows)
        per, cuts = self._chunks(len(ids))
        sums = np.empty(len(ids), dtype=np.uint64)

        def work(c: int) -> None:
            chunk, buf = cuts[c], self._chunk_bounce(per)
            for k, i in enumerate(chunk):
                sp.get(ids[i], buf[k])
            sums[chunk.start:chunk.stop] = copy_digests(
                self._row_jobs(buf, dst, [(k, slots[i]) for k, i in enumerate(chunk)]), hash_dst=False)
        run_chunks(len(cuts), work, self._hasher, self._hash_parts)
        return sums

    def _seg_jobs(self, blocks: list, dst: Any, ids: Any) -> list:
        """Copy jobs from the lease's slots (``blocks[i] = [segment, slot]``) to ``dst[ids[i]]``."""
        jobs = []
        for (seg, slot), d in zip(blocks, ids):
            jobs.extend(self._row_jobs(self._rows_u8[seg], dst, [(slot, d)]))
        return jobs

    @_with_deadline
    def save_from(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> int:
        """``KVStore.save_from`` over the sidecar: ``put`` of the full blocks of ``tokens``
        whose KV sits in pool blocks ``block_ids`` (one more id, for a partial trailing
        block, is accepted and ignored). Returns the cached prefix length in tokens. Over
        shared memory the blocks are copied straight from the pool rows into staged slots,
        each piece hashed from the cache right after its copy (a strided CPU pool is
        gathered a cache-sized chunk at a time into a small per-thread bounce first; a GPU
        pool into the client's reusable pinned buffer by one DMA); otherwise they cross as one
        frame. The pool may be reused once this returns. O(bytes): one copy."""
        self._check_open()
        arr, nb, rows, ids = self._save_args(tokens, pool, block_ids)
        if not nb:
            return 0
        return self._save_rows(arr, nb, rows, ids, pool)

    def save_from_async(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> PutHandle:
        """``save_from`` without stalling the caller (``put_async``'s semantics): the pool and
        ids are checked now; the copy out of the pool and the ``put_shm`` run on the client's
        save thread (on CUDA after the caller's current stream reaches this point). The pool
        blocks must not be overwritten until ``handle.done()``; the blocks are visible only
        once all their bytes are in; ``close()`` waits. Returns a
        :class:`~kvstore.saves.PutHandle` (``wait()`` gives ``save_from``'s result)."""
        self._check_open()
        arr, nb, rows, ids = self._save_args(tokens, pool, block_ids)
        arr = np.array(arr, copy=True)
        tensors = list(rows) if isinstance(rows, paged.LayerRows) else [rows]

        def job() -> int:
            return self._save_rows(arr, nb, rows, ids, pool, timeout=self.timeout) if nb else 0
        return self._saver.submit(job, *tensors)

    def _save_args(self, tokens: Any, pool: Any, block_ids: Any) -> tuple[np.ndarray, int, paged.Rows, list[int]]:
        arr = tokens_to_array(tokens)
        bt = self.block_tokens
        nb = len(arr) // bt
        rows, num_blocks = paged.pool_rows(self.layout, bt, pool)
        ids = paged.block_ids(block_ids, nb, num_blocks, spare=1 if len(arr) % bt else 0)
        return arr[:nb * bt], nb, rows, ids

    @_with_deadline
    def _save_rows(self, arr: np.ndarray, nb: int, rows: paged.Rows, ids: list[int], pool: Any = None) -> int:
        if pool is not None:
            done = self._pool_op("save_pool", arr, pool, rows, ids)
            if done is not None:
                return done
        _, args = self._ns_args(arr)

        def copy_in(dst: np.ndarray, slots: list[int]) -> np.ndarray:
            on_cpu = paged.device_of(rows).type == "cpu"
            src = _pool_u8(rows) if on_cpu else None
            if src is not None:
                return self._copy(self._row_jobs(src, dst, zip(ids, slots)), hash_dst=False)
            if on_cpu:  # strided rows: gathered a chunk at a time, hashed from the cache
                return self._save_chunked(rows, ids, dst, slots)  # type: ignore[arg-type]
            # a GPU pool: one gather on the device, one DMA into the bounce buffer
            return self._copy(self._row_jobs(self._host_rows(paged.take(rows, ids)), dst, enumerate(slots)),
                              hash_dst=False)

        def whole() -> torch.Tensor:
            kv6 = paged.take(rows, ids).cpu()
            return from_block_rows(kv6)
        return self._put_rows(args, nb, copy_in, whole)

    def _copy_verified(self, result: dict) -> torch.Tensor:
        """Copy a lease's blocks out into a new CPU tensor, hashing each piece from the cache
        right after its copy, check against the reply's checksums, release.

        Raises ``BlockNotFoundError`` (after telling the sidecar, which drops them) when a
        block's bytes changed after they were written. O(bytes): one copy."""
        blocks = result["blocks"]
        nb, bt, lay = len(blocks), self.block_tokens, self.layout
        nbytes = nb * bt * lay.kv_bytes_per_token
        if nbytes >= _FRESH_MAPPING_BYTES:  # malloc would map fresh pages too: populate them at once
            out = fresh_memory(nbytes).view(lay.dtype).view(lay.kv_shape(nb * bt))
        else:  # malloc may hand back warm memory a previous result freed
            out = torch.empty(lay.kv_shape(nb * bt), dtype=lay.dtype)
        out6 = self._block_rows(out, nb)
        want = from_wire(result["sums"], nb)
        got = self._copy(self._seg_jobs(blocks, as_u8(out6), range(nb)), hash_dst=True)
        bad = [int(i) for i in (got != want).nonzero()[0]]
        if bad:
            self._report_corrupt(result["claim"], bad)
            raise BlockNotFoundError(f"{len(bad)} block(s) changed in shared memory after they were written "
                                     "and were dropped; recompute them")
        self._send_oneway("release", {"claim": result["claim"]})
        return out

    @_with_deadline
    def stats(self) -> dict:
        """The namespace's store statistics, plus the sidecar's under ``"sidecar"``."""
        self._check_open()
        result, _ = self._request("stats", {"ns": self.namespace})
        return {**result["namespace"], "sidecar": result["server"]}

    @_with_deadline
    def clear(self) -> int:
        self._check_open()
        result, _ = self._request("clear", {"ns": self.namespace})
        return int(result)

    @_with_deadline
    def plan(self, tokens: Any, profile: dict | None = None) -> dict:
        """The sidecar's transfer-or-recompute plan for ``tokens``' cached prefix."""
        self._check_open()
        _, args = self._ns_args(tokens)
        if profile is not None:
            args["profile"] = profile
        result, _ = self._request("plan", args)
        return result

    @_with_deadline
    def health(self) -> dict:
        self._check_open()
        result, _ = self._request("health", {})
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the client is closed")

    def close(self) -> None:
        """Wait for the saves in flight (``put_async``/``save_from_async``), give back the
        registered GPU pools, then disconnect."""
        if not self._closed:
            self._saver.close()
            for pid in list(self._gpu_pools.values()):
                try:
                    self._request("unregister_pool", {"ns": self.namespace, "pool": pid}, timeout=1.0)
                except Exception:  # noqa: BLE001 -- the sidecar reaps it when this process exits
                    pass
            self._gpu_pools.clear()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._teardown()

    def _teardown(self) -> None:
        # Releases sent without waiting (ours below, a get's) may still sit in the socket's
        # queue: give them long enough to reach a local sidecar, else they are lost and what
        # they free stays held until the lease times out.
        linger = 200 if self._oneway_sent else 0
        if self._stage_claim is not None and self._sock is not None:
            try:  # give our staged slots back now rather than at the lease timeout
                self._sock.send_multipart(request_frames(next(self._ids), "release", {"claim": self._stage_claim},
                                                         int(self.timeout * 1000)), flags=zmq.NOBLOCK)
                linger = 200
            except zmq.ZMQError:
                pass
        self._stage_claim, self._staged = None, []
        self._hasher.shutdown(wait=False)
        self._rows, self._rows_u8 = [], []
        if self._sock is not None:
            self._sock.setsockopt(zmq.LINGER, linger)
            self._sock.close()
            self._sock = None
        self._ctx.term()

    def __enter__(self) -> "SidecarClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


#: per thread: the pinned buffer a put of device KV lands in (reused across puts)
_put_staging = threading.local()
_HOST = torch.empty(0, dtype=torch.uint8)


def ipc_diagnosis(url: str) -> str | None:
    """Why nothing answers at an ``ipc://`` endpoint, read from its socket file: none there,
    one nobody listens on (left by a sidecar that died: ZeroMQ keeps retrying it quietly),
    or one this user may not open. None when the file accepts connections, or for other
    transports. One ``connect`` attempt; O(1)."""
    if not url.startswith("ipc://"):
        return None
    path = url[len("ipc://"):]
    if path.startswith("@"):  # Linux abstract namespace: no file to look at
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return f"there is no socket file {path}: start `kvstore serve --endpoint {url}` (or check the path)"
    except ConnectionRefusedError:
        return (f"{path} exists but nothing listens on it: a sidecar that stopped without removing it (killed?) "
                "left it; start the sidecar again (it replaces the file)")
    except PermissionError:
        return f"{path} is not open to this user (the sidecar makes it mode 0600: run as the sidecar's user)"
    except OSError:
        return None
    finally:
        probe.close()
    return None


def kv_on_host(kv: torch.Tensor, copier: Copier = DEFAULT_COPIER) -> torch.Tensor:
    """``kv`` itself when it is in host memory; else its bytes copied once into this
    thread's reusable pinned buffer, on the caller's current stream, and waited for.

    Why: a put hashes its source on pool threads, whose current CUDA stream is the legacy
    default stream, while the copy ran on the caller's stream -- KV produced on an engine
    stream could hash differently from the bytes stored (every reader then drops the block),
    and the bytes crossed PCIe twice. From host memory both read the same landed bytes.
    The buffer is valid until this thread's next put. O(bytes) once."""
    if not copier.crosses(kv, _HOST):
        return kv
    nbytes = kv.numel() * kv.element_size()
    buf = getattr(_put_staging, "buf", None)
    if buf is None or buf.numel() < nbytes or copier.crosses(buf, _HOST):
        buf = _put_staging.buf = copier.empty((max(nbytes, 1),), torch.uint8, _HOST, pinned=True)
    out = buf[:nbytes].view(kv.dtype).view(kv.shape)
    copier.copy(out, kv)
    copier.wait(kv)  # the caller's stream of kv's device: the bytes are in before anyone reads them
    return out
