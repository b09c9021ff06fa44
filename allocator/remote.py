"""A remote byte store on Redis or Valkey, single node or Cluster, through redis-py.

Bytes, not tokens: callers hand in opaque keys and block values; this module knows shards,
pipelines, deadlines and a self-checking value format, nothing about KV or models.

Batches: the keys of one call are grouped by the shard that owns their hash slot (one
shard for a single server) and each shard gets **one pipelined round trip** (all its
commands packed into one write on one pooled connection, replies read in order); with
several shards the round trips run concurrently on a small thread pool. A call never
blocks longer than ``deadline_s``, all of it: the wait for a pooled connection (redis-py's
``BlockingConnectionPool``, waiting at most the time left; the cluster client's nodes get
the same pool through ``connection_pool_class``), the send and the reads. redis-py's
socket timeout bounds each read or write only, so an exchange still running at the
deadline has its socket cut by a watchdog (measured on a 32 KiB/s link: 4.2 s for a 1 s
deadline without it).

Faults: a shard that cannot serve anyone (refused, reset, timed out, ``OOM`` /
``READONLY`` / ``CLUSTERDOWN`` / ``LOADING`` replies) makes *its* keys misses; the shard is
marked degraded and left alone for a backoff that doubles per failure (``backoff_s`` ..
``max_backoff_s``), after which one call probes it again. A command the server's ACL
refuses (``NOPERM``) is per command: its keys are misses, it is counted and logged once
per shard and command, and the shard stays up. A pool wait that reaches the deadline is
counted, never an outage. Errors are counted per kind and logged once per degraded
episode (and once at recovery), never per block. ``MOVED``/``ASK`` (a failover or a
resharding) refreshes the cluster's slot map, rate limited. Authentication failures are
not faults to ride out: :class:`RemoteAuthError` is raised from :meth:`RemoteBackend.connect`.

Value format (:func:`pack_block` / :func:`unpack_block`): a 56-byte header (magic,
version, form, key echo, layout fingerprint, payload length, XXH3-64 of the payload) then
the payload. A value whose header, length or checksum does not match what the reader
expects is a miss, never bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
import logging
import os
import struct
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import xxhash

log = logging.getLogger(__name__)

__all__ = ["RemoteAddress", "RemoteAuthError", "RemoteBackend", "RemoteURLError", "block_buffer", "pack_block",
           "seal_blocks", "ttl_ms", "MIN_TTL_S", "REDIS_MAX_TTL_S",
           "parse_remote_url", "unpack_block", "HEADER_BYTES", "FORM_KV", "FORM_ACT"]

# -- value format ------------------------------------------------------------------------
MAGIC = b"KVR1"
FORM_KV, FORM_ACT = 0, 1
_HEADER = struct.Struct("<4sBB2x16s16sQQ")  # magic, version, form, pad, key, fingerprint, length, xxh3
HEADER_BYTES = _HEADER.size
_VERSION = 1


def pack_block(key: bytes, form: int, fingerprint: bytes, payload: bytes | memoryview) -> bytes:
    """One self-describing value: header (form, key echo, layout fingerprint, length,
    checksum) + payload. One copy of the payload; O(payload bytes)."""
    mv = memoryview(payload).cast("B")
    header = _HEADER.pack(MAGIC, _VERSION, form, key[:16].ljust(16, b"\0"), fingerprint[:16].ljust(16, b"\0"),
                          mv.nbytes, xxhash.xxh3_64_intdigest(mv))
    return b"".join((header, mv))


def block_buffer(n: int, payload_bytes: int):
    """An ``[n, HEADER_BYTES + payload_bytes]`` uint8 array: fill ``[:, HEADER_BYTES:]`` with
    the payloads (one batched copy), then :func:`seal_blocks`. Saves a copy per block over
    :func:`pack_block` (the values are views of this one buffer)."""
    import numpy as np

    return np.empty((n, HEADER_BYTES + payload_bytes), dtype=np.uint8)


def seal_blocks(buf, keys: Sequence[bytes], form: int, fingerprint: bytes) -> list[memoryview]:
    """Write each row's header (key ``keys[i]``, checksum of its payload) into ``buf`` from
    :func:`block_buffer`; returns one value (a view of its row) per block. O(bytes)."""
    fp = fingerprint[:16].ljust(16, b"\0")
    length = buf.shape[1] - HEADER_BYTES
    values = []
    for i, key in enumerate(keys):
        row = buf[i]
        _HEADER.pack_into(row, 0, MAGIC, _VERSION, form, key[:16].ljust(16, b"\0"), fp, length,
                          xxhash.xxh3_64_intdigest(row[HEADER_BYTES:]))
        values.append(memoryview(row))
    return values


def unpack_block(value: bytes | None, key: bytes, form: int, fingerprint: bytes, length: int) -> memoryview | None:
    """The payload of ``value`` if it is exactly what a reader of ``key`` expects (form,
    fingerprint, ``length`` bytes, checksum), else None (a miss). Zero-copy; O(length)."""
    if value is None or len(value) != HEADER_BYTES + length:
        return None
    magic, version, vform, vkey, vfp, vlen, digest = _HEADER.unpack_from(value)
    if (magic != MAGIC or version != _VERSION or vform != form or vkey != key[:16].ljust(16, b"\0")
            or vfp != fingerprint[:16].ljust(16, b"\0") or vlen != length):
        return None
    payload = memoryview(value)[HEADER_BYTES:]
    if xxhash.xxh3_64_intdigest(payload) != digest:
        return None
    return payload


# -- addresses -----------------------------------------------------------------------------
class RemoteURLError(ValueError):
    """A remote URL that cannot work (scheme, host, port, database)."""


class RemoteAuthError(ConnectionError):
    """The server refused our credentials (wrong password or ACL user)."""


@dataclass(frozen=True)
class RemoteAddress:
    """A parsed ``redis://``, ``rediss://`` or ``redis+cluster://`` URL."""

    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: TLS settings from the URL's query (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    #: ``ssl_cert_reqs``, ``ssl_check_hostname``), as redis-py's keyword arguments
    tls_options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        """The address without credentials (for logs and errors)."""
        scheme = ("rediss+cluster" if self.tls else "redis+cluster") if self.cluster else ("rediss" if self.tls else "redis")
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{hosts}" + (f"/{self.db}" if self.db and not self.cluster else "")


