"""The store ops of the sidecar: ``lookup``, ``put``, ``get``, ``plan``, ``clear``.

Each is a handler ``(ctx, args, payload) -> (result, frames)`` of
:mod:`kvstore.sidecar.dispatch`'s op table: it finds the namespace through its
:class:`~kvstore.sidecar.context.Context` and calls the namespace's store. KV travels as
tensor frames here (``put`` takes them, ``get`` replies with them), except a ``get`` with
``shm`` from a client that maps the namespace's arenas, which is answered with a lease on
the slots (:func:`kvstore.sidecar.shm_plane.lease_reply`; the loop grants such a lease
itself when it can without waiting, :func:`lease_nowait`). The put over shared memory is
:mod:`kvstore.sidecar.shm_plane`'s. The loop answers short lookups itself; a long one
comes here.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from allocator.memory import MemoryArena
from allocator.rowcopy import copy_rows
from kvstore.layout import as_block_rows
from kvstore.restore.summary import plan_result
from kvstore.sidecar import limits
from kvstore.sidecar.context import Context, no_payload
from kvstore.sidecar.namespaces import PEER, Namespace
from kvstore.sidecar.protocol import ProtocolError, arg, tensor_desc, tensor_frame, tensor_from_frame
from kvstore.sidecar.shm_plane import copy_is_intact, lease_reply
from kvstore.validate import check_start


def op_lookup(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``lookup {ns, tokens, exact?}``: how many leading tokens are cached. O(tokens)."""
    no_payload("lookup", payload)
    ns = ctx.namespace(args)
    return ns.store.lookup(ctx.tokens(args), exact=arg(args, "exact", bool, required=False)), []


