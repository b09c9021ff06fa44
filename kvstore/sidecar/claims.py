"""Claims: the leases, reservations and staged slots the sidecar holds for its clients.

A ``get`` over shared memory pins blocks (a *lease*), a two-round-trip put reserves slots
(a *reservation*) and a client writing puts holds spare slots (*staging*,
:mod:`kvstore.sidecar.shm_plane`). Each is a :class:`Claim` in the :class:`ClaimBook`
under a random id -- a capability: whoever names it may commit or release it, so another
client must not be able to guess one -- until its holder gives it back or it expires
(``lease_timeout_s``). Leases and reservations count against the connection's cap
(``max_claims_per_client``: ``busy`` beyond); staging is bounded by the tier's spare slots.

The reaper (:meth:`ClaimBook.reap_forever`, a thread of its own, off the loop) reclaims
expired claims. A same-host client names itself by ``(pid, start time)``
(:mod:`kvstore.sidecar.procinfo`); its reservations and staged slots are reclaimed only once
that process is dead or no longer maps the namespace's arenas, so a live client that stalls
mid-copy never writes into slots handed to another block, and a killed one leaks nothing.
Claims of clients that cannot be checked (another host, no /proc) and every lease are
reclaimed on the timeout alone.

The engines' GPU pools a client registered (:class:`GpuPools`, opened by
:mod:`kvstore.sidecar.gpu_pool`) are the other thing the sidecar holds for a client: the
same reaper drops those whose owner process is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
import secrets
import threading
import time
from typing import Any, Callable

import torch

from kvstore.errors import BusyError, InvalidInputError
from kvstore.sidecar import limits
from kvstore.sidecar.namespaces import Namespace, check_owner, peer_ident
from kvstore.sidecar.options import ServerOptions
from kvstore.sidecar.procinfo import owner_alive, owner_from_wire
from kvstore.sidecar.protocol import UnknownLeaseError, arg

log = logging.getLogger(__name__)

#: registered GPU pools one connection may hold at once
MAX_POOLS_PER_PEER = 16


@dataclass
class Staging:
    """Free slots of one tier that one client holds to write its next puts into."""

    tier: int
    slots: set[int] = field(default_factory=set)
    target: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def drop_staging(ns: Namespace, st: Staging) -> None:
    """Hand a client's staged slots back to the tier's spare set. O(slots)."""
    with st.lock:
        ns.store.port.unstage(st.tier, sorted(st.slots))
        st.slots.clear()


@dataclass
class Claim:
    """A lease or reservation the server holds for a client, until ``expires``."""

    kind: str  # "lease" | "reservation" | "staging"
    ns: Namespace
    obj: Any
    expires: float
    owner: tuple[int, int] | None = None  # (pid, start time) of a same-host client
    peer: bytes | None = None  # the connection that holds it (for the per-connection cap)


def drop_claim(claim: Claim) -> None:
    """Give a claim's blocks or slots back to its namespace's store (unpin, abort, unstage)."""
    if claim.kind == "lease":
        claim.ns.store.port.release(claim.obj)
    elif claim.kind == "staging":
        drop_staging(claim.ns, claim.obj)
    else:
        claim.ns.store.port.abort(claim.obj)


class ClaimBook:
    """The open claims of one sidecar, by id, with the per-connection counts.

    ``options`` gives the expiry and the per-connection cap (read at each use);
    ``count(name, n)`` is told of the reaper's events (``reclaimed``, ``kept_alive``).
    Thread-safe; O(1) per call except :meth:`reap` (O(open claims) plus one /proc read per
    distinct owner), :meth:`open_in` and :meth:`open` with ``kinds`` (O(open claims)).
    """

    def __init__(self, options: ServerOptions, host: str, count: Callable[[str, int], None]) -> None:
        self.options = options
        self.host = host
        self._count = count
        self._claims: dict[int, Claim] = {}
        self._claims_of: dict[bytes | None, int] = {}  # connection -> open claims (under _lock)
        self._lock = threading.Lock()

    def add(self, kind: str, ns: Namespace, obj: Any, args: dict) -> int:
        """Record a claim and return its id; past ``max_claims_per_client`` for its
        connection the claim is dropped at once and the client gets ``busy``."""
        # Random, not sequential: a claim id is a capability (whoever names it may commit or
        # release it), so another client must not be able to guess one.
        cid = secrets.randbits(62) or 1
        owner = owner_from_wire(args.get("owner"), self.host)
        ident = peer_ident(args)
        claim = Claim(kind, ns, obj, time.monotonic() + self.options.lease_timeout_s, owner, ident)
        with self._lock:
            if kind == "staging":  # bounded by the tier's spare slots, not by the per-connection cap
                self._claims[cid] = claim
                return cid
            held = self._claims_of.get(ident, 0)
            if held < self.options.max_claims_per_client:
                self._claims[cid] = claim
                self._claims_of[ident] = held + 1
                return cid
        if kind == "lease":  # never handed out, so never read: unpin only (no promotion's copy)
            ns.store.port.release(obj, read=False)
        else:
            drop_claim(claim)
        raise BusyError(f"this connection holds {held} leases/reservations, the limit is "
                        f"{self.options.max_claims_per_client}; release or commit them first")

    def _forget(self, cid: int) -> Claim | None:
        """Remove a claim from the books (caller holds ``_lock``)."""
        claim = self._claims.pop(cid, None)
        if claim is not None and claim.kind != "staging":
            left = self._claims_of.get(claim.peer, 1) - 1
            if left > 0:
                self._claims_of[claim.peer] = left
            else:
                self._claims_of.pop(claim.peer, None)
        return claim

    def take(self, args: dict, kind: str | None = None) -> Claim:
        """Remove and return the claim ``args["claim"]`` names (of ``kind``, if given): the
        caller now owns it and must drop or commit it. ``unknown_lease`` if there is none,
        ``forbidden`` if it is another CurveZMQ key's."""
        cid = arg(args, "claim", int)
        with self._lock:
            claim = self._claims.get(cid)
            if claim is None or (kind is not None and claim.kind != kind):
                raise UnknownLeaseError(f"no open {kind or 'lease or reservation'} {cid} (expired and reclaimed, "
                                        "or never granted)")
            check_owner(claim.ns, args)
            self._forget(cid)
        return claim

    def staging(self, cid: Any, ns: Namespace) -> Claim | None:
        """The open staging claim ``cid`` of ``ns`` (its expiry pushed back), or None."""
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise InvalidInputError("claim must be an int")
        with self._lock:
            claim = self._claims.get(cid)
            if claim is None or claim.kind != "staging" or claim.ns is not ns:
                return None
            claim.expires = time.monotonic() + self.options.lease_timeout_s
            return claim

    def open(self, kinds: tuple[str, ...] | None = None) -> int:
        """Open claims (``kinds``: only those, e.g. ``("lease", "reservation")`` without the
        clients' staged spare slots). O(claims) with ``kinds``, else O(1)."""
        with self._lock:
            if kinds is None:
                return len(self._claims)
            return sum(1 for c in self._claims.values() if c.kind in kinds)

    def open_in(self, namespaces: list[Namespace]) -> int:
        """Open claims of these namespaces. O(claims)."""
        ids = {id(ns) for ns in namespaces}
        with self._lock:
            return sum(1 for c in self._claims.values() if id(c.ns) in ids)

    def drop_all(self) -> None:
        """Give every claim back (the server is stopping)."""
        with self._lock:
            claims = list(self._claims.values())
            self._claims.clear()
            self._claims_of.clear()
        for c in claims:
            drop_claim(c)

    def reap_forever(self, stop: threading.Event, also: Callable[[], Any] | None = None) -> None:
        """The reaper thread's body: one pass every quarter lease timeout (at most 1 s) until
        ``stop``, off the loop thread, so /proc reads and unpinning never delay a request.
        ``also`` runs after each pass (the GPU pools' own reaping)."""
        every = max(0.05, min(1.0, self.options.lease_timeout_s / 4))
        while not stop.wait(every):
            try:
                self.reap(time.monotonic())
                if also is not None:
                    also()
            except Exception:  # pragma: no cover - keep reaping whatever one pass hit
                log.exception("claim reaper pass failed")

    def reap(self, now: float) -> None:
        """Reclaim expired claims, except reservations whose owner is alive and maps this
        namespace's arenas (it may still be writing into its slots: they stay its own).

        Leases expire on the timeout alone: a client that reads after its lease was reclaimed
        learns it at ``release`` (``unknown_lease``) and fetches the bytes again, so a lease
        orphaned by a retried or failed ``get`` never pins blocks for good. An owner that
        names another process (pid 1...) does not map our arenas, so its claims expire too.
        O(open claims) per pass plus one /proc read per distinct owner.
        """
        with self._lock:
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
        with self._lock:
            claims = [c for c in map(self._forget, dead) if c is not None]
        if not claims:
            return
        for c in claims:
            try:
                drop_claim(c)
            except Exception:
                log.exception("could not reclaim a %s", c.kind)
        self._count("reclaimed", len(claims))
        log.warning("reclaimed %d lease(s)/reservation(s) after %.1f s (leases on the timeout; reservations "
                    "of clients that died, cannot be checked, or do not map the arenas)",
                    len(claims), self.options.lease_timeout_s)