def parse_remote_url(url: str, env: dict[str, str] | None = None) -> RemoteAddress:
    """Parse ``redis://[user:pass@]HOST:PORT[/DB]``, ``rediss://...`` (TLS) or
    ``redis+cluster://[user:pass@]HOST:PORT[,HOST:PORT...]`` (seed nodes; ``rediss+cluster``
    for TLS). With TLS the query may carry ``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile`` (paths), ``ssl_cert_reqs`` and ``ssl_check_hostname``. Credentials missing from the URL come from ``KVSTORE_REDIS_USERNAME`` /
    ``KVSTORE_REDIS_PASSWORD`` in ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    if not isinstance(url, str) or "://" not in url:
        raise RemoteURLError(f"remote_url must look like redis://HOST:PORT, rediss://HOST:PORT or "
                             f"redis+cluster://HOST:PORT[,HOST:PORT...], got {url!r}")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise RemoteURLError(f"remote_url scheme {scheme!r} is not one of redis, rediss, redis+cluster, "
                             "rediss+cluster")
    cluster, tls = scheme.endswith("+cluster"), scheme.startswith("rediss")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    tls_options = _tls_options(query, tls)
    user = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        user, password = unquote(user) or None, unquote(pw) or None
    hostpart = netloc
    nodes: list[tuple[str, int]] = []
    for item in hostpart.split(","):
        parts = urlsplit("//" + item)
        try:
            port = parts.port or 6379
        except ValueError:
            raise RemoteURLError(f"remote_url has a bad port in {item!r}") from None
        if not parts.hostname:
            raise RemoteURLError(f"remote_url names no host in {item!r}")
        nodes.append((parts.hostname, port))
    if len(nodes) > 1 and not cluster:
        raise RemoteURLError("several hosts need redis+cluster:// (seed nodes of a Redis Cluster)")
    db = 0
    if path:
        if cluster:
            raise RemoteURLError("a Redis Cluster has only database 0; drop the /DB from redis+cluster://")
        if not path.isdigit():
            raise RemoteURLError(f"remote_url database must be a number, got {path!r}")
        db = int(path)
    user = user or env.get("KVSTORE_REDIS_USERNAME") or None
    password = password or env.get("KVSTORE_REDIS_PASSWORD") or None
    return RemoteAddress(cluster, tuple(nodes), db, tls, user, password, tls_options)


_TLS_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


def _tls_options(query: str, tls: bool) -> tuple[tuple[str, Any], ...]:
    """The URL query's TLS options (the only ones accepted), checked now rather than at connect."""
    from urllib.parse import parse_qsl

    out: list[tuple[str, Any]] = []
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else []:
        if key not in _TLS_KEYS:
            raise RemoteURLError(f"remote_url option {key!r} is not one of {_TLS_KEYS}")
        if not tls:
            raise RemoteURLError(f"remote_url option {key!r} needs rediss:// (TLS)")
        if key == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
            raise RemoteURLError(f"ssl_cert_reqs must be none, optional or required, got {value!r}")
        if key == "ssl_check_hostname":
            if value.lower() not in ("true", "false"):
                raise RemoteURLError(f"ssl_check_hostname must be true or false, got {value!r}")
            value = value.lower() == "true"
        elif key != "ssl_cert_reqs" and not os.path.isfile(value):
            raise RemoteURLError(f"remote_url {key}={value!r} is not a readable file")
        out.append((key, value))
    return tuple(out)


