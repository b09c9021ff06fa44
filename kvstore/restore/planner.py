"""Transfer-or-recompute planner: per cached block, read KV, read activations and recompute, or prefill.

Input (plain data the store's index produces): the cached prefix's blocks in order, each a
``BlockForms(kv=tier|None, act=tier|None)`` with tiers ``"device" | "host" | "disk"``; the
``ModelLayout`` (bytes per block of each form: ``kv_block_bytes``/``act_block_bytes``), the
block size in tokens and a ``CostProfile``. Output: a ``Plan`` with one ``Step`` per block,
the predicted makespan, a policy-free lower bound, and the schedule the prediction assumes
(every op with its resource, start and end), which the executor can follow.

Model
-----
Resources work concurrently, each one op at a time: the links ``disk->host`` (DH),
``host->device`` (HD), optionally ``disk->device`` (DD, direct reads; when present disk
payloads take it instead of DH+HD), and the compute unit C. A payload of ``b`` bytes on
link ``l`` costs ``lat_l + b / bw_l``; it crosses its route in order (disk: DH then HD, a
chain). Choices for block ``i``:

* ``kv``: move its KV (``k`` bytes) along the route from its tier (a device copy is free);
* ``recompute``: move its activations (``a`` bytes), then one recompute op on C
  (``r = profile.recompute_s(layout, block_tokens)``) once they are on the device;
* ``prefill``: leave it to the engine's prefill; only a suffix of the prefix can be left,
  and prefill (on C) needs the whole restored prefix, so it runs after everything else:
  ``makespan = restore_end + prefill_s(suffix tokens)``.

Shared cores (``profile.shared_compute``, a CPU-only machine): host->device is a memcpy on
the same cores that run the recompute GEMMs, and a read through the page cache is a kernel
copy on them too (measured on a 2-core box: a restore that reads and recomputes takes the
sum of both times, not the max), so nothing overlaps: the summed work of every resource is
one more resource (``"cpu"``) that bounds the makespan. Recompute then pays for its CPU
time as well as its inputs' transfer and wins only where it is cheaper outright (e.g.
activations already resident while the KV sits on disk).

Schedule for a fixed assignment (the policy the executor runs): list scheduling, each
resource starts its highest-priority *ready* op whenever it is free. On links activations
go before KV (so C can start while KV is still streaming: KVPR's order), host-sourced
before disk-sourced, then prefix order; C runs recomputes in arrival order. Ops of blocks
in the same class (same tiers, same choice) have identical durations, so the makespan
depends only on how many blocks of each class take each choice, not on which.

Derivation of the optimum
-------------------------
Two resources (KVPR: one link L, compute C, every block on the host with both forms, no
latency): recomputing the first ``c`` blocks and transferring the rest gives
``T(c) = max(c*a + (n-c)*k,  c*a + r)`` when ``r <= a`` per block (C keeps up with
arrivals) and ``max(c*a + (n-c)*k, a + c*r)`` otherwise; the first term falls with ``c``
(when ``a < k``), the second rises, so the optimum is the crossing point:
``c* = n*k / (k - a + max(r, a))`` rounded to the better neighbour. With ``a >= k``
(GQA) the first term never falls and ``c* = 0``: transfer wins by itself.

General case: more links in a chain (DH, HD, DD), per-block tiers and forms, and the
prefill suffix. The makespan is the max of per-resource completion times, each
non-decreasing in the work routed to that resource, so the single crossing point becomes
a point in the space of choice counts: for each prefix length ``m`` that is restored
(``n - m`` blocks prefilled) and each class ``j`` with both forms, a count ``c_j`` of
recomputes. The planner evaluates the schedule for every vector ``(m, c_1..c_J)`` (exact:
``sum_m prod_j (n_j(m) + 1)`` evaluations of ``O(n)`` each (``_fast_restore``), small because classes are
few: a class is a pair of tiers) and keeps the best; which blocks of a class recompute is
then free, and it picks the earliest (so recompute and its inputs lead the stream). When
that count exceeds ``max_evals`` it switches to a bounded search: a grid over ``m`` refined
around the best, and per ``m`` a coordinate descent over the counts with halving steps
(``Plan.exact`` says which). KVPR's split is the case ``J = 1``, one link, ``m = n``.

Lower bound: any schedule of an assignment needs every resource's total work, and the
prefill after the restore, so ``LB(assignment) = max_resources(load) + prefill``; the plan
reports ``min`` of that over every assignment evaluated (all of them when exact), or, in
the bounded search, the weaker but still valid ``min_m (prefill(m) + max_r min_choice
load_r(m))``. It does not depend on the scheduling policy, so ``predicted_s /
lower_bound_s`` shows how much the policy and the discreteness cost.

The brute-force test enumerates every per-block assignment (respecting forms and the
suffix rule), evaluates each with ``simulate``, and checks the planner reaches the minimum.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kvstore.restore.costmodel import TIERS, CostProfile, LinkCost
from kvstore.layout import ModelLayout

Action = Literal["kv", "recompute", "prefill"]
_TIER_RANK = {"device": 0, "host": 1, "disk": 2}


@dataclass(frozen=True)
class BlockForms:
    """Where one cached block's forms live: a tier name or ``None`` for an absent form."""

    kv: str | None = None
    act: str | None = None

    def __post_init__(self) -> None:
        for name, tier in (("kv", self.kv), ("act", self.act)):
            if tier is not None and tier not in TIERS:
                raise ValueError(f"BlockForms.{name} must be one of {TIERS} or None, got {tier!r}")
        if self.kv is None and self.act is None:
            raise ValueError("a cached block must have at least one form (kv or act)")


