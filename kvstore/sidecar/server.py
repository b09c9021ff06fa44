"""The sidecar: one process owns the tiers; engines talk to it over ZeroMQ (docs/architecture.md).

Threads and sockets
-------------------
One *loop* thread owns the ROUTER socket: it reads requests, validates them, answers the
cheap ones itself (``health``; ``lookup`` when the namespace's store lock is free) and
hands every other request to a pool of worker threads, so disk I/O or a large copy never
stalls the socket. ZeroMQ sockets are not thread-safe, so workers do not touch the ROUTER:
each sends its reply over its own ``inproc`` PUSH socket to a PULL socket the loop polls and
forwards to the ROUTER (inproc passes messages by reference: tensor frames stay zero-copy).

Namespaces
----------
One :class:`~kvstore.store.KVStore` per namespace, created by its first ``hello`` with that
client's layout and block size and the server's capacities; a later ``hello`` that
disagrees gets ``layout_mismatch``. Memory tiers on the CPU live in shared memory
(:class:`allocator.shm.ShmArena`) that a client on the same host maps: a ``get`` pins the
blocks and replies with their slots (a *lease*; the client copies, then ``release``s), a
put writes into slots the client holds staged and sends one ``put_shm`` (or, in two round
trips, ``reserve`` -> write -> ``commit``); arena identity and the writers' checksums that
make this safe are :mod:`kvstore.sidecar.shm_plane`'s. CurveZMQ tenants get no shared memory. Leases and
reservations carry an expiry (``lease_timeout_s``). A same-host client names itself by
``(pid, start time)`` (:mod:`kvstore.sidecar.procinfo`); past the expiry the loop reclaims its claims
only once that process is dead, so a live client that stalls mid-copy never writes into slots
handed to another block, and a killed one leaks nothing. Claims of clients that cannot be
checked (another host, no /proc) are reclaimed on the timeout alone.

Security (:mod:`kvstore.sidecar.security`): a non-loopback TCP bind is refused without CurveZMQ
(unless ``insecure_allow_remote``); an ``ipc://`` socket file is made 0600. With CurveZMQ a
ZAP handler admits only allow-listed client keys (refusals are logged and counted) and each
namespace is bound to the key name that created it: other keys get ``forbidden``, and
``stats`` without a namespace lists only the caller's. Limits: message bytes, tokens per
request, in-flight requests per connection (``busy`` beyond it).

Robustness: every request is validated (frames, msgpack, types, version, op, size) and any
failure is an error reply ``{code, message}``; an unexpected exception in a handler is
logged and answered with ``internal``. Nothing a client sends can stop the loop.
SIGTERM/SIGINT (see :mod:`kvstore.cli.serve`) call :meth:`SidecarServer.request_stop`:
the loop stops reading, in-flight work finishes and is answered, stores are closed.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import dataclasses
import itertools
from dataclasses import dataclass
import logging
import os
import secrets
import threading
import time
from typing import Any

import torch
import zmq

from allocator.memory import MemoryArena
from allocator.shm import ShmArena, shm_free_bytes
from kvstore.config import StoreConfig, sidecar_config
from kvstore.errors import BusyError, CapacityError, ConfigError, ForbiddenError, InvalidInputError, NamespaceOwnerError
from kvstore.sidecar import limits
from kvstore.sidecar.procinfo import host_id, owner_from_wire  # host_id: re-exported for compatibility
from kvstore.layout import ModelLayout, as_block_rows, slot_runs
from kvstore.sidecar.protocol import (GIVE_BACK, MAGIC, OPS, VERSION, LayoutMismatchError, MessageTooLargeError, ProtocolError,
                              RemoteError, UnknownLeaseError, UnknownNamespaceError, arg,
                              check_header, error_code, layout_from_wire, parse_request, reply_error, reply_ok,
                              tensor_desc, tensor_frame, tensor_from_frame, tokens_from_wire)
from kvstore.sidecar.security import ZAP_DOMAIN, RefusalLog, ZapHandler, check_bind, handshake_failure, load_allow_dir, load_keys
from kvstore.restore.summary import plan_result  # re-exported: the wire reply of ``plan``
from kvstore.store import KVStore
from kvstore.sidecar import gpu_pool, shm_plane

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """Knobs of the sidecar itself (store capacities come from the ``StoreConfig``)."""

    workers: int = 4
    lease_timeout_s: float = 30.0
    max_message_bytes: int = 1 << 30
    max_namespaces: int = 64
    max_queued: int = 1024
    shm: bool = True
    #: where shared arenas live (a tmpfs); one sidecar per directory. None: a directory of
    #: this sidecar's own under /dev/shm, named after its endpoint
    shm_dir: str | None = None
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    #: tokens one request may name (lookup/get/put/reserve/plan); more is ``invalid_argument``
    max_tokens: int = 1 << 20
    #: requests one connection may have queued or running at once; more is ``busy``
    max_inflight_per_client: int = 64
    #: CurveZMQ: the server's ``.key_secret`` and a directory of allowed client ``.key`` files
    curve_secret: str | None = None
    curve_allow: str | None = None
    #: bind a routable TCP address without CurveZMQ (logs a loud warning)
    insecure_allow_remote: bool = False
    #: slots (blocks) one namespace's tiers may hold in all: bounds the per-slot index state
    max_slots_per_namespace: int = 1 << 20
    #: namespaces one CurveZMQ key may create (without CURVE: max_namespaces bounds them all)
    max_namespaces_per_key: int = 16
    #: open leases + reservations one connection may hold; more is ``busy``
    max_claims_per_client: int = 1024
    #: lookups of up to this many tokens are answered on the loop thread; longer ones (their
    #: hashing is O(tokens)) go to a worker, so they never stall other clients
    loop_lookup_tokens: int = 4096
    #: replies ZeroMQ queues for one connection that does not read them (beyond: dropped);
    #: what such a connection can hold is send_hwm x its largest reply. At least a burst of
    #: pipelined requests (recv_hwm), else replies to a client that does read get dropped.
    send_hwm: int = 1024
    #: requests ZeroMQ queues from one connection before it stops reading from it
    recv_hwm: int = 1024
    #: bytes of large replies (KV as frames) the sidecar holds for peers that have not read
    #: them yet, in all: the bound on what unread replies can cost (see limits.ReplyBudget)
    max_reply_bytes: int = 1 << 30
    #: the same for one connection; a reply over what is left is ``busy``, one larger than
    #: this is ``too_large``
    max_reply_bytes_per_peer: int = 256 << 20


@dataclass(frozen=True)
class Peer:
    """Who sent a request: the ROUTER identity of its connection and, with CurveZMQ, the
    allow-list name of its key. Set by the server under ``args[PEER]`` (a client cannot
    forge it: msgpack cannot carry this type)."""

    ident: bytes
    user: str | None


PEER = "@peer"


@dataclass
class Namespace:
    name: str
    store: KVStore
    layout: ModelLayout
    block_tokens: int
    segments: list[dict]          # shared arenas a client maps, in this order
    seg_of_tier: dict[int, int]   # tier index -> segment index
    put_tier: int | None          # first shared tier: where reservations land
    owner: str | None = None      # CurveZMQ key name that created it (None: no CURVE)


@dataclass
class _Claim:
    """A lease or reservation the server holds for a client, until ``expires``."""

    kind: str  # "lease" | "reservation" | "staging"
    ns: Namespace
    obj: Any
    expires: float
    owner: tuple[int, int] | None = None  # (pid, start time) of a same-host client
    peer: bytes | None = None  # the connection that holds it (for the per-connection cap)


class _Metrics:
    """Prometheus metrics in a registry of this server's own (no process-global state)."""

    def __init__(self, server: "SidecarServer") -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram("kvstore_request_seconds", "request latency by op", ["op"],
                                 registry=self.registry,
                                 buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                                          0.25, 0.5, 1, 2.5, 5, 10))
        self.requests = Counter("kvstore_requests", "requests by op and outcome code", ["op", "code"],
                                registry=self.registry)
        self.registry.register(_StoreCollector(server))
        self._http = None

    def observe(self, op: str, code: str, seconds: float) -> None:
        self.latency.labels(op).observe(seconds)
        self.requests.labels(op, code).inc()

    def serve(self, port: int, addr: str) -> int:
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StoreCollector:
    """Reads every namespace's ``stats()`` at scrape time (no duplicated counters)."""

    def __init__(self, server: "SidecarServer") -> None:
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {name: CounterMetricFamily(f"kvstore_{name}", f"{name} (blocks)", labels=["namespace"])
                    for name in ("hits", "misses", "evictions", "demotions", "promotions", "put_blocks", "get_blocks")}
        used = GaugeMetricFamily("kvstore_tier_used_bytes", "bytes held per tier", labels=["namespace", "tier"])
        cap = GaugeMetricFamily("kvstore_tier_capacity_bytes", "capacity per tier", labels=["namespace", "tier"])
        claims = GaugeMetricFamily("kvstore_open_claims", "leases and reservations held by clients")
        remote = {name: CounterMetricFamily(f"kvstore_remote_{name}", f"remote tier: {name}", labels=["namespace"])
                  for name in ("hit_blocks", "miss_blocks", "written_blocks", "errors", "timeouts",
                               "dropped_unsent_blocks", "refilled_blocks", "wrong_type_blocks", "pool_timeouts",
                               "denied")}
        remote_queued = GaugeMetricFamily("kvstore_remote_queued_blocks", "remote write-behind queue",
                                          labels=["namespace"])
        remote_degraded = GaugeMetricFamily("kvstore_remote_degraded", "1 while a remote shard is failing",
                                            labels=["namespace"])
        server = CounterMetricFamily("kvstore_server_events", "sidecar events by kind (requests, errors, "
                                     "malformed, reclaimed, unauthorised, busy...)", labels=["kind"])
        for name, value in dict(self.server.counters).items():
            server.add_metric([name], value)
        for ns in self.server.namespaces():
            st = ns.store.stats()
            label = self.server.metric_label(ns)
            for name, fam in counters.items():
                fam.add_metric([label], st[name])
            for tier, t in st["tiers"].items():
                used.add_metric([label, tier], t["used_bytes"])
                cap.add_metric([label, tier], t["capacity_bytes"])
            if "remote" in st:
                for name, fam in remote.items():
                    fam.add_metric([label], st["remote"][name])
                remote_queued.add_metric([label], st["remote"]["queued_blocks"])
                remote_degraded.add_metric([label], int(st["remote"]["degraded"]))
        claims.add_metric([], self.server.open_claims())
        yield from counters.values()
        yield used
        yield cap
        yield claims
        yield server
        yield from remote.values()
        yield remote_queued
        yield remote_degraded


