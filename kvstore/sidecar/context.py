"""What a request handler may use of the sidecar: :class:`Context`, passed to every handler.

Handlers (:mod:`~kvstore.sidecar.store_ops`, :mod:`~kvstore.sidecar.session_ops`,
:mod:`~kvstore.sidecar.shm_plane`, :mod:`~kvstore.sidecar.gpu_pool`) see the namespaces,
the claims, the GPU pools, the reply budget, the counters and the knobs through this object,
never the server: the server builds one context, binds it into its op table
(:mod:`~kvstore.sidecar.dispatch`) and nothing below it imports the server. What the loop
itself knows (its endpoint, uptime, queue) comes through the :class:`LoopStatus` protocol.

Every handler has the signature ``handler(ctx, args, payload) -> (result, frames)``. O(1)
per accessor.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from kvstore.errors import InvalidInputError
from kvstore.sidecar.claims import ClaimBook, GpuPools
from kvstore.sidecar.limits import ReplyBudget
from kvstore.sidecar.metrics import Counters
from kvstore.sidecar.namespaces import Namespace, NamespaceBook
from kvstore.sidecar.options import ServerOptions
from kvstore.sidecar.protocol import ProtocolError, arg, tokens_from_wire


class LoopStatus(Protocol):
    """What the loop tells the session ops (``health``, ``stats``) about itself."""

    @property
    def endpoint(self) -> str: ...

    def uptime_s(self) -> float: ...

    def queued(self) -> int: ...


class Context:
    """The sidecar as its handlers see it (see module doc). Thread-safe: its parts are."""

    def __init__(self, options: ServerOptions, namespaces: NamespaceBook, claims: ClaimBook, gpu_pools: GpuPools,
                 replies: ReplyBudget, counters: Counters, host: str, curve: bool, loop: LoopStatus) -> None:
        self.options = options
        self.namespaces = namespaces
        self.claims = claims
        self.gpu_pools = gpu_pools
        self.replies = replies
        self.counters = counters
        #: this host's identity: a client that names the same host may map shared memory
        self.host = host
        #: CurveZMQ is on: tenants are separated, one sees no server-wide figures
        self.curve = curve
        self.loop = loop
        self._local = threading.local()

    def namespace(self, args: dict) -> Namespace:
        """The namespace the request names (``unknown_namespace``, ``forbidden``)."""
        return self.namespaces.get(args)

    def tokens(self, args: dict) -> Any:
        """The request's tokens, at most ``max_tokens`` of them (else ``invalid_argument``)."""
        raw = arg(args, "tokens", (bytes, list))
        n = len(raw) // 4 if isinstance(raw, bytes) else len(raw)
        if n > self.options.max_tokens:
            raise InvalidInputError(f"{n} tokens in one request exceeds the server's limit of "
                                    f"{self.options.max_tokens}")
        return tokens_from_wire(raw)

    def hold_reply(self, peer: bytes, nbytes: int) -> None:
        """Say that the reply this worker thread is building holds ``nbytes`` of ``peer``'s
        reply budget (reserved by the handler) until ZeroMQ lets go of its frames."""
        self._local.grant = (peer, nbytes)

    def take_reply_grant(self) -> tuple[bytes, int] | None:
        """The grant :meth:`hold_reply` recorded on this thread, cleared (None if none)."""
        grant, self._local.grant = getattr(self._local, "grant", None), None
        return grant


def no_payload(op: str, payload: list) -> None:
    """Refuse payload frames on an op that takes none (``bad_frame``)."""
    if payload:
        raise ProtocolError(f"{op} takes no payload frames, got {len(payload)}")


#: an op's handler: ``(ctx, args, payload) -> (result, reply frames)``
Handler = Callable[[Context, dict, list], tuple[Any, list]]