@dataclass(frozen=True)
class Step:
    """What to do with one block: ``action`` and the tier its payload is read from."""

    block: int
    action: Action
    tier: str | None


@dataclass(frozen=True)
class Op:
    """One scheduled op: ``resource`` is a link name or ``"compute"``."""

    resource: str
    block: int
    payload: Literal["kv", "act", "recompute", "prefill"]
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Plan:
    """A restore plan: per-block steps, predicted makespan, lower bound, and its schedule."""

    steps: tuple[Step, ...]
    predicted_s: float
    lower_bound_s: float
    restore_s: float
    prefill_tokens: int
    schedule: tuple[Op, ...]
    exact: bool

    def count(self, action: Action) -> int:
        return sum(1 for s in self.steps if s.action == action)


@dataclass(frozen=True)
class TierCodec:
    """A tier's codec as the planner sees it: bytes one KV block occupies (and crosses links
    as) there, and the seconds to decode one block into its destination."""

    encoded_bytes: int
    decode_s: float = 0.0


@dataclass(frozen=True)
class _Costs:
    """Per-block durations derived from layout and profile (computed once per plan)."""

    routes: dict[str, tuple[str, ...]]
    link_s: dict[tuple[str, str], float]  # (link, payload) -> seconds per block
    recompute_s: float
    shared: bool = False  # host->device and compute share the same cores (CPU-only)

    @classmethod
    def of(cls, layout: ModelLayout, block_tokens: int, profile: CostProfile,
           codecs: Mapping[str, TierCodec] | None = None) -> "_Costs":
        """Payloads are ``"act"`` and ``"kv@<tier>"``: KV from a tier with a codec crosses its
        links as encoded bytes, and its decode (into the destination, on the device) is
        charged to the last hop of its route -- serialised with the copy, so an estimate
        that never favours a codec more than it should."""
        direct = profile.link("disk->device") is not None
        routes = {"device": (), "host": ("host->device",),
                  "disk": ("disk->device",) if direct else ("disk->host", "host->device")}
        raw = layout.kv_block_bytes(block_tokens)
        sizes = {"act": layout.act_block_bytes(block_tokens)}
        link_s = {(name, "act"): cost.seconds(sizes["act"]) for name, cost in profile.links.items()}
        for tier in ("host", "disk"):
            codec = (codecs or {}).get(tier)
            nbytes = codec.encoded_bytes if codec is not None else raw
            for name, cost in profile.links.items():
                last = name == routes[tier][-1]
                link_s[(name, f"kv@{tier}")] = cost.seconds(nbytes) + (codec.decode_s if codec is not None and last
                                                                          else 0.0)
        return cls(routes=routes, link_s=link_s, recompute_s=profile.recompute_s(layout, block_tokens),
                   shared=profile.shared_compute)


