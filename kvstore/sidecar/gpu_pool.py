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
"""

from __future__ import annotations

from dataclasses import dataclass
import secrets
import threading
from typing import TYPE_CHECKING, Any

import torch

from allocator.rowcopy import DEFAULT_COPIER
from kvstore import paged
from kvstore.errors import BusyError, InvalidInputError
from kvstore.layout import dtype_from_name, dtype_name
from kvstore.sidecar.procinfo import owner_alive
from kvstore.sidecar.protocol import RemoteError, arg

if TYPE_CHECKING:  # pragma: no cover
    from kvstore.sidecar.server import Namespace

#: registered pools one connection may hold at once
MAX_POOLS_PER_PEER = 16
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
    ``RemoteError("unsupported")`` when this process has no CUDA."""
    if not isinstance(desc, dict) or any(k not in desc for k in _KEYS):
        raise InvalidInputError(f"a shared pool tensor is described by {', '.join(_KEYS)}")
    ints = ("device", "storage_bytes", "storage_offset_bytes", "ref_offset", "offset")
    if not all(isinstance(desc[k], int) and not isinstance(desc[k], bool) and desc[k] >= 0 for k in ints) or \
            not all(isinstance(desc[k], bytes) for k in ("handle", "ref_handle", "event_handle")) or \
            not all(isinstance(desc[k], list) and all(isinstance(v, int) and v >= 0 for v in desc[k])
                    for k in ("shape", "stride")) or len(desc["shape"]) != len(desc["stride"]):
        raise InvalidInputError("malformed shared pool tensor description")
    if not torch.cuda.is_available():
        raise RemoteError("this sidecar has no CUDA: it cannot open a GPU pool (load_into/save_from of a GPU "
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


@dataclass
class Registered:
    ns: "Namespace"
    pool: torch.Tensor | list[torch.Tensor]
    peer: bytes | None
    owner: tuple[int, int] | None


class GpuPools:
    """The pools clients registered with this sidecar (see module doc)."""

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

    def get(self, pid: Any, ns: "Namespace") -> Registered:
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


def op_register_pool(server, args: dict) -> dict:
    """``register_pool {ns, tensors, owner}``: open a client's CUDA pool (one tensor: a
    cross-layer pool; one per layer: a per-layer pool) and check it against the namespace's
    layout. Only a client of this host (its ``owner`` checkable here) may. Replies ``{pool}``."""
    from kvstore.sidecar.procinfo import owner_from_wire

    ns = server._namespace(args)
    owner = owner_from_wire(args.get("owner"), server._host)
    if owner is None or not owner_alive(owner):
        raise InvalidInputError("register_pool is for a client process on the sidecar's own host")
    descs = arg(args, "tensors", list)
    if not 1 <= len(descs) <= 1024:
        raise InvalidInputError("tensors must name 1 (cross-layer) or one per layer (per-layer) pool tensors")
    tensors = [open_tensor(d) for d in descs]
    pool: torch.Tensor | list[torch.Tensor] = tensors[0] if len(tensors) == 1 else tensors
    paged.pool_rows(ns.layout, ns.block_tokens, pool)  # the store's shape and dtype checks
    peer = args.get("@peer")
    return {"pool": server._gpu_pools.add(Registered(ns, pool, getattr(peer, "ident", None), owner))}


def _on_pool(server, args: dict, call) -> int:
    """Run ``call(store, tokens, pool, block_ids)`` on a registered GPU pool, then wait for the
    streams of the pool's own device(s) (not the worker thread's current device)."""
    ns = server._namespace(args)
    reg = server._gpu_pools.get(args.get("pool"), ns)
    n = call(ns.store, server._tokens(args), reg.pool, arg(args, "block_ids", list))
    DEFAULT_COPIER.wait(*([reg.pool] if isinstance(reg.pool, torch.Tensor) else reg.pool))
    return int(n)


def op_load_pool(server, args: dict) -> int:
    """``load_pool {ns, pool, tokens, block_ids, start?}``: the store's ``load_into`` straight
    into a registered GPU pool (``start``: its first block to copy, default 0; a sidecar
    that predates it refuses the shorter ``block_ids``, never writes other blocks);
    answered once the bytes are in."""
    start = arg(args, "start", int, required=False, default=0)
    return _on_pool(server, args, lambda store, *a: store.load_into(*a, start=start))


def op_save_pool(server, args: dict) -> int:
    """``save_pool {ns, pool, tokens, block_ids}``: the store's ``save_from`` straight out of
    a registered GPU pool; the blocks are visible once this answers."""
    return _on_pool(server, args, lambda store, *a: store.save_from(*a))


def op_unregister_pool(server, args: dict) -> bool:
    ns = server._namespace(args)
    server._gpu_pools.get(args.get("pool"), ns)
    return server._gpu_pools.drop(args.get("pool"))
