"""The shared-memory data plane of the sidecar: arena identity, staged puts, verified reads.

Why this shape
--------------
A client on the sidecar's host maps the namespace's shared arenas and copies KV in and out
itself, so the sidecar moves slot numbers, not bytes. Three things make that safe:

* **Identity.** Every arena has a random ``ident`` (its generation). Every reply that
  names slots also names the idents of the namespace's arenas (``arena``), and every
  request that names slots carries the idents the client mapped. A client whose mapping is
  stale (the sidecar restarted and the namespace got new arenas) sees the mismatch, maps
  again and retries -- the server refuses its request with ``stale_arena`` too -- so it
  never writes into an unlinked arena that nobody reads.
* **Checksums from the writer's own source.** Shared slots can be written by anyone who
  maps them (a late writer, a hostile process of the same uid). A put carries the xxh3-64
  of each block, hashed by the client from its private KV beside the copy (not from the
  shared slot); the arena records them; every reader verifies its *private copy* against
  them (the client after its copy, the server when it copies out, demotes or writes through
  to disk). A slot changed after its writer copied it reads as corrupt -- the block is
  dropped and reported missing -- never as other bytes.
* **Staged slots, one round trip per put.** A client holds a few free slots of the put
  tier (a *staging* claim, topped up in every put reply): it writes its blocks there and
  sends one ``put_shm`` naming them; the server indexes the new blocks where they lie (no
  copy) and hands the slots of blocks already cached back to the staging set. Staged slots
  belong to that client until it releases them or dies (the same liveness rule as leases),
  so no slot is handed to another writer while its holder can still write it.

The ops of this plane are here: ``stage``, ``put_shm``, ``reserve`` / ``commit`` (the put in
two round trips) and ``release``; each is a handler ``(ctx, args, payload)`` of
:mod:`kvstore.sidecar.dispatch`'s op table and sees the sidecar through its
:class:`~kvstore.sidecar.context.Context` (namespaces, claims), never the server. A ``get``
over shared memory is :mod:`kvstore.sidecar.store_ops`'s and replies with :func:`lease_reply`.

Costs per put: one copy into shared memory with the hash of the source beside it (max of
the two on two cores), one message; per get: one message, one copy out, one hash of the
private copy, and a release that the client does not wait for.
"""

from __future__ import annotations

from typing import Any

from allocator.checksum import digests, from_wire, to_wire
from kvstore.errors import InvalidInputError
from kvstore.sidecar.claims import Staging, drop_claim, drop_staging
from kvstore.sidecar.context import Context, no_payload
from kvstore.sidecar.namespaces import STAGING_FRACTION, STAGING_MIN, Namespace, spare_slots
from kvstore.sidecar.protocol import StaleArenaError, UnknownLeaseError, arg

#: what this module gives its importers (the staging knobs live with the arenas they size)
__all__ = ["STAGING_FRACTION", "STAGING_MIN", "Staging", "check_arena", "copy_is_intact", "drop_staging", "idents",
           "lease_reply", "op_commit", "op_put_shm", "op_release", "op_reserve", "op_stage", "release_corrupt",
           "reserve_extra", "spare_of", "spare_slots", "sums_arg", "top_up"]


def idents(ns: Namespace) -> list[int]:
    """The identity of each shared arena of ``ns``, in segment order."""
    return [seg["ident"] for seg in ns.segments]


def check_arena(ns: Namespace, args: dict) -> None:
    """Refuse a request that names slots of arenas other than the namespace's current ones."""
    got = args.get("arena")
    if got != idents(ns):
        raise StaleArenaError(f"namespace {ns.name[:100]!r} has other shared arenas than this client mapped "
                              "(the sidecar restarted or the namespace was recreated): map them again")


def sums_arg(args: dict, n: int):
    try:
        return from_wire(arg(args, "sums", bytes), n)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def lease_reply(ns: Namespace, cid: int, lease) -> dict:
    """A get's shared-memory reply: slots, their checksums and the arenas' identity."""
    return {"mode": "shm", "claim": cid, "arena": idents(ns),
            "blocks": [[ns.seg_of_tier[t], slot] for t, slot in lease.blocks],
            "sums": to_wire(ns.store.port.lease_checksums(lease))}


def _staged_reply(ns: Namespace, cid: int, st: Staging, extra: dict | None = None) -> dict:
    return {"mode": "shm", "claim": cid, "seg": ns.seg_of_tier[st.tier], "slots": sorted(st.slots),
            "arena": idents(ns), **(extra or {})}


def spare_of(ns: Namespace) -> int:
    return ns.store.port.staging_spare(ns.put_tier)


def top_up(ns: Namespace, st: Staging) -> None:
    """Stage slots until the client holds ``st.target`` (as many as room can be made for)."""
    short = st.target - len(st.slots)
    if short > 0:
        st.slots.update(ns.store.port.stage(st.tier, short))


def op_stage(ctx: Context, args: dict, payload: list) -> tuple[dict, list]:
    """``stage {ns, blocks, claim?}``: hold at least ``blocks`` free slots for this client's
    puts (topping up its staging claim, or opening one). ``mode: frames`` when the namespace
    has no shared tier. O(blocks)."""
    no_payload("stage", payload)
    ns = ctx.namespace(args)
    if ns.put_tier is None:
        return {"mode": "frames"}, []
    want = arg(args, "blocks", int)
    num_slots = spare_of(ns)
    if want <= 0:
        raise InvalidInputError(f"blocks must be positive, got {want}")
    cid = args.get("claim")
    claim = ctx.claims.staging(cid, ns) if cid is not None else None
    if claim is None:
        cid = ctx.claims.add("staging", ns, Staging(ns.put_tier), args)
        claim = ctx.claims.staging(cid, ns)
    st: Staging = claim.obj
    with st.lock:
        st.target = min(num_slots, max(st.target, want))
        top_up(ns, st)
        return _staged_reply(ns, cid, st), []