def _share_cores(end: float, loads: dict[str, float], costs: _Costs) -> float:
    """On a CPU-only machine reads through the page cache, copies and recompute all take
    turns on the same cores: their work adds up on one resource (``"cpu"``), which bounds
    the makespan. O(1)."""
    if costs.shared and loads:
        loads["cpu"] = sum(v for k, v in loads.items() if k != "cpu")
        end = max(end, loads["cpu"])
    return end


def _check(blocks: Sequence[BlockForms], block_tokens: int) -> None:
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    for i, b in enumerate(blocks):
        if not isinstance(b, BlockForms):
            raise TypeError(f"blocks[{i}] must be BlockForms, got {type(b).__name__}")


def _schedule(blocks: Sequence[BlockForms], actions: Sequence[Action], costs: _Costs
              ) -> tuple[float, list[Op], dict[str, float]]:
    """List-schedule one assignment (see module doc). Returns (restore_end, ops, loads).

    O(n log n): each resource's ready ops sit in a heap keyed by priority.
    """
    # Each restored block is a chain of (resource, payload, duration).
    chains: dict[int, list[tuple[str, str, float]]] = {}
    prio: dict[int, tuple] = {}
    for i, (b, act) in enumerate(zip(blocks, actions)):
        if act == "prefill":
            continue
        payload = "kv" if act == "kv" else "act"
        tier = b.kv if act == "kv" else b.act
        assert tier is not None, f"block {i}: {act} without that form"
        key = f"kv@{tier}" if payload == "kv" else "act"
        chain = [(link, payload, costs.link_s[(link, key)]) for link in costs.routes[tier]]
        if act == "recompute":
            chain.append(("compute", "recompute", costs.recompute_s))
        chains[i] = chain
        prio[i] = (0 if payload == "act" else 1, _TIER_RANK[tier], i)
    loads: dict[str, float] = {}
    for chain in chains.values():
        for res, _, d in chain:
            loads[res] = loads.get(res, 0.0) + d
    ops: list[Op] = []
    free: dict[str, float] = {}
    # Event simulation: pending[(res)] = heap of (ready_time, prio, block, stage) not yet ready;
    # processed by the resource whose next start is earliest.
    waiting: dict[str, list] = {}
    for i, chain in chains.items():
        if chain:
            heapq.heappush(waiting.setdefault(chain[0][0], []), (0.0, prio[i], i, 0))
    ready: dict[str, list] = {r: [] for r in waiting}
    end = 0.0
    while True:
        best_res, best_start = None, None
        for res, wq in waiting.items():
            rq = ready.setdefault(res, [])
            t_free = free.get(res, 0.0)
            if rq:
                start = t_free
            elif wq:
                start = max(t_free, wq[0][0])
            else:
                continue
            if best_start is None or start < best_start:
                best_res, best_start = res, start
        if best_res is None:
            break
        res, wq, rq = best_res, waiting[best_res], ready[best_res]
        while wq and wq[0][0] <= best_start:
            t_ready, p, i, stage = heapq.heappop(wq)
            # compute runs in arrival order; links by priority
            key = (t_ready, i) if res == "compute" else p
            heapq.heappush(rq, (key, i, stage))
        _, i, stage = heapq.heappop(rq)
        name, payload, dur = chains[i][stage]
        stop = best_start + dur
        free[res] = stop
        end = max(end, stop)
        ops.append(Op(res, i, payload, best_start, stop))  # type: ignore[arg-type]
        if stage + 1 < len(chains[i]):
            nxt = chains[i][stage + 1][0]
            heapq.heappush(waiting.setdefault(nxt, []), (stop, prio[i], i, stage + 1))
            ready.setdefault(nxt, [])
    return _share_cores(end, loads, costs), ops, loads