# -- the backend -------------------------------------------------------------------------------
@dataclass
class ShardState:
    """Health of one shard: failures in a row and when it may be tried again."""

    name: str
    failures: int = 0
    retry_at: float = 0.0
    degraded: bool = False


@dataclass
class RemoteCounters:
    round_trips: int = 0
    errors: int = 0
    timeouts: int = 0
    full: int = 0            # OOM replies: Redis at maxmemory under noeviction
    redirects: int = 0       # MOVED / ASK: the slot map changed
    skipped_keys: int = 0    # keys not sent because their shard was backing off
    degraded_episodes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    pool_timeouts: int = 0   # calls that found every pooled connection busy until their deadline
    denied: int = 0          # commands refused by the server's ACL (NOPERM): per command, never "down"


_AUTH_MARKERS = ("noauth", "wrongpass", "invalid password", "invalid username-password", "authentication required",
                 "must be called with the client already authenticated", "auth called without any password")


def _is_auth_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: the cluster client rewraps node errors) is the
    server refusing our credentials rather than an unreachable node."""
    import redis

    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, redis.AuthenticationError) or any(m in str(seen).lower() for m in _AUTH_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_UNANSWERED = object()  # a key whose shard gave no usable reply


def _shard_fault_replies() -> tuple[type[BaseException], ...]:
    """Replies that describe the whole shard (it cannot serve anyone now), not one command:
    full under ``noeviction``, a replica after a failover, the cluster down, still loading."""
    from redis import exceptions as e

    return (e.OutOfMemoryError, e.ReadOnlyError, e.ClusterDownError, e.TryAgainError, e.BusyLoadingError)


class _PoolWaitExpired(Exception):
    """Every pooled connection to a shard stayed busy until the call's deadline."""


class _DeadlineExpired(Exception):
    """The call's deadline passed (before or during the exchange)."""