class SidecarServer:
    """The sidecar. ``start()`` serves from a background thread (tests, demos);
    ``serve_forever()`` from the calling thread (the ``kvstore serve`` command).

    ``endpoint`` is a ZeroMQ endpoint to bind (``tcp://127.0.0.1:*`` picks a free port;
    :attr:`endpoint` then holds the one bound). ``config`` is the template of every
    namespace's ``StoreConfig`` (its layout, block size and namespace are replaced).
    """

    def __init__(self, endpoint: str, config: StoreConfig | None = None,
                 options: ServerOptions | None = None) -> None:
        self.requested_endpoint = endpoint
        self.endpoint = endpoint
        self.config = sidecar_config(config or StoreConfig())  # no GPU memory unless asked
        self.options = options or ServerOptions()
        self._ctx = zmq.Context()
        self._router: zmq.Socket | None = None
        self._pull: zmq.Socket | None = None
        self._inproc = f"inproc://kvstore-replies-{id(self):x}"
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # (CurveZMQ key name or None, namespace name) -> Namespace: each key has namespaces of
        # its own, so no key can learn (by a ``forbidden`` or a layout error) that another
        # key's name exists
        self._ns: dict[tuple[str | None, str], Namespace] = {}
        self._ns_lock = threading.Lock()
        self._claims: dict[int, _Claim] = {}
        self._claims_lock = threading.Lock()
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.options.workers), thread_name_prefix="kvs-worker")
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._started = time.monotonic()
        self._host = host_id()
        self.counters = {"requests": 0, "errors": 0, "malformed": 0, "reclaimed": 0, "kept_alive": 0,
                         "unauthorised": 0, "busy": 0}
        self._counters_lock = threading.Lock()
        self._inflight: dict[bytes, int] = {}  # connection -> requests queued or running
        self._gpu_pools = gpu_pool.GpuPools()  # engines' CUDA pools opened by CUDA IPC
        self._replies = limits.ReplyBudget(self.options.max_reply_bytes_per_peer, self.options.max_reply_bytes)
        self._zap: ZapHandler | None = None
        self._monitor: zmq.Socket | None = None
        self._refusal_log = RefusalLog(log)
        self.curve = bool(self.options.curve_secret or self.options.curve_allow)
        self.metrics: _Metrics | None = None
        self.metrics_port: int | None = None
        self._handlers: dict[str, Callable[[dict, list], tuple[Any, list]]] = {
            op: getattr(self, f"_op_{op}") for op in OPS}
        self._ipc_lock: limits.InstanceLock | None = None
        self._shm_lock: limits.InstanceLock | None = None
        self.shm_dir: str | None = None
        self._claims_of: dict[bytes, int] = {}  # connection -> open claims (under _claims_lock)
        self._reaper: threading.Thread | None = None
        #: opaque per-server key: metrics label a CurveZMQ tenant's namespace by a digest, not its name
        self._label_key = secrets.token_bytes(16)

    # -- lifecycle ---------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the sockets (idempotent); returns the endpoint bound."""
        if self._router is not None:
            return self.endpoint
        opts = self.options
        problems = limits.option_problems(opts)
        if problems:
            raise ConfigError("; ".join(problems), problems)
        check_bind(self.requested_endpoint, self.curve, opts.insecure_allow_remote)
        # One sidecar per ipc path: libzmq would unlink a live sidecar's socket and take over.
        self._ipc_lock = limits.lock_ipc_endpoint(self.requested_endpoint)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 2000)
        if self.curve:
            try:
                self._enable_curve(router)
            except BaseException:
                self._close_security()
                router.close(0)
                self._release_locks()
                raise
        # Bounded queues: replies a peer does not read are dropped past SNDHWM (the server
        # does not grow by them); a peer that floods requests is no longer read past RCVHWM.
        router.setsockopt(zmq.SNDHWM, max(1, opts.send_hwm))
        router.setsockopt(zmq.RCVHWM, max(1, opts.recv_hwm))
        # ZeroMQ checks a frame's announced size before buffering it: a frame over twice the
        # limit drops the peer unread; between the two the client gets a ``too_large`` reply.
        router.setsockopt(zmq.MAXMSGSIZE, opts.max_message_bytes * 2 + (64 << 10))
        try:
            router.bind(self.requested_endpoint)
        except zmq.ZMQError as exc:
            self._close_security()
            router.close(0)
            self._release_locks()
            raise OSError(f"cannot bind {self.requested_endpoint}: {exc}") from None
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.endpoint.startswith("ipc://"):
            # Only this user may connect (the socket file's mode is the access control of ipc).
            # libzmq creates it with the umask's mode; tightened at once, before the loop serves.
            os.chmod(self.endpoint[len("ipc://"):], 0o600)
        if opts.shm:
            self.shm_dir = opts.shm_dir or limits.default_shm_dir(self.endpoint)
            try:
                self._shm_lock = limits.lock_shm_dir(self.shm_dir)
            except BaseException:
                self._close_security()
                router.close(0)
                self._release_locks()
                raise
            limits.sweep_dir(self.shm_dir)  # ours now: anything left is a dead sidecar's
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self._inproc)
        self._router, self._pull = router, pull
        if self.options.metrics_port is not None:
            self.metrics = _Metrics(self)
            self.metrics_port = self.metrics.serve(self.options.metrics_port, self.options.metrics_addr)
            log.info("metrics on http://%s:%d/metrics", self.options.metrics_addr, self.metrics_port)
        else:
            self.metrics = None
        return self.endpoint

    def _release_locks(self) -> None:
        for name in ("_shm_lock", "_ipc_lock"):
            lock = getattr(self, name)
            if lock is not None:
                lock.release()
                setattr(self, name, None)

    def start(self) -> "SidecarServer":
        self.bind()
        self._thread = threading.Thread(target=self._loop, name="kvs-loop", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.bind()
        self._loop()

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("sidecar loop did not stop within %.1f s", timeout)
        elif self._router is not None and not self._stopped.is_set():
            self._shutdown()

    def __enter__(self) -> "SidecarServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _enable_curve(self, router: zmq.Socket) -> None:
        """Make ``router`` a CURVE server whose handshakes our ZAP handler admits."""
        opts = self.options
        keys = load_keys(opts.curve_secret)
        if keys.secret is None:
            raise ConfigError(f"{opts.curve_secret} holds no secret-key (pass the .key_secret file)")
        allowed = load_allow_dir(opts.curve_allow)
        self._zap = ZapHandler(self._ctx, allowed, self._count_refusal)
        router.curve_server = True
        router.curve_publickey = keys.public
        router.curve_secretkey = keys.secret
        router.zap_domain = ZAP_DOMAIN
        self._monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        log.info("CurveZMQ on: %d allowed client key(s) from %s", len(allowed), opts.curve_allow)

    def _close_security(self) -> None:
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None
        if self._zap is not None:
            self._zap.close()
            self._zap = None

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += n

    def _count_refusal(self, reason: str) -> None:
        self._count("unauthorised")

    def _on_monitor(self) -> None:
        """Count and log handshakes that failed before ZAP (no CURVE, wrong server key)."""
        from zmq.utils.monitor import recv_monitor_message

        assert self._monitor is not None
        for _ in range(256):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            reason = handshake_failure(event["event"])
            if reason is not None:
                self._count("unauthorised")
                self._refusal_log(event.get("endpoint", b"?").decode(errors="replace"), reason)

    def metric_label(self, ns: Namespace) -> str:
        """A namespace's name in metrics: as is without CurveZMQ (one tenant); with it an
        opaque digest (keyed by this server's secret), so whoever scrapes the endpoint learns
        no tenant's names. The server log maps digests to names."""
        if not self.curve:
            return ns.name
        import hashlib

        return "ns-" + hashlib.blake2b(f"{ns.owner}\x00{ns.name}".encode(), key=self._label_key,
                                       digest_size=6).hexdigest()

    def namespaces(self) -> list[Namespace]:
        with self._ns_lock:
            return list(self._ns.values())

    def open_claims(self, kinds: tuple[str, ...] | None = None) -> int:
        """Open claims (``kinds``: only those, e.g. ``("lease", "reservation")`` without the
        clients' staged spare slots). O(claims) with ``kinds``, else O(1)."""
        with self._claims_lock:
            if kinds is None:
                return len(self._claims)
            return sum(1 for c in self._claims.values() if c.kind in kinds)

    # -- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        router, pull = self._router, self._pull
        assert router is not None and pull is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        self._reaper = threading.Thread(target=self._reap_forever, name="kvs-reaper", daemon=True)
        self._reaper.start()
        log.info("sidecar serving on %s (protocol v%d, %d workers)", self.endpoint, VERSION, self.options.workers)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                self._replies.sweep()
                if pull in events:
                    self._forward_replies()
                if self._monitor is not None and self._monitor in events:
                    self._on_monitor()
                if router in events:
                    # Bounded batch, then look at replies again. ZMQ_EVENTS says whether another
                    # message waits (cheaper than a receive that raises zmq.Again).
                    for _ in range(256):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_request(frames)
                        if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                            break
        finally:
            self._shutdown()

    def _forward_replies(self) -> None:
        assert self._pull is not None and self._router is not None
        while True:
            try:
                msg = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._router.send_multipart(msg, copy=False)
            if not self._pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return

    def _shutdown(self) -> None:
        if self._stopped.is_set():
            return
        log.info("sidecar stopping: finishing in-flight requests")
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(30)
        self._pool.shutdown(wait=True)
        if self._pull is not None:
            self._forward_replies()
        with self._claims_lock:
            claims = list(self._claims.values())
            self._claims.clear()
            self._claims_of.clear()
        for c in claims:
            self._drop_claim(c)
        self._gpu_pools.clear()
        # concurrently: each store's remote write-behind queue drains within its own grace
        # period (remote_drain_s), not one namespace after another
        closers = [threading.Thread(target=ns.store.close, name=f"kvs-close-{i}")
                   for i, ns in enumerate(self.namespaces())]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        with self._push_lock:
            for s in self._push_sockets:
                s.close(0)
        if self._pull is not None:
            self._pull.close(0)
        if self._router is not None and self._monitor is not None:
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
        if self._router is not None:
            self._router.close(2000)  # let the last replies go out
        if self.metrics is not None:
            self.metrics.close()
        self._close_security()
        self._ctx.term()
        if self._shm_lock is not None and self.options.shm_dir is None and self.shm_dir is not None:
            self._shm_lock.remove_dir()  # our own default directory: nothing of it outlives us
        self._release_locks()
        self._stopped.set()
        log.info("sidecar stopped")

    def _send_from_worker(self, msg: list, track: bool = False) -> Any:
        """Hand a reply to the loop (which forwards it to the peer); with ``track`` returns
        the send's ``MessageTracker`` (done once ZeroMQ let go of the zero-copy frames)."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._inproc)
            self._local.push = sock
            with self._push_lock:
                self._push_sockets.append(sock)
        if not track:
            sock.send_multipart(msg, copy=False)
            return None
        for part in msg[:-1]:  # only a frame we made can be tracked: the last (the payload)
            sock.send(part, zmq.SNDMORE, copy=False)
        return sock.send(msg[-1], copy=False, track=True)

    def _on_request(self, frames: list) -> None:
        """Validate one request and answer it here or hand it to a worker. Never raises."""
        assert self._router is not None
        ident, body = frames[0], frames[1:]
        received = time.monotonic()
        rid = None
        op = "?"
        self.counters["requests"] += 1
        try:
            size = sum(len(f) for f in body)
            if size > self.options.max_message_bytes:
                raise MessageTooLargeError(f"message of {size} bytes exceeds the server's limit of "
                                           f"{self.options.max_message_bytes}")
            header, payload = parse_request(body)
            rid = header.get("id") if isinstance(header.get("id"), (int, str)) else None
            op, args, deadline = check_header(header)
            user = None
            if self.curve:
                try:
                    user = body[0].get("User-Id") or None
                except zmq.ZMQError:  # pragma: no cover - CURVE always sets it
                    user = None
            ident_bytes = bytes(ident)
            args[PEER] = Peer(ident_bytes, user)
            if op == "lookup":
                ns = self._namespace(args)
                tokens = self._tokens(args)
                exact = arg(args, "exact", bool, required=False)
                n = ns.store.port.lookup_nowait(tokens, exact=exact) if len(tokens) <= self.options.loop_lookup_tokens \
                    else None
                if n is not None:
                    self._no_payload(op, payload)
                    self._router.send_multipart([ident, *reply_ok(rid, n)], copy=False)
                    self._observe(op, "ok", received)
                    return
            if op == "health":
                self._router.send_multipart([ident, *self._run(op, args, payload, rid, received, None)], copy=False)
                return
            give_back = op in GIVE_BACK
            with self._queued_lock:
                # give-backs have a reserve of their own (still bounded: twice max_queued)
                if self._queued >= self.options.max_queued * (2 if give_back else 1):
                    raise BusyError(f"server busy: {self._queued} requests queued")
                mine = self._inflight.get(ident_bytes, 0)
                if mine >= self.options.max_inflight_per_client and not give_back:
                    raise BusyError(f"this connection has {mine} requests in flight, the limit is "
                                    f"{self.options.max_inflight_per_client}; wait for replies")
                self._queued += 1
                self._inflight[ident_bytes] = mine + 1
            self._pool.submit(self._work, ident, op, args, payload, rid, received, deadline)
        except Exception as exc:
            code = error_code(exc)
            if code in ("bad_frame", "bad_version", "unknown_op", "too_large"):
                self.counters["malformed"] += 1
                log.warning("malformed request answered with %s: %s", code, exc)
            elif code == "busy":
                self._count("busy")
            if code == "internal":
                log.exception("unexpected error while reading a request")
            self.counters["errors"] += 1
            self._observe(op if op in OPS else "invalid", code, received)
            try:
                self._router.send_multipart([ident, *reply_error(rid, code, str(exc))])
            except zmq.ZMQError as send_exc:  # the peer is gone; nothing to answer
                log.debug("could not send an error reply: %s", send_exc)

    def _work(self, ident, op, args, payload, rid, received, deadline) -> None:
        with self._queued_lock:
            self._queued -= 1
        try:
            reply = self._run(op, args, payload, rid, received, deadline)
        finally:
            key = args[PEER].ident
            with self._queued_lock:  # decremented before the reply leaves: the client may send again
                left = self._inflight.get(key, 1) - 1
                if left > 0:
                    self._inflight[key] = left
                else:
                    self._inflight.pop(key, None)
        grant, self._local.grant = getattr(self._local, "grant", None), None
        tracker = None
        try:
            tracker = self._send_from_worker([ident, *reply], track=grant is not None)
        except Exception:  # pragma: no cover - sending may fail on shutdown
            log.exception("worker failed to answer %s", op)
        finally:
            if grant is not None:
                self._replies.track(tracker, *grant)

    def _run(self, op: str, args: dict, payload: list, rid: Any, received: float, deadline: float | None) -> list:
        """Run one handler and build its reply frames; every exception becomes an error reply."""
        code = "ok"
        try:
            if deadline is not None and time.monotonic() - received > deadline and op not in GIVE_BACK:
                raise RemoteError(f"{op} waited {time.monotonic() - received:.3f} s in the queue, past its "
                                  f"deadline of {deadline:.3f} s", "deadline_exceeded")
            result, out = self._handlers[op](args, payload)
            return reply_ok(rid, result, out)
        except Exception as exc:
            code = error_code(exc)
            if code == "internal":
                log.exception("%s failed", op)
            self.counters["errors"] += 1
            return reply_error(rid, code, str(exc) or type(exc).__name__)
        finally:
            self._observe(op, code, received)

    def _observe(self, op: str, code: str, received: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(op, code, time.monotonic() - received)

    # -- claims (leases and reservations) ----------------------------------------------
    def _add_claim(self, kind: str, ns: Namespace, obj: Any, args: dict) -> int:
        """Record a claim; past ``max_claims_per_client`` for its connection the claim is
        dropped at once and the client gets ``busy``."""
        # Random, not sequential: a claim id is a capability (whoever names it may commit or
        # release it), so another client must not be able to guess one.
        cid = secrets.randbits(62) or 1
        owner = owner_from_wire(args.get("owner"), self._host)
        peer = args.get(PEER)
        ident = peer.ident if isinstance(peer, Peer) else None
        claim = _Claim(kind, ns, obj, time.monotonic() + self.options.lease_timeout_s, owner, ident)
        with self._claims_lock:
            if kind == "staging":  # bounded by the tier's spare slots, not by the per-connection cap
                self._claims[cid] = claim
                return cid
            held = self._claims_of.get(ident, 0)
            if held < self.options.max_claims_per_client:
                self._claims[cid] = claim
                self._claims_of[ident] = held + 1
                return cid
        self._drop_claim(claim)
        raise BusyError(f"this connection holds {held} leases/reservations, the limit is "
                        f"{self.options.max_claims_per_client}; release or commit them first")

    def _forget_claim(self, cid: int) -> _Claim | None:
        """Remove a claim from the books (caller holds ``_claims_lock``)."""
        claim = self._claims.pop(cid, None)
        if claim is not None and claim.kind != "staging":
            left = self._claims_of.get(claim.peer, 1) - 1
            if left > 0:
                self._claims_of[claim.peer] = left
            else:
                self._claims_of.pop(claim.peer, None)
        return claim

    def _take_claim(self, args: dict, kind: str | None = None) -> _Claim:
        cid = arg(args, "claim", int)
        with self._claims_lock:
            claim = self._claims.get(cid)
            if claim is None or (kind is not None and claim.kind != kind):
                raise UnknownLeaseError(f"no open {kind or 'lease or reservation'} {cid} (expired and reclaimed, "
                                        "or never granted)")
            self._check_owner(claim.ns, args)
            self._forget_claim(cid)
        return claim

    @staticmethod
    def _drop_claim(claim: _Claim) -> None:
        if claim.kind == "lease":
            claim.ns.store.port.release(claim.obj)
        elif claim.kind == "staging":
            shm_plane.drop_staging(claim.ns, claim.obj)
        else:
            claim.ns.store.port.abort(claim.obj)

    def _staging_claim(self, cid: Any, ns: Namespace, args: dict) -> _Claim | None:
        """The open staging claim ``cid`` of ``ns`` (its expiry pushed back), or None."""
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise InvalidInputError("claim must be an int")
        with self._claims_lock:
            claim = self._claims.get(cid)
            if claim is None or claim.kind != "staging" or claim.ns is not ns:
                return None
            claim.expires = time.monotonic() + self.options.lease_timeout_s
            return claim

    def _reap_forever(self) -> None:
        """The reaper thread: one pass every quarter lease timeout (at most 1 s), off the loop
        thread, so /proc reads and unpinning never delay a request."""
        every = max(0.05, min(1.0, self.options.lease_timeout_s / 4))
        while not self._stop.wait(every):
            try:
                self._reap(time.monotonic())
                if len(self._gpu_pools):
                    self._gpu_pools.reap()
            except Exception:  # pragma: no cover - keep reaping whatever one pass hit
                log.exception("claim reaper pass failed")

    def _reap(self, now: float) -> None:
        """Reclaim expired claims, except reservations whose owner is alive and maps this
        namespace's arenas (it may still be writing into its slots: they stay its own).

        Leases expire on the timeout alone: a client that reads after its lease was reclaimed
        learns it at ``release`` (``unknown_lease``) and fetches the bytes again, so a lease
        orphaned by a retried or failed ``get`` never pins blocks for good. An owner that
        names another process (pid 1...) does not map our arenas, so its claims expire too.
        O(open claims) per pass plus one /proc read per distinct owner.
        """
        with self._claims_lock:
            expired = [(cid, c) for cid, c in self._claims.items() if c.expires <= now]
        dead, kept = [], 0
        check = limits.OwnerCheck()
        for cid, c in expired:
            if (c.kind in ("reservation", "staging") and c.owner is not None
                    and check.keeps(c.owner, {seg.get("path") for seg in c.ns.segments})):
                c.expires = now + self.options.lease_timeout_s  # alive, just slow: its slots stay its own
                kept += 1
            else:
                dead.append(cid)
        if kept:
            self._count("kept_alive", kept)
            log.info("kept %d expired lease(s)/reservation(s) of clients that are alive but slow", kept)
        with self._claims_lock:
            claims = [c for c in map(self._forget_claim, dead) if c is not None]
        if not claims:
            return
        for c in claims:
            try:
                self._drop_claim(c)
            except Exception:
                log.exception("could not reclaim a %s", c.kind)
        self._count("reclaimed", len(claims))
        log.warning("reclaimed %d lease(s)/reservation(s) after %.1f s (leases on the timeout; reservations "
                    "of clients that died, cannot be checked, or do not map the arenas)",
                    len(claims), self.options.lease_timeout_s)

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _user(args: dict) -> str | None:
        peer = args.get(PEER)
        return peer.user if isinstance(peer, Peer) else None

    def _namespace(self, args: dict) -> Namespace:
        name = arg(args, "ns", str)
        with self._ns_lock:
            ns = self._ns.get((self._user(args), name))
        if ns is None:
            raise UnknownNamespaceError(f"namespace {name[:100]!r} is unknown to this sidecar (say hello first; "
                                        "it may have restarted)")
        self._check_owner(ns, args)
        return ns

    @staticmethod
    def _check_owner(ns: Namespace, args: dict) -> None:
        """With CurveZMQ a namespace is its creator's: another key may not touch it."""
        peer = args.get(PEER)
        user = peer.user if isinstance(peer, Peer) else None
        if ns.owner is not None and user != ns.owner:
            raise ForbiddenError(f"namespace {ns.name[:100]!r} belongs to another client key")

    @staticmethod
    def _no_payload(op: str, payload: list) -> None:
        if payload:
            raise ProtocolError(f"{op} takes no payload frames, got {len(payload)}")

    def _tokens(self, args: dict):
        raw = arg(args, "tokens", (bytes, list))
        n = len(raw) // 4 if isinstance(raw, bytes) else len(raw)
        if n > self.options.max_tokens:
            raise InvalidInputError(f"{n} tokens in one request exceeds the server's limit of "
                                    f"{self.options.max_tokens}")
        return tokens_from_wire(raw)

    def _arena_factory(self, ns_name: str, made: list):
        """Shared arenas for a namespace's memory tiers; each one made is appended to ``made``
        so a namespace that fails to open can unlink them."""
        opts = self.options
        shm_dir = self.shm_dir
        # CurveZMQ tenants never share mappable memory: ZeroMQ cannot pass a file descriptor
        # to the authenticated peer alone, and any process of our uid can open a file in
        # /dev/shm whatever its name -- so their tiers stay private memory (KV as frames).
        shared = opts.shm and not self.curve and shm_dir is not None

        def factory(tier: str, num_slots: int, slot_bytes: int, device: torch.device):
            if not shared or device.type != "cpu" or num_slots == 0:
                return None
            need = (num_slots + (shm_plane.spare_slots(num_slots) if not made else 0)) * slot_bytes
            try:
                free = shm_free_bytes(shm_dir)
            except OSError:
                free = 0
            if free < need:
                log.warning("namespace %s: %s tier (%d bytes) does not fit in %s (%d free); "
                            "it stays private memory (no shared-memory data plane for it)",
                            ns_name, tier, need, shm_dir, free)
                return None
            # The first shared tier takes the puts: it gets spare slots beyond its capacity
            # that clients hold staged (shm_plane), so staging never shrinks the cache.
            spare = shm_plane.spare_slots(num_slots) if not made else 0
            arena = ShmArena(num_slots + spare, slot_bytes, directory=shm_dir, prefix="kvstore")
            made.append(arena)
            return arena

        return factory

    def _create_namespace(self, name: str, layout: ModelLayout, block_tokens: int,
                          owner: str | None = None) -> Namespace:
        cfg = dataclasses.replace(self.config, layout=layout, block_tokens=block_tokens, namespace=name)
        limits.check_slots(name, {t: getattr(cfg, f"{t}_bytes") for t in ("device", "host", "disk")},
                           layout.kv_block_bytes(block_tokens), self.options.max_slots_per_namespace)
        made: list = []
        try:
            store = KVStore(cfg, arena_factory=self._arena_factory(name, made), owner=owner)
        except BaseException:
            for arena in made:  # a namespace that fails to open leaves no shared memory behind
                try:
                    arena.close()
                except Exception:  # pragma: no cover - best effort, keep the first error
                    log.exception("could not unlink a shared arena of a failed namespace")
            raise
        segments, seg_of_tier = [], {}
        for t, (tier, arena) in enumerate(store.port.tier_arenas()):
            if isinstance(arena, ShmArena):
                seg_of_tier[t] = len(segments)
                segments.append({"tier": tier, **arena.describe()})
        put_tier = min(seg_of_tier) if seg_of_tier else None
        created = Namespace(name, store, layout, block_tokens, segments, seg_of_tier, put_tier, owner)
        log.info("namespace %r created: layout %s, block_tokens=%d, block %d bytes, tiers %s, shared %s",
                 name, layout.to_dict(), block_tokens, store.block_bytes,
                 [t for t, _ in store.port.tier_arenas()], [s["tier"] for s in segments])
        return created

    # -- ops: each returns (result, payload frames) --------------------------------------
    def _op_hello(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("hello", payload)
        name = arg(args, "ns", str)
        if not name or len(name) > 256:
            raise InvalidInputError("namespace must be a non-empty string of at most 256 characters")
        layout = layout_from_wire(arg(args, "layout", dict))
        bt = arg(args, "block_tokens", int)
        if bt <= 0:
            raise InvalidInputError(f"block_tokens must be a positive int, got {bt}")
        user = self._user(args)
        with self._ns_lock:
            ns = self._ns.get((user, name))
            if ns is None:
                if len(self._ns) >= self.options.max_namespaces:
                    raise CapacityError(f"this sidecar serves at most {self.options.max_namespaces} namespaces")
                mine = sum(1 for owner, _ in self._ns if owner == user)
                if self.curve and mine >= self.options.max_namespaces_per_key:
                    raise CapacityError(f"this client key has {mine} namespaces, the limit per key is "
                                        f"{self.options.max_namespaces_per_key}")
                try:
                    ns = self._create_namespace(name, layout, bt, user)
                except NamespaceOwnerError as exc:  # a slab on disk recorded for another key
                    raise ForbiddenError(str(exc)) from None
                self._ns[(user, name)] = ns
                if self.curve:
                    log.info("namespace %r of key %r is %s in metrics", name, user, self.metric_label(ns))
            self._check_owner(ns, args)
            if ns.layout != layout or ns.block_tokens != bt:
                log.warning("client pid=%s refused from namespace %r: layout/block_tokens disagree",
                            args.get("pid"), name)
                raise LayoutMismatchError(
                    f"namespace {name!r} is fixed to layout {ns.layout.to_dict()} with block_tokens="
                    f"{ns.block_tokens} by its first client; this client has {layout.to_dict()} with "
                    f"block_tokens={bt}. Use another namespace for another model.")
        log.info("client pid=%s host=%s joined namespace %r", args.get("pid"), str(args.get("host", "?"))[:64], name)
        return {"server_version": VERSION, "capabilities": list(OPS), "ns": name,
                "layout": ns.layout.to_dict(), "block_tokens": ns.block_tokens,
                "block_bytes": ns.store.block_bytes,
                "shm": {"host": self._host, "segments": ns.segments} if ns.segments else None,
                "lease_timeout_s": self.options.lease_timeout_s,
                "max_message_bytes": self.options.max_message_bytes, "max_tokens": self.options.max_tokens,
                "max_inflight": self.options.max_inflight_per_client,
                # claims of a live same-host client are never reclaimed under it
                "owner_checked": owner_from_wire(args.get("owner"), self._host) is not None}, []

    def _op_health(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("health", payload)
        mine = self._visible(args)
        return {"status": "ok", "version": VERSION, "endpoint": self.endpoint,
                "uptime_s": time.monotonic() - self._started, "namespaces": len(mine),
                "open_claims": self._open_claims_in(mine), "queued": self._queued if not self.curve else None}, []

    def _visible(self, args: dict) -> list[Namespace]:
        """The namespaces the caller may see: with CurveZMQ its key's own, else all."""
        user = self._user(args)
        return [ns for ns in self.namespaces() if ns.owner == user]

    def _open_claims_in(self, namespaces: list[Namespace]) -> int:
        ids = {id(ns) for ns in namespaces}
        with self._claims_lock:
            return sum(1 for c in self._claims.values() if id(c.ns) in ids)

    def _op_lookup(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("lookup", payload)
        ns = self._namespace(args)
        return ns.store.lookup(self._tokens(args), exact=arg(args, "exact", bool, required=False)), []

    def _op_put(self, args: dict, payload: list) -> tuple[Any, list]:
        ns = self._namespace(args)
        tokens = self._tokens(args)
        want = 2 if args.get("act") is not None else 1
        if len(payload) != want:
            raise ProtocolError(f"put takes {want} payload frame(s) (the KV{', then the activations' if want == 2 else ''}), "
                                f"got {len(payload)}")
        kv = tensor_from_frame(payload[0], arg(args, "kv", dict))
        act = tensor_from_frame(payload[1], arg(args, "act", dict)) if want == 2 else None
        return ns.store.put(tokens, kv, activations=act), []

    def _op_get(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("get", payload)
        ns = self._namespace(args)
        tokens = self._tokens(args)
        exact = arg(args, "exact", bool, required=False)  # None: the namespace's lossy_ok decides
        if arg(args, "shm", bool, required=False, default=False) and ns.seg_of_tier:
            lease = ns.store.port.acquire(tokens, list(ns.seg_of_tier), exact=exact)
            if lease is not None:
                cid = self._add_claim("lease", ns, lease, args)
                return shm_plane.lease_reply(ns, cid, lease), []
        # The reply's bytes count against the reply budget until ZeroMQ lets go of them
        # (reserved before the tensor is built: a peer over its budget costs nothing).
        peer = args[PEER].ident
        nbytes = (len(tokens) // ns.block_tokens) * ns.block_tokens * ns.layout.kv_bytes_per_token
        self._replies.reserve(peer, nbytes)
        try:
            kv = self._get_one_copy(ns, tokens, exact)
        except BaseException:
            self._replies.release(peer, nbytes)
            raise
        self._local.grant = (peer, nbytes)
        return {"mode": "frames", "kv": tensor_desc(kv)}, [tensor_frame(kv)]

    @staticmethod
    def _get_one_copy(ns: Namespace, tokens: Any, exact: bool | None = None) -> torch.Tensor:
        """``store.get`` with one copy when every block is in a memory tier: pin the blocks,
        copy each run of consecutive slots straight into its place in the result, unpin.
        Blocks on disk (or a miss) take ``store.get``'s path (two copies, counts the miss)."""
        store = ns.store
        memory = [t for t, (_, arena) in enumerate(store.port.tier_arenas()) if isinstance(arena, MemoryArena)]
        lease = store.port.acquire(tokens, memory, exact=exact) if memory else None
        if lease is None:
            return store.get(tokens, device="cpu", exact=exact).contiguous()
        try:
            lay, bt, nb = store.layout, store.block_tokens, len(lease.blocks)
            block_shape = lay.block_shape(bt)
            out = limits.reply_buffer(lay.kv_bytes_per_token * nb * bt).view(lay.dtype).view(lay.kv_shape(nb * bt))
            out6 = as_block_rows(out, bt, nb)
            arenas = store.port.tier_arenas()
            for t, in_tier in itertools.groupby(enumerate(lease.blocks), key=lambda e: e[1][0]):
                pos, slots = zip(*((p, slot) for p, (_, slot) in in_tier))
                rows = arenas[t][1].rows(lay.dtype, block_shape)
                for i0, i1 in slot_runs(slots):
                    out6[pos[i0]:pos[i0] + i1 - i0].copy_(rows[slots[i0]:slots[i0] + i1 - i0])
            if shm_plane.copy_is_intact(store, lease, out6):
                return out
        finally:
            store.port.release(lease)
        # A shared slot changed after it was written: read again through the store, which
        # verifies each block, drops the corrupt ones and reports them missing.
        return store.get(tokens, device="cpu", exact=exact).contiguous()

    def _op_release(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("release", payload)
        claim = self._take_claim(args)
        try:
            dropped = shm_plane.release_corrupt(claim.ns, claim.obj, args) if claim.kind == "lease" else 0
        finally:
            self._drop_claim(claim)
        return True if not dropped else {"corrupt_dropped": dropped}, []

    def _op_reserve(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("reserve", payload)
        ns = self._namespace(args)
        tokens = self._tokens(args)
        if ns.put_tier is None:
            return {"mode": "frames"}, []
        res = ns.store.port.reserve(tokens, ns.put_tier)
        if res is None:
            return {"mode": "frames"}, []
        if res.done:
            return {"mode": "done", "tokens": res.cached}, []
        cid = self._add_claim("reservation", ns, res, args)
        seg = ns.seg_of_tier[res.tier]
        return {"mode": "shm", "claim": cid, **shm_plane.reserve_extra(ns),
                "blocks": [[pos, seg, slot] for pos, slot in zip(res.positions, res.slots)]}, []

    def _op_commit(self, args: dict, payload: list) -> tuple[Any, list]:
        """``commit {claim, sums, arena}``: ``sums`` are the writer's checksums of the
        reserved slots (from its own source); without them the commit is refused."""
        self._no_payload("commit", payload)
        claim = self._take_claim(args, "reservation")
        try:
            shm_plane.check_arena(claim.ns, args)
            sums = shm_plane.sums_arg(args, len(claim.obj.slots))
        except BaseException:
            self._drop_claim(claim)
            raise
        return claim.ns.store.port.commit(claim.obj, sums), []

    def _op_stage(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("stage", payload)
        return shm_plane.op_stage(self, args), []

    def _op_put_shm(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("put_shm", payload)
        return shm_plane.op_put_shm(self, args), []

    def _op_plan(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("plan", payload)
        ns = self._namespace(args)
        return plan_result(ns.store, self._tokens(args), arg(args, "profile", dict, required=False)), []

    def _op_stats(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("stats", payload)
        visible = self._visible(args)
        server = {"endpoint": self.endpoint, "version": VERSION, "uptime_s": time.monotonic() - self._started,
                  "open_claims": self._open_claims_in(visible), "replies": self._replies.stats()}
        if not self.curve:  # one tenant: the server-wide counters are its own
            with self._counters_lock:
                server.update(self.counters)
        if args.get("ns") is not None:
            return {"server": server, "namespace": self._namespace(args).store.stats()}, []
        return {"server": server, "namespaces": {ns.name: ns.store.stats() for ns in visible}}, []

    def _op_register_pool(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("register_pool", payload)
        return gpu_pool.op_register_pool(self, args), []

    def _op_load_pool(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("load_pool", payload)
        return gpu_pool.op_load_pool(self, args), []

    def _op_save_pool(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("save_pool", payload)
        return gpu_pool.op_save_pool(self, args), []

    def _op_unregister_pool(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("unregister_pool", payload)
        return gpu_pool.op_unregister_pool(self, args), []

    def _op_clear(self, args: dict, payload: list) -> tuple[Any, list]:
        self._no_payload("clear", payload)
        return self._namespace(args).store.clear(), []


__all__ = ["SidecarServer", "ServerOptions", "plan_result", "host_id", "MAGIC"]