def simulate(blocks: Sequence[BlockForms], actions: Sequence[Action], layout: ModelLayout,
             block_tokens: int, profile: CostProfile, codecs: Mapping[str, TierCodec] | None = None,
             ) -> tuple[float, float]:
    """(makespan, policy-free lower bound) of one explicit assignment; validates it.

    Raises ``ValueError`` for an infeasible assignment (a missing form, prefill not a suffix).
    Public so tests and benchmarks can evaluate any assignment the planner did not pick.
    """
    _check(blocks, block_tokens)
    _validate(blocks, actions)
    costs = _Costs.of(layout, block_tokens, profile, codecs)
    restore, _, loads = _schedule(blocks, actions, costs)
    return _total(restore, loads, actions, layout, block_tokens, profile)


def _validate(blocks: Sequence[BlockForms], actions: Sequence[Action]) -> None:
    if len(actions) != len(blocks):
        raise ValueError(f"{len(actions)} actions for {len(blocks)} blocks")
    seen_prefill = False
    for i, (b, a) in enumerate(zip(blocks, actions)):
        if a == "prefill":
            seen_prefill = True
        elif seen_prefill:
            raise ValueError(f"block {i}: only a suffix of the prefix can be left for prefill")
        elif a == "kv" and b.kv is None or a == "recompute" and b.act is None:
            raise ValueError(f"block {i}: {a} but the block has no such form")
        elif a not in ("kv", "recompute"):
            raise ValueError(f"block {i}: unknown action {a!r}")


def _total(restore: float, loads: dict[str, float], actions: Sequence[Action], layout: ModelLayout,
           block_tokens: int, profile: CostProfile) -> tuple[float, float]:
    prefill = profile.prefill_s(layout, block_tokens * sum(1 for a in actions if a == "prefill"))
    return restore + prefill, max(loads.values(), default=0.0) + prefill


def _actions_for(blocks: Sequence[BlockForms], m: int, counts: dict[tuple, int]) -> list[Action]:
    """Assignment from (restored prefix length, recompute count per two-form class).

    The first ``counts[cls]`` blocks of each class recompute (ties are free: see doc).
    """
    left = dict(counts)
    out: list[Action] = []
    for i, b in enumerate(blocks):
        if i >= m:
            out.append("prefill")
        elif b.kv is None:
            out.append("recompute")
        elif b.act is None:
            out.append("kv")
        else:
            cls = (b.kv, b.act)
            if left.get(cls, 0) > 0:
                left[cls] -= 1
                out.append("recompute")
            else:
                out.append("kv")
    return out


def _group_counts(blocks: Sequence[BlockForms], actions: Sequence[Action]) -> dict[tuple[str, str], int]:
    """Counts per (payload, source tier): all the schedule's makespan depends on."""
    out: dict[tuple[str, str], int] = {}
    for b, a in zip(blocks, actions):
        if a == "kv":
            key = ("kv", b.kv)
        elif a == "recompute":
            key = ("act", b.act)
        else:
            continue
        out[key] = out.get(key, 0) + 1  # type: ignore[index]
    return out