def op_put_shm(ctx: Context, args: dict, payload: list) -> tuple[dict, list]:
    """``put_shm {ns, tokens, claim, slots, sums, arena}``: the put of blocks the client
    already wrote into its staged ``slots`` (one per block, in order) with their checksums.
    Replies ``{tokens, used, slots, seg, arena}``: the cached prefix (as ``put``), the slots
    consumed, and the client's staged slots after the top-up. O(blocks)."""
    no_payload("put_shm", payload)
    ns = ctx.namespace(args)
    check_arena(ns, args)
    tokens = ctx.tokens(args)
    cid = arg(args, "claim", int)
    claim = ctx.claims.staging(cid, ns)
    if claim is None:
        raise UnknownLeaseError(f"no open staging claim {cid} (released, reclaimed or never granted)")
    st: Staging = claim.obj
    nb = len(tokens) // ns.block_tokens
    slots = arg(args, "slots", list)
    if len(slots) != nb or not all(isinstance(s, int) and not isinstance(s, bool) for s in slots):
        raise InvalidInputError(f"slots must be {nb} ints (one staged slot per block), got {len(slots)}")
    sums = sums_arg(args, nb)
    with st.lock:  # a client's concurrent puts must not name one staged slot twice
        if len(set(slots)) != nb or not st.slots.issuperset(slots):
            raise InvalidInputError("slots must be distinct slots staged for this claim")
        st.slots.difference_update(slots)
        try:
            cached, used = ns.store.port.put_staged(tokens, st.tier, slots, sums)
        except BaseException:
            st.slots.update(slots)
            raise
        st.slots.update(set(slots) - set(used))
        st.target = min(max(st.target, nb), spare_of(ns))
        top_up(ns, st)
        return _staged_reply(ns, cid, st, {"tokens": cached, "used": used}), []


def op_reserve(ctx: Context, args: dict, payload: list) -> tuple[dict, list]:
    """``reserve {ns, tokens}``: the first round trip of a two-step put: slots of the put
    tier the client writes into, then names in ``commit``. ``mode: done`` when every block
    is cached, ``frames`` when there is no shared tier or no room. O(blocks)."""
    no_payload("reserve", payload)
    ns = ctx.namespace(args)
    tokens = ctx.tokens(args)
    if ns.put_tier is None:
        return {"mode": "frames"}, []
    res = ns.store.port.reserve(tokens, ns.put_tier)
    if res is None:
        return {"mode": "frames"}, []
    if res.done:
        return {"mode": "done", "tokens": res.cached}, []
    cid = ctx.claims.add("reservation", ns, res, args)
    seg = ns.seg_of_tier[res.tier]
    return {"mode": "shm", "claim": cid, **reserve_extra(ns),
            "blocks": [[pos, seg, slot] for pos, slot in zip(res.positions, res.slots)]}, []


def op_commit(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``commit {claim, sums, arena}``: ``sums`` are the writer's checksums of the
    reserved slots (from its own source); without them the commit is refused."""
    no_payload("commit", payload)
    claim = ctx.claims.take(args, "reservation")
    try:
        check_arena(claim.ns, args)
        sums = sums_arg(args, len(claim.obj.slots))
    except BaseException:
        drop_claim(claim)
        raise
    return claim.ns.store.port.commit(claim.obj, sums), []


def op_release(ctx: Context, args: dict, payload: list) -> tuple[Any, list]:
    """``release {claim, corrupt?}``: give back a lease, reservation or staging claim;
    ``corrupt`` names lease blocks whose copy failed its checksum (dropped if they are)."""
    no_payload("release", payload)
    claim = ctx.claims.take(args)
    try:
        dropped = release_corrupt(claim.ns, claim.obj, args) if claim.kind == "lease" else 0
    finally:
        drop_claim(claim)
    return True if not dropped else {"corrupt_dropped": dropped}, []


def release_corrupt(ns: Namespace, lease, args: dict) -> int:
    """A client's copy of some lease blocks failed their checksums: drop those that are."""
    positions = arg(args, "corrupt", list, required=False, default=None)
    if not positions:
        return 0
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        raise InvalidInputError("corrupt must be a list of block positions")
    return ns.store.port.report_corrupt(lease, positions)


def copy_is_intact(store, lease, out6, start: int = 0) -> bool:
    """Whether the server's private copy ``out6`` (``[blocks, ...]``) of a lease's blocks
    ``start...`` matches the checksums recorded for those in checksummed (shared) arenas.
    O(bytes)."""
    arenas = store.port.tier_arenas()
    blocks = lease.blocks[start:]
    shared = [i for i, (t, _) in enumerate(blocks) if hasattr(arenas[t][1], "checksums")]
    if not shared:
        return True
    got = digests(out6[shared] if len(shared) < len(blocks) else out6)
    want = store.port.lease_checksums(lease)[start:][shared]
    return bool((got == want).all())


def reserve_extra(ns: Namespace) -> dict[str, Any]:
    return {"arena": idents(ns)}
