"""``RemoteClient``: the client interface over the sidecar (ZeroMQ DEALER, msgpack).

Data plane: when the sidecar is on this host (its host id matches ours and its shared
arenas can be mapped), ``get`` copies KV straight out of the shared host tier into the
result (one copy) and ``put`` copies it straight in (one copy): the sidecar only moves slot
numbers (see :mod:`kvstore.sidecar.shm_plane`). A put writes into slots this client holds
staged ahead of time and sends one ``put_shm`` (one round trip; the reply tops the staged
slots up), with the xxh3 of each block hashed from our own KV beside the copy. A get copies
the leased slots out, verifies the copy against the checksums in the reply (a block that
fails is reported and raises ``BlockNotFoundError``, never returns other bytes) and sends
its ``release`` without waiting for the answer. Every reply that names slots names the
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
import threading
import time
from typing import Any

import numpy as np
import torch
import zmq

from allocator.checksum import digests, digests_beside, from_wire, to_wire
from allocator.memory import default_device
from allocator.rowcopy import DEFAULT_COPIER, Copier
from allocator.shm import map_shared
from kvstore import paged
from kvstore.errors import BlockNotFoundError, ConfigError, StoreClosedError
from kvstore.hashing import tokens_to_array
from kvstore.layout import ModelLayout
from kvstore.validate import check_whole_blocks
from kvstore.sidecar.procinfo import self_identity
from kvstore.errors import SidecarUnavailableError
from kvstore.sidecar.protocol import (IDEMPOTENT, MAGIC, VERSION, MessageTooLargeError, ProtocolError,
                              UnknownLeaseError, UnknownNamespaceError, VersionMismatchError, check_act, check_kv,
                              error_from_reply, request_frames, tensor_desc, tensor_frame, tensor_from_frame,
                              unpack)
from kvstore.sidecar.protocol import RemoteError, StaleArenaError
from kvstore.sidecar.security import CurveKeys, apply_client_curve, load_keys
from kvstore.sidecar.procinfo import host_id

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
    def call(self: "RemoteClient", *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        outer = getattr(self._tls, "end", None)
        if outer is None:  # nested calls keep the outermost deadline
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                        or timeout <= 0):
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            self._tls.end = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            return method(self, *args, **kwargs)
        finally:
            if outer is None:
                self._tls.end = None

    return call


def _runs(blocks: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Group ``(position, segment, slot)`` into runs ``(pos0, segment, slot0, length)`` where
    both position and slot advance by one: one strided copy per run instead of per block."""
    runs: list[list[int]] = []
    for pos, seg, slot in blocks:
        if runs:
            r = runs[-1]
            if r[1] == seg and pos == r[0] + r[3] and slot == r[2] + r[3]:
                r[3] += 1
                continue
        runs.append([pos, seg, slot, 1])
    return [tuple(r) for r in runs]  # type: ignore[misc]