def _fast_restore(groups: dict[tuple[str, str], int], costs: _Costs) -> tuple[float, dict[str, float]]:
    """Same makespan as ``_schedule`` for the same assignment, from group counts alone.

    Ops of one (payload, tier) group are identical, so each resource's list schedule is a
    merge of a few arithmetic streams: O(n) float steps, no heaps or objects (about 100x
    cheaper than ``_schedule``; the tests check both agree).
    """
    def n(p: str, t: str) -> int:
        return groups.get((p, t), 0)

    ls = costs.link_s
    if not n("act", "disk") and not n("kv", "disk"):
        return _fast_restore_memory(n("act", "host"), n("kv", "host"), n("act", "device"), costs)
    loads: dict[str, float] = {}
    end = 0.0
    direct = costs.routes["disk"] == ("disk->device",)
    first = costs.routes["disk"][0]
    # Disk link (DH or DD): ready at 0; activations first, then KV, each in prefix order.
    disk_act: list[float] = []
    disk_kv: list[float] = []
    t = 0.0
    for _ in range(n("act", "disk")):
        t = t + ls[(first, "act")]
        disk_act.append(t)
    for _ in range(n("kv", "disk")):
        t = t + ls[(first, "kv@disk")]
        disk_kv.append(t)
    if disk_act or disk_kv:
        loads[first] = t
        end = max(end, t)
    device_act: list[float] = []  # arrival times of activations on the device
    if direct:
        device_act.extend(disk_act)
        pending_act: list[float] = []
        pending_kv: list[float] = []
    else:
        pending_act, pending_kv = disk_act, disk_kv
    # host->device: act(host) > act(disk, once arrived) > kv(host) > kv(disk, once arrived).
    hd = "host->device"
    da, dk, dkd = ls.get((hd, "act"), 0.0), ls.get((hd, "kv@host"), 0.0), ls.get((hd, "kv@disk"), 0.0)
    t = 0.0
    busy = 0.0
    for _ in range(n("act", "host")):
        t = t + da
        busy += da
        device_act.append(t)
    kv_host = n("kv", "host")
    ia = ik = 0
    while ia < len(pending_act) or ik < len(pending_kv) or kv_host:
        if ia < len(pending_act) and pending_act[ia] <= t:
            t = t + da
            busy += da
            device_act.append(t)
            ia += 1
        elif kv_host:
            t = t + dk
            busy += dk
            kv_host -= 1
        elif ik < len(pending_kv) and pending_kv[ik] <= t:
            t = t + dkd
            busy += dkd
            ik += 1
        else:
            t = min(pending_act[ia] if ia < len(pending_act) else float("inf"),
                    pending_kv[ik] if ik < len(pending_kv) else float("inf"))
    if busy:
        loads[hd] = busy
        end = max(end, t)
    # Compute: recomputes in arrival order (device-resident activations are ready at 0).
    r = costs.recompute_s
    t = 0.0
    k = n("act", "device")
    for _ in range(k):
        t = t + r
    if direct and n("act", "host") and n("act", "disk"):
        device_act.sort()
    for arrival in device_act:
        t = max(t, arrival) + r
    if k or device_act:
        loads["compute"] = r * (k + len(device_act))
        end = max(end, t)
    return _share_cores(end, loads, costs), loads


def _fast_restore_memory(a: int, k: int, kd: int, costs: _Costs) -> tuple[float, dict[str, float]]:
    """``_fast_restore`` when nothing comes from disk, in closed form (O(1)): the host->device
    link carries ``a`` activation blocks then ``k`` KV blocks back to back; compute takes
    ``kd`` device-resident activation blocks, then each arriving one (arrival ``i * da``):
    ``t_i = max(t_{i-1}, i * da) + r`` ends at ``max((kd + a) r, a da + r if da >= r else da + a r)``."""
    hd = "host->device"
    da, dk = costs.link_s.get((hd, "act"), 0.0), costs.link_s.get((hd, "kv@host"), 0.0)
    loads: dict[str, float] = {}
    end = 0.0
    busy = a * da + k * dk
    if busy:
        loads[hd] = busy
        end = busy
    r = costs.recompute_s
    if kd or a:
        t = (kd + a) * r
        if a:
            t = max(t, a * da + r if da >= r else da + a * r)
        loads["compute"] = r * (kd + a)
        end = max(end, t)
    return _share_cores(end, loads, costs), loads


