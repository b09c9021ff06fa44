"""The session ops of the sidecar: ``hello`` (join or create a namespace), ``health``, ``stats``.

Handlers ``(ctx, args, payload) -> (result, frames)`` of :mod:`kvstore.sidecar.dispatch`'s
op table; they see the sidecar through its :class:`~kvstore.sidecar.context.Context`. With
CurveZMQ a caller sees only its own key's namespaces and none of the server-wide counters.
O(namespaces + open claims) for ``health`` and ``stats``.
"""

from __future__ import annotations

import logging
from typing import Any

from kvstore.sidecar.context import Context, no_payload
from kvstore.sidecar.procinfo import owner_from_wire
from kvstore.sidecar.protocol import OPS, VERSION

log = logging.getLogger(__name__)


def op_hello(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``hello {ns, layout, block_tokens, pid, host, owner}``: join the namespace (creating
    it with this client's layout the first time); replies with what the client needs to
    talk to it: the capabilities, limits and the shared arenas it may map."""
    no_payload("hello", payload)
    ns = ctx.namespaces.hello(args)
    log.info("client pid=%s host=%s joined namespace %r", args.get("pid"), str(args.get("host", "?"))[:64], ns.name)
    opts = ctx.options
    return {"server_version": VERSION, "capabilities": list(OPS), "ns": ns.name,
            "layout": ns.layout.to_dict(), "block_tokens": ns.block_tokens,
            "block_bytes": ns.store.block_bytes,
            "shm": {"host": ctx.host, "segments": ns.segments} if ns.segments else None,
            "lease_timeout_s": opts.lease_timeout_s,
            "max_message_bytes": opts.max_message_bytes, "max_tokens": opts.max_tokens,
            "max_inflight": opts.max_inflight_per_client,
            # claims of a live same-host client are never reclaimed under it
            "owner_checked": owner_from_wire(args.get("owner"), ctx.host) is not None}, []


def op_health(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``health``: alive, and what this caller may see of the load."""
    no_payload("health", payload)
    mine = ctx.namespaces.visible(args)
    return {"status": "ok", "version": VERSION, "endpoint": ctx.loop.endpoint,
            "uptime_s": ctx.loop.uptime_s(), "namespaces": len(mine),
            "open_claims": ctx.claims.open_in(mine), "queued": ctx.loop.queued() if not ctx.curve else None}, []


def op_stats(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``stats {ns?}``: the server's figures and one namespace's store stats (or those of
    every namespace the caller may see)."""
    no_payload("stats", payload)
    visible = ctx.namespaces.visible(args)
    server = {"endpoint": ctx.loop.endpoint, "version": VERSION, "uptime_s": ctx.loop.uptime_s(),
              "open_claims": ctx.claims.open_in(visible), "replies": ctx.replies.stats()}
    if not ctx.curve:  # one tenant: the server-wide counters are its own
        server.update(ctx.counters.snapshot())
    if args.get("ns") is not None:
        return {"server": server, "namespace": ctx.namespace(args).store.stats()}, []
    return {"server": server, "namespaces": {ns.name: ns.store.stats() for ns in visible}}, []
