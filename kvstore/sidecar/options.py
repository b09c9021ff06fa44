"""The sidecar's own knobs (:class:`ServerOptions`); store capacities come from the ``StoreConfig``.

Its own module so that every room of the sidecar (namespaces, claims, handlers, the loop)
can read the knobs without importing the server. :func:`kvstore.sidecar.limits.option_problems`
checks them before the server binds.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    #: lookups and shared-memory gets (leases) of up to this many tokens are answered on the
    #: loop thread when the store lock is free; longer ones (their hashing is O(tokens)) go to
    #: a worker, so they never stall other clients
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