def plan_restore(blocks: Sequence[BlockForms], layout: ModelLayout, block_tokens: int,
                 profile: CostProfile, *, max_evals: int = 2000, allow_prefill: bool = True,
                 codecs: Mapping[str, TierCodec] | None = None) -> Plan:
    """The fastest plan for restoring ``blocks`` (see module doc for model and derivation).

    ``codecs``: per tier (``"host"``, ``"disk"``) the codec its KV is stored with
    (:class:`TierCodec`): those blocks cross as encoded bytes and pay their decode.

    ``allow_prefill=False`` restores every block (``KVStore.get``: the caller wants the whole
    prefix's KV, not a suffix left to its prefill), so only ``m = n`` is searched.

    Exact (every count vector) when that takes at most ``max_evals`` schedule evaluations,
    else a bounded search. Each evaluation is O(n) (``_fast_restore``), memoised by the
    per-group counts it depends on.
    """
    _check(blocks, block_tokens)
    n = len(blocks)
    costs = _Costs.of(layout, block_tokens, profile, codecs)
    memo: dict[tuple, tuple[float, float]] = {}
    best: dict = {"key": None, "t": float("inf")}
    lb_min = [float("inf")]

    # Prefix sums: forced groups and two-form class sizes of the first m blocks, O(n) once.
    forced: list[dict[tuple[str, str], int]] = [{}]
    for b in blocks:
        nxt = dict(forced[-1])
        if b.act is None or b.kv is None:
            key = ("kv", b.kv) if b.act is None else ("act", b.act)
            nxt[key] = nxt.get(key, 0) + 1  # type: ignore[index]
        forced.append(nxt)
    prefix_classes: list[dict[tuple, int]] = [{}]
    for b in blocks:
        nxt = dict(prefix_classes[-1])
        if b.kv is not None and b.act is not None:
            nxt[(b.kv, b.act)] = nxt.get((b.kv, b.act), 0) + 1
        prefix_classes.append(nxt)

    def evaluate(m: int, counts: dict[tuple, int]) -> float:
        groups = dict(forced[m])
        for (kv_tier, act_tier), size in prefix_classes[m].items():
            c = counts.get((kv_tier, act_tier), 0)
            groups[("act", act_tier)] = groups.get(("act", act_tier), 0) + c
            groups[("kv", kv_tier)] = groups.get(("kv", kv_tier), 0) + size - c
        groups = {k: v for k, v in groups.items() if v}
        gkey = (n - m, tuple(sorted(groups.items())))
        if gkey not in memo:
            restore, loads = _fast_restore(groups, costs)
            prefill = profile.prefill_s(layout, block_tokens * (n - m))
            memo[gkey] = (restore + prefill, max(loads.values(), default=0.0) + prefill)
            lb_min[0] = min(lb_min[0], memo[gkey][1])
        t = memo[gkey][0]
        if t < best["t"] * (1 - 1e-12) or (t <= best["t"] * (1 + 1e-12) and m > best["key"][0]):
            best["key"], best["t"] = (m, tuple(sorted(counts.items()))), t
        return t

    def classes(m: int) -> dict[tuple, int]:
        return prefix_classes[m]

    # Every m in 0..n is feasible (any suffix may be prefilled).
    m_values = range(n + 1) if allow_prefill else range(n, n + 1)
    grid = _memory_grid(n, forced, prefix_classes, costs, layout, block_tokens, profile, m_values)
    if grid is not None:  # nothing from disk: every (m, c) in closed form, at once
        (m, c), lower = grid
        best["key"] = (m, ((("host", "host"), c),) if prefix_classes[m] else ())
        m_values = range(0)
    total = 0
    for m in m_values:
        prod = 1
        for c in classes(m).values():
            prod *= c + 1
        total += prod
        if total > max_evals:
            break
    exact = total <= max_evals
    if grid is not None:
        exact = True
    elif exact:
        for m in m_values:
            cls = classes(m)
            names = sorted(cls)
            for combo in itertools.product(*(range(cls[c] + 1) for c in names)):
                evaluate(m, dict(zip(names, combo)))
        lower = lb_min[0]
    else:
        _bounded_search(n, classes, evaluate, allow_prefill)
        lower = _weak_lower_bound(blocks, costs, layout, block_tokens, profile, allow_prefill)
    m, counts = best["key"][0], dict(best["key"][1])
    actions = _actions_for(blocks, m, counts)
    restore, ops, _ = _schedule(blocks, actions, costs)
    predicted, _ = _total(restore, {}, actions, layout, block_tokens, profile)
    steps = tuple(Step(i, a, None if a == "prefill" else (b.kv if a == "kv" else b.act))
                  for i, (b, a) in enumerate(zip(blocks, actions)))
    prefill_tokens = (n - m) * block_tokens
    if prefill_tokens:
        p = profile.prefill_s(layout, prefill_tokens)
        ops.append(Op("compute", m, "prefill", restore, restore + p))
    return Plan(steps=steps, predicted_s=predicted, lower_bound_s=min(lower, predicted),
                restore_s=restore, prefill_tokens=prefill_tokens, schedule=tuple(ops), exact=exact)