@dataclass
class Registered:
    """An engine's GPU pool a client registered, opened in this process by CUDA IPC."""

    ns: Namespace
    pool: torch.Tensor | list[torch.Tensor]
    peer: bytes | None
    owner: tuple[int, int] | None


class GpuPools:
    """The pools clients registered with this sidecar (see :mod:`kvstore.sidecar.gpu_pool`).
    Ids are random (a capability); at most :data:`MAX_POOLS_PER_PEER` per connection.
    Thread-safe; O(1) per call except :meth:`add` and :meth:`reap` (O(pools))."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[int, Registered] = {}

    def add(self, reg: Registered) -> int:
        with self._lock:
            mine = sum(1 for r in self._pools.values() if r.peer == reg.peer)
            if mine >= MAX_POOLS_PER_PEER:
                raise BusyError(f"this connection has {mine} GPU pools registered, the limit is {MAX_POOLS_PER_PEER}")
            pid = secrets.randbits(62) or 1  # a capability: not guessable by another client
            self._pools[pid] = reg
            return pid

    def get(self, pid: Any, ns: Namespace) -> Registered:
        with self._lock:
            reg = self._pools.get(pid) if isinstance(pid, int) else None
        if reg is None or reg.ns is not ns:
            raise InvalidInputError(f"no GPU pool {pid!r} registered in this namespace (unregistered, its owner "
                                    "exited, or the sidecar restarted): register it again")
        return reg

    def drop(self, pid: Any) -> bool:
        with self._lock:
            return self._pools.pop(pid, None) is not None if isinstance(pid, int) else False

    def reap(self) -> int:
        """Drop the pools whose owner process is gone. O(pools)."""
        with self._lock:
            gone = [pid for pid, r in self._pools.items() if r.owner is not None and not owner_alive(r.owner)]
            for pid in gone:
                del self._pools[pid]
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._pools.clear()

    def __len__(self) -> int:
        return len(self._pools)