def op_put(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``put {ns, tokens, kv, act?}`` with the KV (and the activations) as payload frames."""
    ns = ctx.namespace(args)
    tokens = ctx.tokens(args)
    want = 2 if args.get("act") is not None else 1
    if len(payload) != want:
        raise ProtocolError(f"put takes {want} payload frame(s) (the KV{', then the activations' if want == 2 else ''}), "
                            f"got {len(payload)}")
    kv = tensor_from_frame(payload[0], arg(args, "kv", dict))
    act = tensor_from_frame(payload[1], arg(args, "act", dict)) if want == 2 else None
    return ns.store.put(tokens, kv, activations=act), []


def op_get(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``get {ns, tokens, exact?, shm?, start?}``: a lease on shared slots (``shm`` and a
    shared tier holding the blocks; it names the whole prefix) or the KV as one tensor
    frame, its bytes held against the peer's reply budget until ZeroMQ lets go of them.
    ``start`` (a frame reply only): the KV of blocks ``start...`` alone -- a ``load_into``
    whose engine holds the blocks before it -- though the whole prefix must be cached."""
    no_payload("get", payload)
    ns = ctx.namespace(args)
    tokens = ctx.tokens(args)
    exact = arg(args, "exact", bool, required=False)  # None: the namespace's lossy_ok decides
    start = check_start(arg(args, "start", int, required=False, default=0), len(tokens) // ns.block_tokens)
    if arg(args, "shm", bool, required=False, default=False) and ns.seg_of_tier:
        lease = ns.store.port.acquire(tokens, list(ns.seg_of_tier), exact=exact)
        if lease is not None:
            cid = ctx.claims.add("lease", ns, lease, args)
            return lease_reply(ns, cid, lease), []
    # The reply's bytes count against the reply budget until ZeroMQ lets go of them
    # (reserved before the tensor is built: a peer over its budget costs nothing).
    peer = args[PEER].ident
    nbytes = (len(tokens) // ns.block_tokens - start) * ns.block_tokens * ns.layout.kv_bytes_per_token
    ctx.replies.reserve(peer, nbytes)
    try:
        kv = get_one_copy(ns, tokens, exact, start)
    except BaseException:
        ctx.replies.release(peer, nbytes)
        raise
    ctx.hold_reply(peer, nbytes)
    return {"mode": "frames", "kv": tensor_desc(kv)}, [tensor_frame(kv)]


def lease_nowait(ctx: Context, args: dict, max_tokens: int) -> dict | None:
    """``get``'s shared-memory reply, for the loop thread: the lease when the request asks
    for shared memory, has at most ``max_tokens`` tokens, the namespace's store lock is free
    right now and every block sits in a shared tier; None: a worker runs the whole ``get``
    (and finds the same answer or takes the slow way). Never waits on a lock; O(tokens)."""
    if not arg(args, "shm", bool, required=False, default=False):
        return None
    ns = ctx.namespace(args)
    if not ns.seg_of_tier:
        return None
    tokens = ctx.tokens(args)
    if len(tokens) > max_tokens:
        return None
    exact = arg(args, "exact", bool, required=False)
    check_start(arg(args, "start", int, required=False, default=0), len(tokens) // ns.block_tokens)  # as op_get
    port = ns.store.port
    with port.nowait() as held:
        if not held:
            return None
        lease = port.acquire(tokens, list(ns.seg_of_tier), exact=exact)
        if lease is None:
            return None
        # still under the store lock: a claim refused (busy) is released without waiting
        return lease_reply(ns, ctx.claims.add("lease", ns, lease, args), lease)


def get_one_copy(ns: Namespace, tokens: Any, exact: bool | None = None, start: int = 0) -> torch.Tensor:
    """``store.get`` (of blocks ``start...``; the whole prefix must be cached) with one copy
    when every block is in a memory tier: pin the blocks, copy each run of consecutive slots
    from ``start`` straight into its place in the result, unpin. Blocks on disk (or a miss)
    take ``store.get``'s path (two copies, counts the miss). O(bytes copied)."""
    store = ns.store
    memory = [t for t, (_, arena) in enumerate(store.port.tier_arenas()) if isinstance(arena, MemoryArena)]
    lease = store.port.acquire(tokens, memory, exact=exact) if memory else None
    if lease is None:
        return _tail(store.get(tokens, device="cpu", exact=exact), start, store.block_tokens)
    try:
        lay, bt, nb = store.layout, store.block_tokens, len(lease.blocks) - start
        block_shape = lay.block_shape(bt)
        out = limits.reply_buffer(lay.kv_bytes_per_token * nb * bt).view(lay.dtype).view(lay.kv_shape(nb * bt))
        out6 = as_block_rows(out, bt, nb)
        arenas = store.port.tier_arenas()
        for t, in_tier in itertools.groupby(enumerate(lease.blocks[start:]), key=lambda e: e[1][0]):
            pos, slots = zip(*((p, slot) for p, (_, slot) in in_tier))
            copy_rows(arenas[t][1].rows(lay.dtype, block_shape), slots, out6, pos)
        if copy_is_intact(store, lease, out6, start):
            return out
    finally:
        store.port.release(lease)
    # A shared slot changed after it was written: read again through the store, which
    # verifies each block, drops the corrupt ones and reports them missing.
    return _tail(store.get(tokens, device="cpu", exact=exact), start, store.block_tokens)


def _tail(kv: torch.Tensor, start: int, block_tokens: int) -> torch.Tensor:
    """Tokens from block ``start`` on of a ``[layers, 2, T, ...]`` KV, contiguous."""
    return (kv[:, :, start * block_tokens:] if start else kv).contiguous()


def op_plan(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``plan {ns, tokens, profile?}``: the restore planner's verdict as plain data."""
    no_payload("plan", payload)
    ns = ctx.namespace(args)
    return plan_result(ns.store, ctx.tokens(args), arg(args, "profile", dict, required=False)), []


def op_clear(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``clear {ns}``: drop every block of the namespace."""
    no_payload("clear", payload)
    return ctx.namespace(args).store.clear(), []