def _memory_grid(n: int, forced, prefix_classes, costs: _Costs, layout: ModelLayout, block_tokens: int,
                 profile: CostProfile, m_values: range) -> tuple[tuple[int, int], float] | None:
    """The exact search when no block has a form on disk and the only two-form class is
    (KV on host, activations on host) -- a restore from host memory, the common case:
    :func:`_fast_restore_memory`'s closed form over every ``(m, c)`` (``c`` blocks of the
    first ``m`` recomputed) as one array expression. Returns ``((m, c), lower bound)`` of the
    best (ties: more blocks restored, then fewer recomputed), or None when it does not apply
    or the grid would exceed 4M cells. O(n^2) array work, O(n) Python."""
    import numpy as np

    if any(k not in (("host", "host"),) for k in prefix_classes[n]) or (n + 1) ** 2 > 4_000_000:
        return None
    if any(t == "disk" for key in forced[n] for t in key[1:]):
        return None
    hd = "host->device"
    da, dk = costs.link_s.get((hd, "act"), 0.0), costs.link_s.get((hd, "kv@host"), 0.0)
    r = costs.recompute_s
    ms = np.asarray(list(m_values), dtype=np.int64)
    size = np.array([prefix_classes[m].get(("host", "host"), 0) for m in ms], dtype=np.float64)[:, None]
    a0 = np.array([forced[m].get(("act", "host"), 0) for m in ms], dtype=np.float64)[:, None]
    k0 = np.array([forced[m].get(("kv", "host"), 0) for m in ms], dtype=np.float64)[:, None]
    kd = np.array([forced[m].get(("act", "device"), 0) for m in ms], dtype=np.float64)[:, None]
    prefill = np.array([profile.prefill_s(layout, block_tokens * (n - m)) for m in ms])[:, None]
    c = np.arange(int(size.max(initial=0)) + 1, dtype=np.float64)[None, :]
    valid = c <= size
    a = a0 + c
    busy = a * da + (k0 + size - c) * dk
    compute = (kd + a) * r
    arrive = np.where(a > 0, a * da + r if da >= r else da + a * r, 0.0)
    end = np.maximum(busy, np.where(kd + a > 0, np.maximum(compute, arrive), 0.0))
    heavy = np.maximum(busy, compute)
    if costs.shared:
        end = np.maximum(end, busy + compute)
        heavy = np.maximum(heavy, busy + compute)
    total = np.where(valid, end + prefill, np.inf)
    lower = float(np.where(valid, heavy + prefill, np.inf).min())
    best_c = total.argmin(axis=1)  # first minimum: fewest recomputed
    best_t = total[np.arange(len(ms)), best_c]
    t_min = best_t.min()
    i = max(j for j in range(len(ms)) if best_t[j] <= t_min * (1 + 1e-12))  # most restored
    return (int(ms[i]), int(best_c[i])), min(lower, float(t_min))


