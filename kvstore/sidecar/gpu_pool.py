"""An engine's GPU pool reached from the sidecar by CUDA IPC: blocks move by DMA between the
sidecar's host tier and the engine's GPU memory, never through the engine's CPU memory.

Why this shape
--------------
A client on the sidecar's host whose KV pool is in CUDA memory registers the pool once
(``register_pool``): it exports each pool tensor's storage with torch's CUDA IPC
(``UntypedStorage._share_cuda_``, the mechanism ``torch.multiprocessing`` uses -- it carries
the offset of the tensor inside the caching allocator's block, which a bare
``cudaIpcGetMemHandle`` of the pointer would not) and the sidecar opens the handles
(:func:`open_tensor`) into tensors over the same GPU memory. ``load_pool`` / ``save_pool``
then name the registered pool and block ids, and the sidecar runs its store's own
``load_into`` / ``save_from`` on the opened pool: blocks cross between the host tier and the
engine's GPU memory by DMA, verified against their checksums on the host side (a block
changed in shared memory after it was written is reported missing, the pool untouched), and
the sidecar synchronises its stream before it answers, so the bytes are in when the client
reads the reply. The client synchronises its own stream before it asks (its kernels have
written what a save reads, and no kernel still reads what a load overwrites).

Lifetime: a registration belongs to the connection and the process (``owner``) that made
it; it ends at ``unregister_pool``, when the client closes, or when the sidecar finds the
owner process gone (the reaper), so the sidecar never keeps another process's GPU memory
mapped for long. At most :data:`MAX_POOLS_PER_PEER` per connection (``busy`` beyond).

Every path here needs CUDA on both sides and the same host; nothing here runs without a GPU
(the tests marked ``cuda`` cover it on a GPU host). O(1) per call plus the store's copy.
The ops are handlers ``(ctx, args, payload)`` of :mod:`kvstore.sidecar.dispatch`'s op table
and see the sidecar through its :class:`~kvstore.sidecar.context.Context`; the registry of
opened pools (:class:`GpuPools`) is :mod:`kvstore.sidecar.claims`'.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from allocator.rowcopy import DEFAULT_COPIER
from kvstore import paged
from kvstore.errors import InvalidInputError
from kvstore.layout import dtype_from_name, dtype_name
from kvstore.sidecar.claims import MAX_POOLS_PER_PEER, GpuPools, Registered
from kvstore.sidecar.context import Context, no_payload
from kvstore.sidecar.namespaces import peer_ident
from kvstore.sidecar.procinfo import owner_alive, owner_from_wire
from kvstore.sidecar.protocol import SidecarError, arg

#: the registry lives with the other things the sidecar holds for a client (claims)
__all__ = ["MAX_POOLS_PER_PEER", "GpuPools", "Registered", "export_tensor", "open_tensor", "op_load_pool",
           "op_register_pool", "op_save_pool", "op_unregister_pool"]
_KEYS = ("device", "handle", "storage_bytes", "storage_offset_bytes", "ref_handle", "ref_offset", "event_handle",
         "event_sync", "shape", "stride", "offset", "dtype")


def export_tensor(t: torch.Tensor) -> dict:
    """What another process on this host needs to open CUDA tensor ``t`` (msgpack-able).
    The caller must keep ``t`` alive while the other side uses it."""
    if t.device.type != "cuda":
        raise InvalidInputError(f"only a CUDA tensor can be shared by CUDA IPC, got one on {t.device}")
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = t.untyped_storage()._share_cuda_()
    return {"device": int(device), "handle": bytes(handle), "storage_bytes": int(size_bytes),
            "storage_offset_bytes": int(offset_bytes), "ref_handle": bytes(ref_handle), "ref_offset": int(ref_offset),
            "event_handle": bytes(event_handle) if event_handle else b"", "event_sync": bool(event_sync),
            "shape": list(t.shape), "stride": list(t.stride()), "offset": int(t.storage_offset()),
            "dtype": dtype_name(t.dtype)}


def open_tensor(desc: Any) -> torch.Tensor:
    """The tensor :func:`export_tensor` described, over the same GPU memory (another process
    of this host). Raises ``InvalidInputError`` for a malformed description and
    ``SidecarError("unsupported")`` when this process has no CUDA."""
    if not isinstance(desc, dict) or any(k not in desc for k in _KEYS):
        raise InvalidInputError(f"a shared pool tensor is described by {', '.join(_KEYS)}")
    ints = ("device", "storage_bytes", "storage_offset_bytes", "ref_offset", "offset")
    if not all(isinstance(desc[k], int) and not isinstance(desc[k], bool) and desc[k] >= 0 for k in ints) or \
            not all(isinstance(desc[k], bytes) for k in ("handle", "ref_handle", "event_handle")) or \
            not all(isinstance(desc[k], list) and all(isinstance(v, int) and v >= 0 for v in desc[k])
                    for k in ("shape", "stride")) or len(desc["shape"]) != len(desc["stride"]):
        raise InvalidInputError("malformed shared pool tensor description")
    if not torch.cuda.is_available():
        raise SidecarError("this sidecar has no CUDA: it cannot open a GPU pool (load_into/save_from of a GPU "
                          "pool then go through the client's pinned buffer)", "unsupported")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        dtype = dtype_from_name(desc["dtype"])
    except (KeyError, ValueError, TypeError):
        raise InvalidInputError(f"unknown dtype {desc['dtype']!r}") from None
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(desc["shape"]), tuple(desc["stride"]), desc["offset"],
                               torch.storage.TypedStorage, dtype, desc["device"], desc["handle"],
                               desc["storage_bytes"], desc["storage_offset_bytes"], False, desc["ref_handle"],
                               desc["ref_offset"], desc["event_handle"] or None, desc["event_sync"])


def op_register_pool(ctx: Context, args: dict, payload: list) -> tuple[dict, list]:
    """``register_pool {ns, tensors, owner}``: open a client's CUDA pool (one tensor: a
    cross-layer pool; one per layer: a per-layer pool) and check it against the namespace's
    layout. Only a client of this host (its ``owner`` checkable here) may. Replies ``{pool}``."""
    no_payload("register_pool", payload)
    ns = ctx.namespace(args)
    owner = owner_from_wire(args.get("owner"), ctx.host)
    if owner is None or not owner_alive(owner):
        raise InvalidInputError("register_pool is for a client process on the sidecar's own host")
    descs = arg(args, "tensors", list)
    if not 1 <= len(descs) <= 1024:
        raise InvalidInputError("tensors must name 1 (cross-layer) or one per layer (per-layer) pool tensors")
    tensors = [open_tensor(d) for d in descs]
    pool: torch.Tensor | list[torch.Tensor] = tensors[0] if len(tensors) == 1 else tensors
    paged.pool_rows(ns.layout, ns.block_tokens, pool)  # the store's shape and dtype checks
    return {"pool": ctx.gpu_pools.add(Registered(ns, pool, peer_ident(args), owner))}, []


def _on_pool(ctx: Context, args: dict, call: Callable[..., int]) -> int:
    """Run ``call(store, tokens, pool, block_ids)`` on a registered GPU pool, then wait for the
    streams of the pool's own device(s) (not the worker thread's current device)."""
    ns = ctx.namespace(args)
    reg = ctx.gpu_pools.get(args.get("pool"), ns)
    n = call(ns.store, ctx.tokens(args), reg.pool, arg(args, "block_ids", list))
    DEFAULT_COPIER.wait(*([reg.pool] if isinstance(reg.pool, torch.Tensor) else reg.pool))
    return int(n)


def op_load_pool(ctx: Context, args: dict, payload: list) -> tuple[int, list]:
    """``load_pool {ns, pool, tokens, block_ids, start?}``: the store's ``load_into`` straight
    into a registered GPU pool (``start``: its first block to copy, default 0; a sidecar
    that predates it refuses the shorter ``block_ids``, never writes other blocks);
    answered once the bytes are in."""
    no_payload("load_pool", payload)
    start = arg(args, "start", int, required=False, default=0)
    return _on_pool(ctx, args, lambda store, *a: store.load_into(*a, start=start)), []


def op_save_pool(ctx: Context, args: dict, payload: list) -> tuple[int, list]:
    """``save_pool {ns, pool, tokens, block_ids}``: the store's ``save_from`` straight out of
    a registered GPU pool; the blocks are visible once this answers."""
    no_payload("save_pool", payload)
    return _on_pool(ctx, args, lambda store, *a: store.save_from(*a)), []


def op_unregister_pool(ctx: Context, args: dict, payload: list) -> tuple[bool, list]:
    """``unregister_pool {ns, pool}``: the sidecar lets go of the client's GPU memory."""
    no_payload("unregister_pool", payload)
    ns = ctx.namespace(args)
    ctx.gpu_pools.get(args.get("pool"), ns)
    return ctx.gpu_pools.drop(args.get("pool")), []
