"""The sidecar's namespaces: one :class:`~kvstore.store.KVStore` each, with its shared arenas.

A namespace is created by its first ``hello`` with that client's layout and block size and
the server's capacities (the server's ``StoreConfig`` is the template); a later ``hello``
that disagrees gets ``layout_mismatch``. Memory tiers on the CPU live in shared memory
(:class:`allocator.shm.ShmArena`) that a client on the same host maps; the first shared
tier takes the puts and gets :func:`spare_slots` beyond its capacity that clients hold
staged (:mod:`kvstore.sidecar.shm_plane`), so staging never shrinks the cache.

With CurveZMQ each key has namespaces of its own (the book is keyed by (key name, name)),
so no key can learn by a ``forbidden`` or a layout error that another key's name exists;
a key may create at most ``max_namespaces_per_key``. CurveZMQ tenants get no shared memory.

Who sent a request is :class:`Peer`, set by the loop under ``args[PEER]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import hashlib
import logging
import secrets
import threading
from typing import Callable

import torch

from allocator.shm import ShmArena, shm_free_bytes
from kvstore.config import StoreConfig
from kvstore.errors import CapacityError, ForbiddenError, InvalidInputError, NamespaceOwnerError
from kvstore.layout import ModelLayout
from kvstore.sidecar import limits
from kvstore.sidecar.options import ServerOptions
from kvstore.sidecar.protocol import LayoutMismatchError, UnknownNamespaceError, arg, layout_from_wire
from kvstore.store import KVStore

log = logging.getLogger(__name__)

#: spare slots of the put tier, lent to clients as staging: a quarter of the tier's
#: capacity, at least STAGING_MIN (a put larger than what a client holds staged goes as
#: frames). Extra shared memory, beyond the configured capacity, by this much.
STAGING_FRACTION = 0.25
STAGING_MIN = 8


def spare_slots(capacity_slots: int) -> int:
    """Spare (staging) slots the put tier gets beyond ``capacity_slots``. O(1)."""
    return max(STAGING_MIN, int(capacity_slots * STAGING_FRACTION))


@dataclass(frozen=True)
class Peer:
    """Who sent a request: the ROUTER identity of its connection and, with CurveZMQ, the
    allow-list name of its key. Set by the server under ``args[PEER]`` (a client cannot
    forge it: msgpack cannot carry this type)."""

    ident: bytes
    user: str | None


PEER = "@peer"


def user_of(args: dict) -> str | None:
    """The CurveZMQ key name of the request's sender (None without CurveZMQ). O(1)."""
    peer = args.get(PEER)
    return peer.user if isinstance(peer, Peer) else None


def peer_ident(args: dict) -> bytes | None:
    """The connection that sent the request (None when the loop did not set one). O(1)."""
    peer = args.get(PEER)
    return peer.ident if isinstance(peer, Peer) else None


@dataclass
class Namespace:
    """One namespace: its store, the layout fixed by its first client and its shared arenas."""

    name: str
    store: KVStore
    layout: ModelLayout
    block_tokens: int
    segments: list[dict]          # shared arenas a client maps, in this order
    seg_of_tier: dict[int, int]   # tier index -> segment index
    put_tier: int | None          # first shared tier: where reservations land
    owner: str | None = None      # CurveZMQ key name that created it (None: no CURVE)


def check_owner(ns: Namespace, args: dict) -> None:
    """With CurveZMQ a namespace is its creator's: another key may not touch it. O(1)."""
    if ns.owner is not None and user_of(args) != ns.owner:
        raise ForbiddenError(f"namespace {ns.name[:100]!r} belongs to another client key")