class RemoteClient:
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
        self._rows: list[torch.Tensor] = []  # mapped shared segments as [slots, L, 2, bt, H, D]
        self._idents: list[int] = []  # identity of each mapped segment (the server's generation)
        self._staged: list[int] = []  # free slots of segment ``_stage_seg`` held for our puts
        self._stage_seg = 0
        self._stage_claim: int | None = None
        self._staged_at = 0.0  # when the sidecar last confirmed our staged slots
        # hashes a put's source beside its copy and a get's copy piece by piece (xxh3
        # releases the GIL)
        self._hash_parts = max(1, min(4, (os.cpu_count() or 2) - 1))
        self._hasher = ThreadPoolExecutor(max_workers=self._hash_parts, thread_name_prefix="kvstore-client-digest")
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
                # a follow-up (commit, release) keeps a sliver of time so a claim is not left open
                budget = self.timeout if end is None else max(end - time.monotonic(), 0.05)
            else:
                budget = timeout
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
            hint = ("is `kvstore serve` running there, and does it know this client's CurveZMQ key?"
                    if self._curve is not None else
                    "is `kvstore serve` running there (without CurveZMQ, or pass curve=...)?")
            raise SidecarUnavailableError(
                f"no reply from the sidecar at {self.url} to {what!r} within {budget:.3g} s "
                f"({attempts} attempt{'s' if attempts > 1 else ''}); {hint}")

    def _exchange(self, op: str, args: dict, payload: list | tuple, budget: float) -> tuple[dict, list] | None:
        """One send + wait on the current socket; None on timeout. Stale replies are skipped."""
        assert self._sock is not None
        rid = next(self._ids)
        # A DEALER whose only peer refused the handshake (CurveZMQ) has no pipe and would block
        # in send forever: bound the send by the same budget.
        self._set_timeout(zmq.SNDTIMEO, max(1, int(budget * 1000)))
        try:
            self._sock.send_multipart(request_frames(rid, op, args, max(1, int(budget * 1000)), payload), copy=False)
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
                frames = self._sock.recv_multipart(copy=False)
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
        """setsockopt only when the value changes (each call costs an enum conversion)."""
        if self._timeouts.get(option) != ms:
            assert self._sock is not None
            self._sock.setsockopt(option, ms)
            self._timeouts[option] = ms

    def _hello(self, timeout: float) -> None:
        result, _ = self._request("hello", {"ns": self.namespace, "layout": self.layout.to_dict(),
                                            "block_tokens": self.block_tokens, "pid": os.getpid(),
                                            "host": host_id(), "owner": self._owner}, timeout=timeout)
        self.server_info = result
        self._owner_checked = bool(result.get("owner_checked"))
        self.lease_timeout_s = float(result.get("lease_timeout_s", 30.0))
        self._map_shm(result.get("shm"))

    def _map_shm(self, shm: dict | None) -> None:
        self._rows, self._idents = [], []
        self._staged, self._stage_claim = [], None  # slots of arenas we no longer map
        if self._want_shm is False or not shm or shm.get("host") != host_id():
            return
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        rows, idents = [], []
        try:
            for seg in shm["segments"]:
                data = map_shared(seg["path"], seg["num_slots"], seg["slot_bytes"])
                rows.append(data.view(self.layout.dtype).view(seg["num_slots"], L, 2, self.block_tokens, H, D))
                idents.append(int(seg["ident"]))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError):
            return  # not mappable here: fall back to frames
        self._rows, self._idents = rows, idents

    def _remap(self) -> None:
        """The server names other arenas than we mapped (it restarted): join and map again."""
        self._hello(self.connect_timeout)

    def _send_oneway(self, op: str, args: dict) -> None:
        """Send a request whose reply we do not wait for (it is skipped when it arrives)."""
        with self._lock:
            if self._closed or self._sock is None:
                return
            try:
                self._sock.send_multipart(request_frames(next(self._ids), op, args, int(self.timeout * 1000)),
                                          copy=False, flags=zmq.NOBLOCK)
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
        return self._put_rows(args, self._block_rows(kv, nb), lambda: kv)

    def _block_rows(self, kv: torch.Tensor, nb: int) -> torch.Tensor:
        """The first ``nb`` blocks of ``kv`` (``[layers, 2, T, kv_heads, head_dim]``) as
        ``[nb, layers, 2, block_tokens, kv_heads, head_dim]`` rows: a strided view, no copy."""
        bt = self.block_tokens
        return kv.detach()[:, :, :nb * bt].unflatten(2, (nb, bt)).permute(2, 0, 1, 3, 4, 5)

    def _put_rows(self, args: dict, kv6: torch.Tensor, whole: Callable[[], torch.Tensor]) -> int:
        """Put the blocks ``kv6`` (rows as from :meth:`_block_rows`): into staged shared slots
        when we can, else as frames of ``whole()`` (the ``[layers, 2, T, ...]`` tensor)."""
        if self._rows:
            done = self._put_shm(args, kv6)
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
        """Record our staged slots (as the sidecar last confirmed them)."""
        self._staged = list(slots)
        self._staged_at = time.monotonic()

    def _put_shm(self, args: dict, kv6: torch.Tensor) -> int | None:
        """Write the rows ``kv6`` into staged slots, then one ``put_shm``; None: send frames
        instead."""
        nb = kv6.shape[0]
        with self._lock:
            # A sidecar that cannot check our liveness reclaims staged slots on the timeout
            # alone: slots staged that long ago may be another block's now, so stage anew.
            if not self._owner_checked and time.monotonic() - self._staged_at > self.lease_timeout_s / 2:
                self._staged, self._stage_claim = [], None
            if len(self._staged) < nb:
                self._stage(nb)
                if len(self._staged) < nb or not self._rows:
                    return None
            slots = self._staged[:nb]
            rows = self._rows[self._stage_seg]

            def copy() -> None:
                for pos, _, slot, k in _runs([(i, 0, s) for i, s in enumerate(slots)]):
                    rows[slot:slot + k].copy_(kv6[pos:pos + k])

            sums = digests_beside(kv6, copy, self._hasher, self._hash_parts)
            try:
                res, _ = self._request("put_shm", {**args, "claim": self._stage_claim, "slots": slots,
                                                   "sums": to_wire(sums), "arena": self._idents})
            except StaleArenaError:
                self._remap()
                return None
            except UnknownLeaseError:
                self._staged, self._stage_claim = [], None  # reclaimed or the sidecar restarted
                return None
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
            result, frames = self._request("get", {**args, "shm": True, "owner": self._owner})
            if result["mode"] == "shm" and result.get("arena") != self._idents:
                self._send_oneway("release", {"claim": result["claim"]})
                self._remap()  # a stale mapping: map the current arenas, then read again
                result, frames = self._request("get", {**args, "shm": bool(self._rows), "owner": self._owner})
            if result["mode"] == "shm":
                try:
                    return self._copy_verified(result, out_device)
                except BlockNotFoundError:
                    raise  # the corrupt blocks were reported with the release
                except BaseException:  # never leave the lease pinned behind a failed copy
                    try:
                        self._send_oneway("release", {"claim": result["claim"]})
                    except Exception:  # it expires on the server anyway
                        pass
                    raise
        else:
            result, frames = self._request("get", args)
        if len(frames) != 1:
            raise ProtocolError(f"get reply carries {len(frames)} payload frames, expected 1")
        kv = tensor_from_frame(frames[0], result["kv"])
        return kv.to(out_device)

    @_with_deadline
    def load_into(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor],
                  block_ids: Any, *, exact: bool | None = None) -> int:
        """``KVStore.load_into`` over the sidecar: block ``i`` of ``tokens``' (whole, fully
        cached) prefix lands in pool block ``block_ids[i]``; the pool layouts and errors are
        the store's. The pool and ids are checked before anything is sent. The blocks are
        first read into a private host buffer (from shared memory, verified against the
        put's checksums as they are copied), so a missing or changed block raises
        ``BlockNotFoundError`` with the pool untouched; then one copy puts them in place (on a
        GPU pool, whole blocks cross by DMA and are laid out on the device). O(bytes): the
        ``get`` plus one copy into the pool."""
        self._check_open()
        arr = tokens_to_array(tokens)
        bt = self.block_tokens
        check_whole_blocks(len(arr), bt)
        nb = len(arr) // bt
        rows, num_blocks = paged.pool_rows(self.layout, bt, pool)
        ids = paged.block_ids(block_ids, nb, num_blocks)
        kv = self.get(arr, device="cpu", exact=exact)  # verified where it is hashed: no round trip to a GPU
        paged.place(self._block_rows(kv, nb), range(nb), rows, ids)
        return len(arr)

    @_with_deadline
    def save_from(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> int:
        """``KVStore.save_from`` over the sidecar: ``put`` of the full blocks of ``tokens``
        whose KV sits in pool blocks ``block_ids`` (one more id, for a partial trailing
        block, is accepted and ignored). Returns the cached prefix length in tokens. The
        blocks are gathered on the pool's device into one buffer (the pool may be reused
        once this returns), which then crosses as ``put`` does: into staged shared slots,
        or as one frame. O(bytes): one gather plus the put's copy."""
        self._check_open()
        arr = tokens_to_array(tokens)
        bt = self.block_tokens
        nb = len(arr) // bt
        rows, num_blocks = paged.pool_rows(self.layout, bt, pool)
        ids = paged.block_ids(block_ids, nb, num_blocks, spare=1 if len(arr) % bt else 0)
        if not nb:
            return 0
        kv6 = paged.take(rows, ids)
        if kv6.device.type != "cpu":
            kv6 = kv6.cpu()
        _, args = self._ns_args(arr[:nb * bt])
        lay = self.layout
        return self._put_rows(args, kv6, lambda: kv6.permute(1, 2, 0, 3, 4, 5).reshape(
            lay.num_layers, 2, nb * bt, lay.num_kv_heads, lay.head_dim))

    def _copy_verified(self, result: dict, device: torch.device) -> torch.Tensor:
        """Copy a lease's blocks out, verify our copy against the reply's checksums, release.

        Raises ``BlockNotFoundError`` (after telling the sidecar, which drops them) when a
        block's bytes changed after they were written. O(bytes)."""
        blocks = result["blocks"]
        nb, bt, lay = len(blocks), self.block_tokens, self.layout
        out = torch.empty(lay.kv_shape(nb * bt), dtype=lay.dtype, device=device)
        out6 = out.view(lay.num_layers, 2, nb, bt, lay.num_kv_heads, lay.head_dim).permute(2, 0, 1, 3, 4, 5)
        want = from_wire(result["sums"], nb)
        # Pipelined: each piece is hashed on the pool while the next one is copied, so the
        # verification adds about one piece's hash to the copy, not a second pass.
        pieces = max(1, min(nb, 4 * self._hash_parts)) if device.type == "cpu" else 1
        bounds = [nb * i // pieces for i in range(pieces + 1)]
        futs = []
        for a, b in zip(bounds, bounds[1:]):
            for pos, seg, slot, k in _runs([(i, blocks[i][0], blocks[i][1]) for i in range(a, b)]):
                out6[pos:pos + k].copy_(self._rows[seg][slot:slot + k])
            futs.append(self._hasher.submit(digests, out6[a:b]) if pieces > 1 else None)
        got = np.concatenate([f.result() for f in futs]) if pieces > 1 else digests(out6)
        bad = [int(i) for i in (got != want).nonzero()[0]]
        if bad:
            try:
                self._request("release", {"claim": result["claim"], "corrupt": bad})
            except RemoteError:  # reclaimed meanwhile: the sidecar finds them on its own reads
                pass
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._teardown()

    def _teardown(self) -> None:
        linger = 0
        if self._stage_claim is not None and self._sock is not None:
            try:  # give our staged slots back now rather than at the lease timeout
                self._sock.send_multipart(request_frames(next(self._ids), "release", {"claim": self._stage_claim},
                                                         1000), flags=zmq.NOBLOCK)
                linger = 200  # long enough for a local sidecar to receive it
            except zmq.ZMQError:
                pass
        self._stage_claim, self._staged = None, []
        self._hasher.shutdown(wait=False)
        self._rows = []
        if self._sock is not None:
            self._sock.setsockopt(zmq.LINGER, linger)
            self._sock.close()
            self._sock = None
        self._ctx.term()

    def __enter__(self) -> "RemoteClient":
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