def _deadline_pool_class():
    """redis-py's :class:`~redis.BlockingConnectionPool` whose wait for a free connection is
    the *calling thread's* time left (set per call), so a pool wait is part of the call's
    deadline instead of an outage ("Too many connections") or a wait of its own."""
    import redis

    class DeadlinePool(redis.BlockingConnectionPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._left = threading.local()
            super().__init__(*args, **kwargs)

        @property
        def timeout(self) -> float | None:  # read by BlockingConnectionPool.get_connection
            return getattr(self._left, "s", self._default_timeout)

        @timeout.setter
        def timeout(self, value: float | None) -> None:
            self._default_timeout = value

        def get_connection_within(self, seconds: float) -> Any:
            self._left.s = max(0.0, seconds)
            self._left.until = time.monotonic() + self._left.s
            try:
                return self.get_connection()
            except redis.ConnectionError as exc:
                if "No connection available" in str(exc):
                    raise _PoolWaitExpired(str(exc)) from None
                raise
            finally:
                del self._left.s, self._left.until

        def ensure_connection(self, connection: Any) -> None:
            """A connection opened inside a call (connect, then the HELLO/AUTH handshake)
            gets only the time that call has left, per socket operation."""
            until = getattr(self._left, "until", None)
            if until is None or getattr(connection, "_sock", None) is not None:
                return super().ensure_connection(connection)
            left = max(0.001, until - time.monotonic())
            saved = connection.socket_connect_timeout, connection.socket_timeout
            connection.socket_connect_timeout = min(saved[0] or left, left)
            connection.socket_timeout = min(saved[1] or left, left)
            try:
                super().ensure_connection(connection)
            finally:
                connection.socket_connect_timeout, connection.socket_timeout = saved
                sock = getattr(connection, "_sock", None)
                if sock is not None:
                    sock.settimeout(saved[1])

    return DeadlinePool


class _Watchdog:
    """Cuts the socket of an exchange still running at its call's deadline.

    redis-py's ``socket_timeout`` bounds each ``recv``/``send``, not a call: a slow link
    that trickles bytes keeps every single read under it while the call takes many times
    the deadline (measured: 13 s for a 0.5 s deadline). Shutting the socket down makes the
    blocked read or write return at once; redis-py then raises ``ConnectionError`` and
    drops the connection. One thread for all calls; arm/disarm O(log n).
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, list]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, at: float, conn: Any) -> list:
        """Watch ``conn`` until ``at`` (``time.monotonic()``); returns the handle for :meth:`disarm`."""
        import heapq

        entry = [conn, False, False]  # connection, disarmed, fired
        with self._cv:
            self._seq += 1
            sooner = not self._heap or at < self._heap[0][0]
            heapq.heappush(self._heap, (at, self._seq, entry))
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="kvstore-remote-deadline", daemon=True)
                self._thread.start()
            if sooner:  # else the thread already wakes up in time for it (no wake-up per call)
                self._cv.notify()
        return entry

    def disarm(self, entry: list) -> bool:
        """Stop watching; True when the deadline had already cut the socket."""
        with self._cv:
            entry[1] = True
            return entry[2]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _loop(self) -> None:
        import heapq
        import socket

        with self._cv:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, entry = heapq.heappop(self._heap)
                    if entry[1]:
                        continue
                    entry[2] = True
                    sock = getattr(entry[0], "_sock", None)  # redis-py's socket of this connection
                    if sock is not None:
                        try:
                            # linger 0: the close that follows (redis-py disconnects) resets the
                            # connection, discarding what the kernel still queues to send
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            # the plain socket's shutdown: an SSL wrapper's would drop its state under a reader
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)
                        except OSError:
                            pass
                self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - now))


class RemoteBackend:
    """Batched SET/GET/EXISTS/STRLEN/DEL of byte values on Redis or a Redis Cluster.

    Each batch method takes ``n`` keys and returns ``n`` results in order; a key whose
    shard failed gets the miss value (None / False). Costs one pipelined round trip per
    shard touched (concurrent across shards) plus the bytes. Thread-safe.

    One deadline per call, on every topology: waiting for a pooled connection (redis-py's
    blocking pool, waiting at most the time left), sending and reading all count against
    ``deadline_s``; an exchange still running at the deadline has its socket cut
    (:class:`_Watchdog`), so nothing of the call outlives it.

    Errors are classified: a connection failure or a timeout degrades the shard (its keys
    are misses for a backoff); so do replies that describe the whole shard (``OOM`` under
    noeviction, ``READONLY``, ``CLUSTERDOWN``, ``LOADING``). A permission refusal
    (``NOPERM``) is per command: that command's keys are misses, it is counted and logged
    once per shard and command, and the shard stays up. Pool exhaustion waits (within the
    deadline) and is counted, never an outage.
    """

    def __init__(self, address: RemoteAddress | str, *, deadline_s: float = 0.5, backoff_s: float = 0.25,
                 max_backoff_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 max_connections: int = 16) -> None:
        if isinstance(address, str):
            address = parse_remote_url(address)
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not 0 < deadline_s < 3600:
            raise ValueError(f"deadline_s must be a finite number of seconds in (0, 3600), got {deadline_s!r}")
        self.address = address
        self.deadline_s = float(deadline_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.clock = clock
        self.counters = RemoteCounters()
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._shards: dict[str, ShardState] = {}
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._last_refresh = float("-inf")
        self._refreshing = False
        self._calls = threading.local()  # per calling thread: did its last batch leave a send running?
        self._closed = False
        self._watchdog = _Watchdog()
        self._denied_logged: set[tuple[str, str]] = set()

    # -- connection ----------------------------------------------------------------------
    def _kwargs(self) -> dict[str, Any]:
        a = self.address
        kw: dict[str, Any] = dict(username=a.username, password=a.password, socket_timeout=self.deadline_s,
                                  socket_connect_timeout=self.deadline_s, max_connections=self._max_connections,
                                  timeout=self.deadline_s)
        if a.tls:
            kw.update(a.tls_options)
        return kw

    def connect(self) -> None:
        """Reach the server (or the cluster's seed nodes) and check credentials.

        Raises :class:`RemoteAuthError` for refused credentials and ``ConnectionError`` when
        no node answers within the deadline (the caller decides whether to start degraded).
        A user whose ACL forbids ``PING`` is connected all the same (the server answered).
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        a = self.address
        no_retry = Retry(NoBackoff(), 0)  # retrying is ours (backoff per shard), never inside a deadline
        pool_class = _deadline_pool_class()
        try:
            if a.cluster:
                client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in a.nodes],
                                      require_full_coverage=False, retry=no_retry, ssl=a.tls,
                                      connection_pool_class=pool_class, **self._kwargs())
            else:
                conn_class = redis.SSLConnection if a.tls else redis.Connection
                pool = pool_class(connection_class=conn_class, host=a.nodes[0][0], port=a.nodes[0][1], db=a.db,
                                  retry=no_retry, **self._kwargs())
                client = redis.Redis(connection_pool=pool)
                self._ping(client)
        except redis.AuthenticationError as exc:
            raise RemoteAuthError(f"{a.describe()} refused the credentials ({exc}); set the password in the URL "
                                  "or KVSTORE_REDIS_PASSWORD (and KVSTORE_REDIS_USERNAME for an ACL user)") from None
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            if _is_auth_failure(exc):
                raise RemoteAuthError(f"{a.describe()} refused the credentials ({exc}); set the password in the "
                                      "URL or KVSTORE_REDIS_PASSWORD (and KVSTORE_REDIS_USERNAME for an ACL user)"
                                      ) from None
            raise ConnectionError(f"cannot reach {a.describe()} within {self.deadline_s}s: {exc}") from None
        if a.cluster:
            try:  # the cluster client authenticates lazily: check each primary now
                for node in client.get_primaries():
                    self._ping(client.get_redis_connection(node))
            except redis.AuthenticationError as exc:
                client.close()
                raise RemoteAuthError(f"{a.describe()} refused the credentials ({exc})") from None
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # a shard already down: its keys are misses until it returns
        with self._lock:
            old, self._client = self._client, client
        if old is not None:
            old.close()

    def _ping(self, client: Any) -> None:
        """PING ``client``; a permission refusal is an answer (the server is there)."""
        import redis

        try:
            client.ping()
        except redis.exceptions.NoPermissionError as exc:
            self._denied(self.address.describe(), "ping", exc)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def shards(self) -> list[str]:
        """Names (``host:port``) of the shards currently known."""
        client = self._client
        if client is None:
            return []
        if self.address.cluster:
            return sorted(n.name for n in client.get_primaries())
        return [f"{self.address.nodes[0][0]}:{self.address.nodes[0][1]}"]

    def shard_states(self) -> dict[str, dict]:
        with self._lock:
            return {n: {"degraded": s.degraded, "failures": s.failures,
                        "retry_in_s": max(0.0, s.retry_at - self.clock()) if s.degraded else 0.0}
                    for n, s in self._shards.items()}

    @property
    def degraded(self) -> bool:
        with self._lock:
            return self._client is None or any(s.degraded for s in self._shards.values())

    def retry_in_s(self) -> float:
        """Seconds until every degraded shard may be tried again (0 when none is)."""
        now = self.clock()
        with self._lock:
            return max([s.retry_at - now for s in self._shards.values() if s.degraded] + [0.0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._watchdog.close()
        if client is not None:
            client.close()

    # -- health ----------------------------------------------------------------------------
    def _state(self, name: str) -> ShardState:
        st = self._shards.get(name)
        if st is None:
            st = self._shards[name] = ShardState(name)
        return st

    def _available(self, name: str, now: float) -> bool:
        with self._lock:
            st = self._state(name)
            return not st.degraded or now >= st.retry_at

    def _count(self, field: str, n: int) -> None:
        with self._lock:
            setattr(self.counters, field, getattr(self.counters, field) + n)

    def _denied(self, name: str, command: str, exc: BaseException) -> None:
        """Count a permission refusal; log it once per shard and command (never "down")."""
        with self._lock:
            self.counters.denied += 1
            first = (name, command) not in self._denied_logged
            self._denied_logged.add((name, command))
        if first:
            log.error("remote shard %s refused %s for this user (%s): those commands are misses, the shard stays "
                      "in use for the commands the ACL allows", name, command.upper(), exc)

    def _fail(self, name: str, kind: str, exc: BaseException | str) -> None:
        with self._lock:
            st = self._state(name)
            self.counters.errors += 1
            if kind == "timeout":
                self.counters.timeouts += 1
            elif kind == "full":
                self.counters.full += 1
            st.failures += 1
            st.retry_at = self.clock() + min(self.max_backoff_s, self.backoff_s * 2 ** (st.failures - 1))
            first = not st.degraded
            st.degraded = True
            if first:
                self.counters.degraded_episodes += 1
        if first:  # once per episode, not per block
            log.error("remote shard %s degraded (%s: %s); its blocks are misses, retrying with backoff",
                      name, kind, exc)

    def _ok(self, name: str) -> None:
        with self._lock:
            st = self._state(name)
            recovered = st.degraded
            st.failures, st.degraded, st.retry_at = 0, False, 0.0
        if recovered:
            log.warning("remote shard %s recovered", name)

    def _reconnect(self) -> bool:
        """Try to (re)build the client (startup while the server was down). Backoff applies."""
        now = self.clock()
        if not self._available("*connect*", now):
            return False
        try:
            self.connect()
        except RemoteAuthError:
            raise
        except ConnectionError as exc:
            self._fail("*connect*", "error", exc)
            return False
        self._ok("*connect*")
        return True

    def _refresh_slots(self) -> None:
        """Reload a cluster's slot map in the background (after MOVED/ASK, or while a shard is
        failing: a failover moves its slots to a replica), at most once per
        ``max(deadline, 1 s)``; callers never wait for it. Until it lands, the old map holds."""
        client = self._client
        now = self.clock()
        with self._lock:
            if (client is None or not self.address.cluster or self._refreshing
                    or now - self._last_refresh < max(self.deadline_s, 1.0)):
                return
            self._last_refresh, self._refreshing = now, True

        def refresh() -> None:
            try:
                client.nodes_manager.initialize()
            except Exception as exc:  # noqa: BLE001 - a refresh that fails leaves the old map
                log.debug("slot map refresh failed: %s", exc)
            finally:
                self._refreshing = False

        try:
            self._executor().submit(refresh)
        except RuntimeError:  # closed meanwhile
            self._refreshing = False

    # -- batching ------------------------------------------------------------------------------
    def _group(self, keys: Sequence[bytes]) -> dict[str, tuple[Any, list[int]]]:
        """Key positions by shard name, with each shard's plain Redis client. O(n)."""
        client = self._client
        if not self.address.cluster:
            return {self.shards()[0]: (client, list(range(len(keys))))}
        groups: dict[str, tuple[Any, list[int]]] = {}
        nm = client.nodes_manager
        for i, k in enumerate(keys):
            try:
                node = nm.get_node_from_slot(client.keyslot(k))
            except Exception:  # noqa: BLE001 - slot not covered: a miss
                continue
            g = groups.get(node.name)
            if g is None:
                g = groups[node.name] = (client.get_redis_connection(node), [])
            g[1].append(i)
        return groups

    def _exchange(self, client: Any, commands: list[tuple], deadline_at: float) -> list[Any]:
        """Send ``commands`` in one write and read their replies (error replies as values),
        all before ``deadline_at``: the pool wait takes at most the time left, and the
        watchdog cuts the socket if the exchange is still running then. Raises
        :class:`_PoolWaitExpired`, :class:`_DeadlineExpired` or redis-py's connection errors."""
        import redis

        pool = client.connection_pool
        left = deadline_at - time.monotonic()
        if left <= 0:
            raise _DeadlineExpired()
        conn = pool.get_connection_within(left)
        entry = self._watchdog.arm(deadline_at, conn)
        try:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:  # an error reply: the stream stays in step
                    replies.append(exc)
        except BaseException:
            if self._watchdog.disarm(entry):
                conn.disconnect()
                pool.release(conn)
                raise _DeadlineExpired() from None
            conn.disconnect()
            pool.release(conn)
            raise
        if self._watchdog.disarm(entry):  # cut as the last reply came in: the socket is gone
            conn.disconnect()
        pool.release(conn)
        return replies

    def _run(self, keys: Sequence[bytes], commands: Callable[[int], Sequence[tuple]],
             deadline_at: float | None = None) -> list[Any]:
        """Send ``commands(i)`` (the same number for every key) for every key on its shard,
        one exchange per shard (concurrently), all within one deadline; return per key the
        list of its replies, or ``_UNANSWERED`` (replaced by the caller's miss value).
        ``deadline_at`` (``time.monotonic()``) lets several batches share one caller's
        deadline; by default this batch gets ``deadline_s`` of its own."""
        import redis

        shard_faults = _shard_fault_replies()
        out: list[Any] = [_UNANSWERED] * len(keys)
        self._calls.abandoned = False
        self._calls.unanswered = ()
        denied: list[int] = []
        self._calls.denied = denied
        if not keys or self._closed:
            return out
        if deadline_at is None:
            deadline_at = time.monotonic() + self.deadline_s
        if self._client is None and not self._reconnect():
            self._count("skipped_keys", len(keys))
            return out
        start = self.clock()
        groups = self._group(keys)
        jobs: list[tuple[str, Any, list[int]]] = []
        for name, (conn, idx) in groups.items():
            if self._available(name, start):
                jobs.append((name, conn, idx))
            else:
                self._count("skipped_keys", len(idx))
                self._refresh_slots()  # a failover may have moved this shard's slots

        def one(client: Any, idx: list[int]) -> list[Any]:
            cmds = [c for i in idx for c in commands(i)]
            return self._exchange(client, cmds, deadline_at)

        def settle(name: str, idx: list[int], replies: list[Any] | BaseException) -> None:
            if isinstance(replies, _PoolWaitExpired):  # busy, not down: these keys are misses this once
                self._count("pool_timeouts", 1)
                return
            if isinstance(replies, BaseException):
                late = isinstance(replies, (_DeadlineExpired, redis.TimeoutError, TimeoutError))
                self._fail(name, "timeout" if late else "error",
                           f"no answer within the {self.deadline_s}s deadline" if late else replies)
                self._refresh_slots()
                return
            per = len(replies) // max(1, len(idx))
            moved = fault = None
            for j, i in enumerate(idx):
                mine = replies[j * per:(j + 1) * per]
                answered = True
                for r in mine:
                    if isinstance(r, redis.exceptions.NoPermissionError):
                        self._denied(name, str(r).split("'")[1] if "'" in str(r) else "command", r)
                        denied.append(i)
                        answered = False
                    elif isinstance(r, redis.exceptions.AskError):  # MOVED too: the slot map changed
                        moved, answered = r, False
                    elif isinstance(r, shard_faults):
                        fault, answered = r, False
                if answered:
                    out[i] = mine
            if moved is not None:
                self._count("redirects", 1)
                self._refresh_slots()
            if fault is not None:
                self._fail(name, "full" if isinstance(fault, redis.exceptions.OutOfMemoryError) else "error", fault)
                if not isinstance(fault, redis.exceptions.OutOfMemoryError):
                    self._refresh_slots()
            elif moved is None:
                self._ok(name)

        self._count("round_trips", len(jobs))
        errors = (redis.RedisError, OSError, _PoolWaitExpired, _DeadlineExpired)
        if len(jobs) == 1:  # one shard: inline (the watchdog holds the deadline)
            name, conn, idx = jobs[0]
            try:
                replies: list[Any] | BaseException = one(conn, idx)
            except errors as exc:
                replies = exc
            settle(name, idx, replies)
            return out
        pool = self._executor()
        futures = {pool.submit(one, conn, idx): (name, idx) for name, conn, idx in jobs}
        # the watchdog cuts every exchange at the deadline; the grace covers the threads' wake-up
        done, pending = wait(futures, timeout=max(0.0, deadline_at - time.monotonic()) + 0.05)
        for fut in done:
            name, idx = futures[fut]
            exc = fut.exception()
            if exc is not None and not isinstance(exc, errors):
                raise exc
            settle(name, idx, exc if exc is not None else fut.result())
        self._calls.abandoned = bool(pending)
        for fut in pending:  # still running (a connect past the deadline): its keys are misses
            name, idx = futures[fut]
            self._fail(name, "timeout", f"no answer within the {self.deadline_s}s deadline")
            self._refresh_slots()
        return out

    def _finish(self, out: list[Any], miss: Any) -> list[Any]:
        """Replace unanswered slots by ``miss``, remembering which they were (per thread)."""
        unanswered = [i for i, r in enumerate(out) if r is _UNANSWERED]
        self._calls.unanswered = unanswered
        for i in unanswered:
            out[i] = miss
        return out

    def denied(self) -> Sequence[int]:
        """Positions of this thread's last batch that the server refused for our ACL user
        (``NOPERM``): answered, and no retry will change it."""
        return getattr(self._calls, "denied", ())

    def unanswered(self) -> Sequence[int]:
        """Positions of this thread's last batch whose shard did not answer (down, hung,
        backing off, refusing): unknown, unlike a key the server said is absent."""
        return getattr(self._calls, "unanswered", ())

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvstore-remote")
            return self._pool

    # -- batch operations ----------------------------------------------------------------------
    def set_many(self, keys: Sequence[bytes], values: Sequence[bytes | memoryview], ttl_s: float | None = None,
                 *, deadline_at: float | None = None) -> list[bool]:
        """SET each key (``PX`` = ``ttl_s`` when given); True where the server acknowledged."""
        px = ttl_ms(ttl_s)

        def cmds(i: int) -> tuple[tuple, ...]:
            return (("SET", keys[i], values[i], "PX", px),) if px else (("SET", keys[i], values[i]),)

        replies = self._finish(self._run(keys, cmds, deadline_at), None)
        ok = [r is not None and (r[0] is True or r[0] == b"OK") for r in replies]
        self._count("bytes_sent", sum(memoryview(v).nbytes for v, good in zip(values, ok) if good))
        return ok

    def left_running(self) -> bool:
        """Whether this thread's last batch returned at its deadline while a shard's send was
        still running (so the values' memory may still be read: do not reuse it)."""
        return getattr(self._calls, "abandoned", False)

    def get_many(self, keys: Sequence[bytes], *, deadline_at: float | None = None
                 ) -> list[bytes | BaseException | None]:
        """GET each key: its bytes, None for a missing key or an unreachable shard, or the
        error reply (e.g. ``WRONGTYPE``: another kind of value sits under the key)."""
        replies = self._finish(self._run(keys, lambda i: (("GET", keys[i]),), deadline_at), None)
        out = [None if r is None else r[0] for r in replies]
        self._count("bytes_received", sum(len(v) for v in out if isinstance(v, bytes)))
        return out

    def exists_many(self, keys: Sequence[bytes]) -> list[bool | None]:
        """EXISTS each key (one pipelined round trip per shard); None where its shard did not answer."""
        replies = self._finish(self._run(keys, lambda i: (("EXISTS", keys[i]),)), None)
        return [None if r is None else r[0] == 1 for r in replies]

    def strlen_many(self, keys: Sequence[bytes], ttl_s: float | None = None, *, deadline_at: float | None = None
                    ) -> list[int | BaseException | None]:
        """``STRLEN`` of each key: 0 when absent, the error reply for a value of another
        type, None where its shard did not answer. With ``ttl_s``, each present key's expiry
        is reset too (``PEXPIRE``, same round trip). A cheap existence check that also sees
        a value's size and type; reading a key also refreshes its LRU/LFU standing."""
        px = ttl_ms(ttl_s)

        def cmds(i: int) -> tuple[tuple, ...]:
            return (("STRLEN", keys[i]), ("PEXPIRE", keys[i], px)) if px else (("STRLEN", keys[i]),)

        replies = self._finish(self._run(keys, cmds, deadline_at), None)
        return [None if r is None else r[0] for r in replies]

    def delete_many(self, keys: Sequence[bytes], *, deadline_at: float | None = None) -> list[bool]:
        replies = self._finish(self._run(keys, lambda i: (("DEL", keys[i]),), deadline_at), None)
        return [r is not None and r[0] == 1 for r in replies]

    def ping_s(self) -> float:
        """Seconds of one PING round trip to the first shard (inf when unreachable; a user
        not allowed to PING still gets the round trip of the refusal)."""
        import redis

        client = self._client
        if client is None:
            return float("inf")
        conn = client if not self.address.cluster else client.get_redis_connection(client.get_primaries()[0])
        t0 = time.perf_counter()
        try:
            conn.ping()
        except redis.exceptions.NoPermissionError:
            pass
        except (redis.RedisError, OSError):
            return float("inf")
        return time.perf_counter() - t0


#: the longest expiry Redis accepts in milliseconds without overflow (``PX`` is a signed 64-bit
#: count added to the current time in ms); a much smaller, sane bound is enforced by configs
REDIS_MAX_TTL_S = (2**63 - 1) / 1000 / 2
#: expiries shorter than this are refused (Redis counts milliseconds: a shorter one rounds to 0)
MIN_TTL_S = 0.001


def ttl_ms(ttl_s: float | None) -> int | None:
    """``ttl_s`` as Redis' ``PX`` milliseconds, or None for no expiry. Raises ValueError for
    what Redis would refuse (non-finite, under 1 ms, beyond its limit), so a config check and
    the write path agree."""
    import math

    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) \
            or not MIN_TTL_S <= ttl_s <= REDIS_MAX_TTL_S:
        raise ValueError(f"a remote TTL must be a finite number of seconds in [{MIN_TTL_S}, {REDIS_MAX_TTL_S:.3g}], "
                         f"got {ttl_s!r}")
    return max(1, int(round(ttl_s * 1000)))
