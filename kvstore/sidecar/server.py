"""The sidecar: one process owns the tiers; engines talk to it over ZeroMQ (docs/architecture.md).

This module is the sidecar's bind and loop; the rest of the sidecar is in rooms of its own,
none of which imports this one:

* :mod:`~kvstore.sidecar.dispatch`: the op table (op name -> handler), written out;
* :mod:`~kvstore.sidecar.session_ops`, :mod:`~kvstore.sidecar.store_ops`,
  :mod:`~kvstore.sidecar.shm_plane`, :mod:`~kvstore.sidecar.gpu_pool`: the handlers, by
  what they serve, each seeing the sidecar through a :class:`~kvstore.sidecar.context.Context`;
* :mod:`~kvstore.sidecar.namespaces`: one store per namespace, its shared arenas, ``hello``;
* :mod:`~kvstore.sidecar.claims`: leases, reservations, staged slots, GPU pools and the reaper;
* :mod:`~kvstore.sidecar.metrics`: counters and the Prometheus endpoint;
* :mod:`~kvstore.sidecar.options`: :class:`ServerOptions`.

Threads and sockets
-------------------
One *loop* thread owns the ROUTER socket: it reads requests, validates them, answers the
cheap ones itself (``health``; ``lookup``, and a ``get`` over shared memory -- a lease, O(blocks)
bookkeeping -- when the namespace's store lock is free right now) and
hands every other request to a pool of worker threads, so disk I/O or a large copy never
stalls the socket. ZeroMQ sockets are not thread-safe, so workers do not touch the ROUTER:
each sends its reply over its own ``inproc`` PUSH socket to a PULL socket the loop polls and
forwards to the ROUTER (inproc passes messages by reference: tensor frames stay zero-copy).
A *reaper* thread reclaims expired claims (:meth:`ClaimBook.reap_forever`).

Security (:mod:`kvstore.sidecar.security`): a non-loopback TCP bind is refused without CurveZMQ
(unless ``insecure_allow_remote``); an ``ipc://`` socket file is made 0600. With CurveZMQ a
ZAP handler admits only allow-listed client keys (refusals are logged and counted) and each
namespace is bound to the key name that created it: other keys get ``forbidden``, and
``stats`` without a namespace lists only the caller's. Limits: message bytes, tokens per
request, in-flight requests per connection (``busy`` beyond it). Give-backs
(``GIVE_BACK``: release, unregister_pool) run however late and however busy.

Robustness: every request is validated (frames, msgpack, types, version, op, size) and any
failure is an error reply ``{code, message}``; an unexpected exception in a handler is
logged and answered with ``internal``. Nothing a client sends can stop the loop.
SIGTERM/SIGINT (see :mod:`kvstore.cli.serve`) call :meth:`SidecarServer.request_stop`:
the loop stops reading, in-flight work finishes and is answered, stores are closed.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import logging
import os
import threading
import time
from typing import Any

import zmq

from kvstore.config import StoreConfig, sidecar_config
from kvstore.errors import BusyError, ConfigError, ForbiddenError  # ForbiddenError: re-exported
from kvstore.restore.summary import plan_result  # re-exported: the wire reply of ``plan``
from kvstore.sidecar import dispatch, limits
from kvstore.sidecar.claims import ClaimBook, GpuPools
from kvstore.sidecar.context import Context, no_payload
from kvstore.sidecar.metrics import Counters, Metrics, observe
from kvstore.sidecar.namespaces import PEER, Namespace, NamespaceBook, Peer
from kvstore.sidecar.options import ServerOptions
from kvstore.sidecar.procinfo import host_id  # host_id: re-exported for compatibility
from kvstore.sidecar.protocol import (GIVE_BACK, MAGIC, OPS, VERSION, MessageTooLargeError, SidecarError, arg,
                                      check_header, error_code, parse_request, reply_error, reply_ok, wants_reply)
from kvstore.sidecar.security import ZAP_DOMAIN, RefusalLog, ZapHandler, check_bind, handshake_failure, load_allow_dir, load_keys
from kvstore.sidecar.store_ops import lease_nowait

log = logging.getLogger(__name__)


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
        self._zmq = zmq.Context()
        self._router: zmq.Socket | None = None
        self._pull: zmq.Socket | None = None
        self._inproc = f"inproc://kvstore-replies-{id(self):x}"
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.options.workers), thread_name_prefix="kvs-worker")
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._started = time.monotonic()
        self._host = host_id()
        self.counters = Counters()
        self._inflight: dict[bytes, int] = {}  # connection -> requests queued or running
        self._zap: ZapHandler | None = None
        self._monitor: zmq.Socket | None = None
        self._refusal_log = RefusalLog(log)
        self.curve = bool(self.options.curve_secret or self.options.curve_allow)
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self._ipc_lock: limits.InstanceLock | None = None
        self._shm_lock: limits.InstanceLock | None = None
        self.shm_dir: str | None = None
        self._reaper: threading.Thread | None = None
        # the rooms the handlers see, through one context
        self._namespaces = NamespaceBook(self.config, self.options, self.curve)
        self._claims = ClaimBook(self.options, self._host, self.counters.count)
        self._gpu_pools = GpuPools()  # engines' CUDA pools opened by CUDA IPC
        self._replies = limits.ReplyBudget(self.options.max_reply_bytes_per_peer, self.options.max_reply_bytes)
        self.ctx = Context(self.options, self._namespaces, self._claims, self._gpu_pools, self._replies,
                           self.counters, self._host, self.curve, self)
        #: op -> handler with the context bound in (``dispatch.OP_TABLE``)
        self._handlers: dict[str, Callable[[dict, list], tuple[Any, list]]] = dispatch.bind(self.ctx)

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
        router = self._zmq.socket(zmq.ROUTER)
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
            self._namespaces.shm_dir = self.shm_dir
        pull = self._zmq.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self._inproc)
        self._router, self._pull = router, pull
        if self.options.metrics_port is not None:
            self.metrics = Metrics(self._namespaces, self._claims, self.counters)
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
        self._zap = ZapHandler(self._zmq, allowed, self._count_refusal)
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

    def _count_refusal(self, reason: str) -> None:
        self.counters.count("unauthorised")

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
                self.counters.count("unauthorised")
                self._refusal_log(event.get("endpoint", b"?").decode(errors="replace"), reason)

    def metric_label(self, ns: Namespace) -> str:
        """A namespace's name in metrics (an opaque digest with CurveZMQ; see
        :meth:`NamespaceBook.metric_label`)."""
        return self._namespaces.metric_label(ns)

    def namespaces(self) -> list[Namespace]:
        return self._namespaces.all()

    def open_claims(self, kinds: tuple[str, ...] | None = None) -> int:
        """Open claims (``kinds``: only those, e.g. ``("lease", "reservation")`` without the
        clients' staged spare slots). O(claims) with ``kinds``, else O(1)."""
        return self._claims.open(kinds)

    def uptime_s(self) -> float:
        """Seconds since this server was made (``health``, ``stats``)."""
        return time.monotonic() - self._started

    def queued(self) -> int:
        """Requests handed to the workers and not yet started."""
        return self._queued

    # -- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        router, pull = self._router, self._pull
        assert router is not None and pull is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        pools = self._gpu_pools
        self._reaper = threading.Thread(target=self._claims.reap_forever, name="kvs-reaper", daemon=True,
                                        args=(self._stop, lambda: pools.reap() if len(pools) else 0))
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
        self._claims.drop_all()
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
        self._zmq.term()
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
            sock = self._zmq.socket(zmq.PUSH)
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
        self.counters.count("requests")
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
                ns = self.ctx.namespace(args)
                tokens = self.ctx.tokens(args)
                exact = arg(args, "exact", bool, required=False)
                n = ns.store.port.lookup_nowait(tokens, exact=exact) if len(tokens) <= self.options.loop_lookup_tokens \
                    else None
                if n is not None:
                    no_payload(op, payload)
                    self._router.send_multipart([ident, *reply_ok(rid, n)], copy=False)
                    self._observe(op, "ok", received)
                    return
            if op == "get":  # a lease on shared slots is O(blocks) bookkeeping: no worker needed
                no_payload(op, payload)
                lease = lease_nowait(self.ctx, args, self.options.loop_lookup_tokens)
                if lease is not None:
                    self._router.send_multipart([ident, *reply_ok(rid, lease)], copy=False)
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
            self._pool.submit(self._work, ident, op, args, payload, rid, received, deadline,
                              wants_reply(header, op))
        except Exception as exc:
            code = error_code(exc)
            if code in ("bad_frame", "bad_version", "unknown_op", "too_large"):
                self.counters.count("malformed")
                log.warning("malformed request answered with %s: %s", code, exc)
            elif code == "busy":
                self.counters.count("busy")
            if code == "internal":
                log.exception("unexpected error while reading a request")
            self.counters.count("errors")
            self._observe(op if op in OPS else "invalid", code, received)
            try:
                self._router.send_multipart([ident, *reply_error(rid, code, str(exc))])
            except zmq.ZMQError as send_exc:  # the peer is gone; nothing to answer
                log.debug("could not send an error reply: %s", send_exc)

    def _work(self, ident, op, args, payload, rid, received, deadline, answer: bool = True) -> None:
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
        grant = self.ctx.take_reply_grant()
        if not answer and grant is None:  # a give-back sent one-way: nobody reads the answer
            return
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
                raise SidecarError(f"{op} waited {time.monotonic() - received:.3f} s in the queue, past its "
                                  f"deadline of {deadline:.3f} s", "deadline_exceeded")
            result, out = self._handlers[op](args, payload)
            return reply_ok(rid, result, out)
        except Exception as exc:
            code = error_code(exc)
            if code == "internal":
                log.exception("%s failed", op)
            self.counters.count("errors")
            return reply_error(rid, code, str(exc) or type(exc).__name__)
        finally:
            self._observe(op, code, received)

    def _observe(self, op: str, code: str, received: float) -> None:
        observe(self.metrics, op, code, received)


__all__ = ["SidecarServer", "ServerOptions", "Namespace", "Peer", "PEER", "plan_result", "host_id", "MAGIC",
           "ForbiddenError"]
