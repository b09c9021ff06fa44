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

Costs per put: one copy into shared memory with the hash of the source beside it (max of
the two on two cores), one message; per get: one message, one copy out, one hash of the
private copy, and a release that the client does not wait for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from typing import TYPE_CHECKING, Any

from allocator.checksum import digests, from_wire, to_wire
from kvstore.errors import InvalidInputError
from kvstore.sidecar.protocol import StaleArenaError, UnknownLeaseError, arg

if TYPE_CHECKING:  # pragma: no cover
    from kvstore.sidecar.server import Namespace


#: spare slots of the put tier, lent to clients as staging: a quarter of the tier's
#: capacity, at least STAGING_MIN (a put larger than what a client holds staged goes as
#: frames). Extra shared memory, beyond the configured capacity, by this much.
STAGING_FRACTION = 0.25
STAGING_MIN = 8


def spare_slots(capacity_slots: int) -> int:
    return max(STAGING_MIN, int(capacity_slots * STAGING_FRACTION))


@dataclass
class Staging:
    """Free slots of one tier that one client holds to write its next puts into."""

    tier: int
    slots: set[int] = field(default_factory=set)
    target: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def idents(ns: "Namespace") -> list[int]:
    """The identity of each shared arena of ``ns``, in segment order."""
    return [seg["ident"] for seg in ns.segments]


def check_arena(ns: "Namespace", args: dict) -> None:
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


def lease_reply(ns: "Namespace", cid: int, lease) -> dict:
    """A get's shared-memory reply: slots, their checksums and the arenas' identity."""
    return {"mode": "shm", "claim": cid, "arena": idents(ns),
            "blocks": [[ns.seg_of_tier[t], slot] for t, slot in lease.blocks],
            "sums": to_wire(ns.store.port.lease_checksums(lease))}


def _staged_reply(ns: "Namespace", cid: int, st: Staging, extra: dict | None = None) -> dict:
    return {"mode": "shm", "claim": cid, "seg": ns.seg_of_tier[st.tier], "slots": sorted(st.slots),
            "arena": idents(ns), **(extra or {})}


def spare_of(ns: "Namespace") -> int:
    return ns.store.port.staging_spare(ns.put_tier)


def top_up(ns: "Namespace", st: Staging) -> None:
    """Stage slots until the client holds ``st.target`` (as many as room can be made for)."""
    short = st.target - len(st.slots)
    if short > 0:
        st.slots.update(ns.store.port.stage(st.tier, short))


def op_stage(server, args: dict) -> dict:
    """``stage {ns, blocks, claim?}``: hold at least ``blocks`` free slots for this client's
    puts (topping up its staging claim, or opening one). ``mode: frames`` when the namespace
    has no shared tier. O(blocks)."""
    ns = server._namespace(args)
    if ns.put_tier is None:
        return {"mode": "frames"}
    want = arg(args, "blocks", int)
    num_slots = spare_of(ns)
    if want <= 0:
        raise InvalidInputError(f"blocks must be positive, got {want}")
    cid = args.get("claim")
    claim = server._staging_claim(cid, ns, args) if cid is not None else None
    if claim is None:
        cid = server._add_claim("staging", ns, Staging(ns.put_tier), args)
        claim = server._staging_claim(cid, ns, args)
    st: Staging = claim.obj
    with st.lock:
        st.target = min(num_slots, max(st.target, want))
        top_up(ns, st)
        return _staged_reply(ns, cid, st)


def op_put_shm(server, args: dict) -> dict:
    """``put_shm {ns, tokens, claim, slots, sums, arena}``: the put of blocks the client
    already wrote into its staged ``slots`` (one per block, in order) with their checksums.
    Replies ``{tokens, used, slots, seg, arena}``: the cached prefix (as ``put``), the slots
    consumed, and the client's staged slots after the top-up. O(blocks)."""
    ns = server._namespace(args)
    check_arena(ns, args)
    tokens = server._tokens(args)
    cid = arg(args, "claim", int)
    claim = server._staging_claim(cid, ns, args)
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
        return _staged_reply(ns, cid, st, {"tokens": cached, "used": used})


def drop_staging(ns: "Namespace", st: Staging) -> None:
    with st.lock:
        ns.store.port.unstage(st.tier, sorted(st.slots))
        st.slots.clear()


def release_corrupt(ns: "Namespace", lease, args: dict) -> int:
    """A client's copy of some lease blocks failed their checksums: drop those that are."""
    positions = arg(args, "corrupt", list, required=False, default=None)
    if not positions:
        return 0
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        raise InvalidInputError("corrupt must be a list of block positions")
    return ns.store.port.report_corrupt(lease, positions)


def copy_is_intact(store, lease, out6) -> bool:
    """Whether the server's private copy ``out6`` (``[blocks, ...]``) of a lease's blocks
    matches the checksums recorded for those in checksummed (shared) arenas. O(bytes)."""
    arenas = store.port.tier_arenas()
    shared = [i for i, (t, _) in enumerate(lease.blocks) if hasattr(arenas[t][1], "checksums")]
    if not shared:
        return True
    got = digests(out6[shared] if len(shared) < len(lease.blocks) else out6)
    want = store.port.lease_checksums(lease)[shared]
    return bool((got == want).all())


def reserve_extra(ns: "Namespace") -> dict[str, Any]:
    return {"arena": idents(ns)}
