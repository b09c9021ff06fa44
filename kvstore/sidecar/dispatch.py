"""Dispatch: which handler serves which op, written out.

:data:`OP_TABLE` maps every op of the protocol (:data:`kvstore.sidecar.protocol.OPS`) to
its handler, so a search for an op's name finds who serves it. Handlers are grouped by what
they serve: the session (:mod:`~kvstore.sidecar.session_ops`), the store
(:mod:`~kvstore.sidecar.store_ops`), the shared-memory plane
(:mod:`~kvstore.sidecar.shm_plane`) and the engines' GPU pools
(:mod:`~kvstore.sidecar.gpu_pool`). Each is ``handler(ctx, args, payload) -> (result,
frames)``; :func:`bind` gives the server the table with its context bound in. O(ops) to bind.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Callable, Mapping

from kvstore.sidecar import gpu_pool, session_ops, shm_plane, store_ops
from kvstore.sidecar.context import Context, Handler

OP_TABLE: Mapping[str, Handler] = MappingProxyType({
    # the session
    "hello": session_ops.op_hello,
    "health": session_ops.op_health,
    "stats": session_ops.op_stats,
    # the store (KV as frames; a get may answer with a lease on shared slots)
    "lookup": store_ops.op_lookup,
    "put": store_ops.op_put,
    "get": store_ops.op_get,
    "plan": store_ops.op_plan,
    "clear": store_ops.op_clear,
    # the shared-memory plane
    "stage": shm_plane.op_stage,
    "put_shm": shm_plane.op_put_shm,
    "reserve": shm_plane.op_reserve,
    "commit": shm_plane.op_commit,
    "release": shm_plane.op_release,
    # the engines' GPU pools (CUDA IPC)
    "register_pool": gpu_pool.op_register_pool,
    "load_pool": gpu_pool.op_load_pool,
    "save_pool": gpu_pool.op_save_pool,
    "unregister_pool": gpu_pool.op_unregister_pool,
})


def bind(ctx: Context) -> dict[str, Callable[[dict, list], tuple[Any, list]]]:
    """The op table with ``ctx`` bound into each handler: ``table[op](args, payload)``.
    A dict of the server's own (a test may replace one entry of it)."""
    return {op: functools.partial(handler, ctx) for op, handler in OP_TABLE.items()}