def _bounded_search(n: int, classes, evaluate, allow_prefill: bool = True) -> None:
    """Grid over m, then a halving-step descent on m; per m, coordinate descent on the counts.

    About ``(17 + 2 log2 n) * 2 * J * log2 n`` evaluations for J two-form classes.
    """
    cache: dict[int, float] = {}

    def best_for(m: int) -> float:
        if m in cache:
            return cache[m]
        cls = classes(m)
        names = sorted(cls)
        best_t = float("inf")
        for cur in ({c: 0 for c in names}, {c: cls[c] for c in names}):
            t = evaluate(m, cur)
            step = max(1, max(cls.values(), default=1) // 2)
            while step >= 1:
                improved = False
                for c in names:
                    for d in (step, -step):
                        v = cur[c] + d
                        if 0 <= v <= cls[c]:
                            cand = {**cur, c: v}
                            tc = evaluate(m, cand)
                            if tc < t:
                                cur, t, improved = cand, tc, True
                if not improved:
                    step //= 2
            best_t = min(best_t, t)
        cache[m] = best_t
        return best_t

    if not allow_prefill:
        best_for(n)
        return
    grid = sorted({0, n} | {round(n * k / 16) for k in range(1, 16)})
    m0 = min(grid, key=best_for)
    step = max(1, n // 32)
    while step >= 1:
        cands = [m for m in (m0 - step, m0 + step) if 0 <= m <= n]
        m1 = min(cands + [m0], key=best_for)
        if m1 == m0:
            step //= 2
        m0 = m1


def _weak_lower_bound(blocks: Sequence[BlockForms], costs: _Costs, layout: ModelLayout,
                      block_tokens: int, profile: CostProfile, allow_prefill: bool = True) -> float:
    """``min_m (prefill(n - m) + max_r sum_{i<m} min_choice load_r(i))``: valid for any plan. O(n*R)."""
    def block_load(b: BlockForms, res: str) -> float:
        opts = []
        if b.kv is not None:
            opts.append(sum(costs.link_s[(l, f"kv@{b.kv}")] for l in costs.routes[b.kv] if l == res))
        if b.act is not None:
            opts.append(sum(costs.link_s[(l, "act")] for l in costs.routes[b.act] if l == res)
                        + (costs.recompute_s if res == "compute" else 0.0))
        return min(opts)

    resources = sorted({l for r in costs.routes.values() for l in r} | {"compute"})
    acc = {r: 0.0 for r in resources}
    n = len(blocks)
    best = profile.prefill_s(layout, n * block_tokens) if allow_prefill else float("inf")
    for m, b in enumerate(blocks, start=1):
        for r in resources:
            acc[r] += block_load(b, r)
        if not allow_prefill and m < n:
            continue
        best = min(best, max(acc.values()) + profile.prefill_s(layout, (n - m) * block_tokens))
    return best


def remote_worth_reading(profile: CostProfile, layout: ModelLayout, block_tokens: int, n_blocks: int,
                         observed: tuple[float, float] | None = None, *, codec: TierCodec | None = None) -> bool:
    """Whether reading ``n_blocks`` KV blocks from the remote tier (one batched round trip:
    ``latency + bytes / bandwidth`` on ``"remote->host"``, else the store's ``observed``
    ``(latency_s, bandwidth_Bps)``) finishes before prefilling their tokens. The restore
    that follows moves them like host blocks, so only the remote hop is compared. With no
    measurement at all the read is assumed worth it (a network read of KV beats a forward
    pass by orders of magnitude on any link the tier is meant for). O(1).
    """
    link = profile.link("remote->host")
    if link is None and observed is not None:
        link = LinkCost(max(observed[1], 1.0), max(observed[0], 0.0)) if observed[1] > 0 else None
    if link is None or n_blocks <= 0:
        return n_blocks > 0
    # a remote codec (issue 24): its encoded bytes cross the link, then each block decodes
    nbytes = codec.encoded_bytes if codec is not None else layout.kv_block_bytes(block_tokens)
    read_s = link.seconds(n_blocks * nbytes) + (n_blocks * codec.decode_s if codec is not None else 0.0)
    return read_s < profile.prefill_s(layout, n_blocks * block_tokens)