class NamespaceBook:
    """The namespaces of one sidecar, keyed by (CurveZMQ key name or None, name).

    ``shm_dir`` is where shared arenas go; the server sets it when it binds (None: no
    shared memory). All methods are thread-safe; O(1) each except :meth:`all` /
    :meth:`visible` (O(namespaces)) and the creation of a namespace (its store's build).
    """

    def __init__(self, config: StoreConfig, options: ServerOptions, curve: bool) -> None:
        self.config = config
        self.options = options
        self.curve = curve
        self.shm_dir: str | None = None
        self._ns: dict[tuple[str | None, str], Namespace] = {}
        self._lock = threading.Lock()
        #: opaque per-server key: metrics label a CurveZMQ tenant's namespace by a digest, not its name
        self._label_key = secrets.token_bytes(16)

    def hello(self, args: dict) -> Namespace:
        """The namespace ``args`` names, created with the client's layout and block size if
        it does not exist yet. Raises ``capacity_exceeded`` past ``max_namespaces`` (or, with
        CurveZMQ, ``max_namespaces_per_key``), ``forbidden`` for another key's namespace and
        ``layout_mismatch`` when the client's layout differs from the first client's."""
        name = arg(args, "ns", str)
        if not name or len(name) > 256:
            raise InvalidInputError("namespace must be a non-empty string of at most 256 characters")
        layout = layout_from_wire(arg(args, "layout", dict))
        bt = arg(args, "block_tokens", int)
        if bt <= 0:
            raise InvalidInputError(f"block_tokens must be a positive int, got {bt}")
        user = user_of(args)
        with self._lock:
            ns = self._ns.get((user, name))
            if ns is None:
                if len(self._ns) >= self.options.max_namespaces:
                    raise CapacityError(f"this sidecar serves at most {self.options.max_namespaces} namespaces")
                mine = sum(1 for owner, _ in self._ns if owner == user)
                if self.curve and mine >= self.options.max_namespaces_per_key:
                    raise CapacityError(f"this client key has {mine} namespaces, the limit per key is "
                                        f"{self.options.max_namespaces_per_key}")
                try:
                    ns = self._create(name, layout, bt, user)
                except NamespaceOwnerError as exc:  # a slab on disk recorded for another key
                    raise ForbiddenError(str(exc)) from None
                self._ns[(user, name)] = ns
                if self.curve:
                    log.info("namespace %r of key %r is %s in metrics", name, user, self.metric_label(ns))
            check_owner(ns, args)
            if ns.layout != layout or ns.block_tokens != bt:
                log.warning("client pid=%s refused from namespace %r: layout/block_tokens disagree",
                            args.get("pid"), name)
                raise LayoutMismatchError(
                    f"namespace {name!r} is fixed to layout {ns.layout.to_dict()} with block_tokens="
                    f"{ns.block_tokens} by its first client; this client has {layout.to_dict()} with "
                    f"block_tokens={bt}. Use another namespace for another model.")
        return ns

    def get(self, args: dict) -> Namespace:
        """The existing namespace ``args["ns"]`` names for this sender, or ``unknown_namespace``."""
        name = arg(args, "ns", str)
        with self._lock:
            ns = self._ns.get((user_of(args), name))
        if ns is None:
            raise UnknownNamespaceError(f"namespace {name[:100]!r} is unknown to this sidecar (say hello first; "
                                        "it may have restarted)")
        check_owner(ns, args)
        return ns

    def all(self) -> list[Namespace]:
        """Every namespace (a snapshot)."""
        with self._lock:
            return list(self._ns.values())

    def visible(self, args: dict) -> list[Namespace]:
        """The namespaces the caller may see: with CurveZMQ its key's own, else all."""
        user = user_of(args)
        return [ns for ns in self.all() if ns.owner == user]

    def metric_label(self, ns: Namespace) -> str:
        """A namespace's name in metrics: as is without CurveZMQ (one tenant); with it an
        opaque digest (keyed by this server's secret), so whoever scrapes the endpoint learns
        no tenant's names. The server log maps digests to names."""
        if not self.curve:
            return ns.name
        return "ns-" + hashlib.blake2b(f"{ns.owner}\x00{ns.name}".encode(), key=self._label_key,
                                       digest_size=6).hexdigest()

    def _arena_factory(self, ns_name: str, made: list) -> Callable[[str, int, int, torch.device], ShmArena | None]:
        """Shared arenas for a namespace's memory tiers; each one made is appended to ``made``
        so a namespace that fails to open can unlink them."""
        opts = self.options
        shm_dir = self.shm_dir
        # CurveZMQ tenants never share mappable memory: ZeroMQ cannot pass a file descriptor
        # to the authenticated peer alone, and any process of our uid can open a file in
        # /dev/shm whatever its name -- so their tiers stay private memory (KV as frames).
        shared = opts.shm and not self.curve and shm_dir is not None

        def factory(tier: str, num_slots: int, slot_bytes: int, device: torch.device) -> ShmArena | None:
            if not shared or device.type != "cpu" or num_slots == 0:
                return None
            assert shm_dir is not None
            need = (num_slots + (spare_slots(num_slots) if not made else 0)) * slot_bytes
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
            spare = spare_slots(num_slots) if not made else 0
            arena = ShmArena(num_slots + spare, slot_bytes, directory=shm_dir, prefix="kvstore")
            made.append(arena)
            return arena

        return factory

    def _create(self, name: str, layout: ModelLayout, block_tokens: int, owner: str | None = None) -> Namespace:
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
