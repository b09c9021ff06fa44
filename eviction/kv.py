"""``kv``: a prefix-tree-aware policy for chained KV blocks (also registered as ``kvtree``).

Rules (one "rule set" is one kv score):

* only leaves (no resident child) are victims, so the resident set stays prefix-closed;
  a block whose parent is not resident (*broken*) goes first;
* the blocks one request touches share its request tick; within a tick deeper goes first;
* a finished request's last block is demoted by ``tail_age`` ticks (a next turn re-sends
  that prefix minus its partial last block);
* leaves live in a *new* and a *reused* segment; the victim comes from *new* while it is
  over its target ``p``, which adapts on ghost hits as in ARC (``ghost_factor`` x capacity
  of ghosts), starting from ``p0`` x capacity;
* a block hit by ``h`` requests earns ``freq_bonus * log2(1 + h)`` ticks, scaled by its
  ``cost`` over the mean cost when the store passes one.

Experts: with ``experts=True`` five rule sets (:data:`EXPERTS`: ``kv``, ``chain-lru``,
``kv-quick`` with ``p0 = quick``, ``kv-lirs``, ``kv-warm``) each run as a metadata-only
shadow cache of full size that sees every access. The cache evicts what the followed
expert has already dropped (falling back to its own kv order) and switches to expert
``o`` once ``o``'s per-request lead in prefix hits passes the paired test
``sum(d) > z * sqrt(sum(d^2))``. The race starts on ``start`` (``kv-lirs``), or on the
leader of a ``probe``-size copy of the race when this cache first evicts.

The tree is kept here, not taken from the tier manager's index: the shadows and the probe
need trees over resident sets the store does not hold, and the simulator runs this policy
with no store at all; parents arrive through ``insert(parent=...)`` and pins through the
base class, the interface every policy gets. Why these rules, the measurements behind the
defaults and the known gaps: ``docs/decisions.md`` ("The ``kv`` policy and its race").
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from eviction.base import EvictionPolicy, Key


#: the experts, as keyword arguments over the policy's own (``p0=None``: ``quick``)
EXPERTS: dict[str, dict] = {
    "kv": {},
    "chain-lru": {"freq_bonus": 0.0, "tail_age": 0.0, "two_seg": False},
    "kv-quick": {"p0": None},
    "kv-lirs": {"p0": 0.01, "adaptive": False, "warm": True},
    "kv-warm": {"warm": True},
}


class KVPolicy(EvictionPolicy):
    """The kv rules over a prefix tree of resident blocks, following the best of the
    :data:`EXPERTS` raced on the access stream (module docstring).

    Knobs: ``freq_bonus``, ``tail_age``, ``adaptive``, ``ghost_factor``, ``p0``,
    ``two_seg`` and ``warm`` set one rule set; ``experts`` (False: that rule set alone),
    ``expert_names``, ``start``, ``z``, ``quick`` and ``probe`` set the race.

    Complexity: an access costs one request on each shadow (O(log n) each) plus this
    cache's own O(log n), and O(experts^2) when a request ends with the experts' prefix
    hits differing; an eviction is amortised O(log n); a switch is O(n) once; the
    every-leaf-pinned fallback is O(n). Memory is about 6.3 KB a resident block with the
    experts, 1.1 KB for one rule set, which is why ``lru`` stays the store's default.
    """

    name = "kv"

    def __init__(self, capacity: int, *, freq_bonus: float = 50.0, tail_age: float = 1e9,
                 adaptive: bool = True, ghost_factor: float = 2.0, p0: float = 0.4,
                 two_seg: bool = True, warm: bool = False, experts: bool = True,
                 expert_names: tuple[str, ...] = tuple(EXPERTS), start: str = "kv-lirs",
                 z: float = 2.0, quick: float = 0.1, probe: float = 0.5, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        tree = dict(freq_bonus=freq_bonus, tail_age=tail_age, adaptive=adaptive,
                    ghost_factor=ghost_factor, p0=p0, two_seg=two_seg)
        #: the experts: full-size shadow caches that see every access (empty: one expert)
        self.shadows: list[EvictionPolicy] = []
        self.names: list[str] = []
        if experts:
            for name in expert_names:
                if name not in EXPERTS:
                    raise ValueError(f"unknown kv expert {name!r}; choose from {list(EXPERTS)}")
                kw = {**tree, **EXPERTS[name]}
                if kw["p0"] is None:
                    kw["p0"] = quick
                shadow = KVPolicy(self.capacity, experts=False, **kw)
                shadow.gone = []
                self.shadows.append(shadow)
                self.names.append(name)
        n = len(self.shadows)
        if n and start not in self.names:
            raise ValueError(f"start must be one of the experts {self.names}, got {start!r}")
        if not 0.0 <= probe < 1.0:
            raise ValueError(f"probe is a fraction of the capacity in [0, 1), got {probe!r}")
        #: the same race on a cache ``probe`` times this size: it fills first, and the expert
        #: it follows when this cache first evicts is where this one starts (then dropped)
        self._probe: KVPolicy | None = None
        if n and probe > 0:
            self._probe = KVPolicy(max(1, int(self.capacity * probe)), expert_names=expert_names,
                                   start=start, z=z, quick=quick, warm=warm, probe=0.0, **tree)
        #: score[i][j]: prefix hits of expert i minus those of expert j, summed over requests
        self.score = [[0] * n for _ in range(n)]
        #: sum of squared per-request differences (the paired test's variance)
        self._score2 = [[0] * n for _ in range(n)]
        self._run = [True] * n
        self._cnt = [0] * n            # prefix hits of each expert in the current request
        self.switches = 0
        self._z2 = z * z
        self.expert = self.names.index(start) if n else 0
        self._warm = warm
        #: keys this policy dropped since the owner last looked (only for an expert's shadow)
        self.gone: list | None = None
        self._full = False
        #: resident keys the followed expert no longer holds, in the order it dropped them
        self._surplus: OrderedDict = OrderedDict()
        self._ghost_factor = ghost_factor
        self._adaptive = adaptive
        self.p = p0 * self.capacity  # target size of the "new" segment (ARC's p)
        self._seg_size = [0, 0]        # resident size of segment 0 (new) and 1 (reused)
        self._ghost: list[OrderedDict] = [OrderedDict(), OrderedDict()]
        self._ghost_size = [0, 0]
        self._heaps: list[list] = [[], []]
        self._seg: dict[Key, int] = {}
        self._two_seg = two_seg
        self._freq_bonus = freq_bonus
        self._tail_age = tail_age
        self._tick = 0
        self._broken: set = set()
        self._cost_mean = 0.0
        self._cost_n = 0
        self._stamp = 0
        self._detached_size = 0
        self._last: Key | None = None
        self._tickof: dict[Key, float] = {}
        self._depth: dict[Key, int] = {}
        self._parent: dict[Key, Key | None] = {}
        self._nchild: dict[Key, int] = {}
        self._hits: dict[Key, int] = {}
        self._cost: dict[Key, float | None] = {}
        self._tail: dict[Key, bool] = {}
        self._entry: dict[Key, tuple] = {}
        #: resident children of non-resident parents, by parent (re-attached on insert)
        self._waiting: dict[Key, int] = {}

    # -- scoring ---------------------------------------------------------------------------
    def _score(self, key: Key) -> float:
        s = self._tickof[key]
        h = self._hits[key]
        if h and self._freq_bonus:
            c = self._cost[key]
            scale = c / self._cost_mean if c is not None and self._cost_mean > 0 else 1.0
            s += self._freq_bonus * scale * math.log2(1 + h)
        if self._tail[key] and self._tail_age:
            s -= self._tail_age
        if key in self._broken:
            s -= 4e9  # its prefix is gone: it cannot be served as a prefix, so it goes first
        return s

    def _push(self, key: Key) -> None:
        self._stamp += 1
        seg = self._seg[key]
        e = (self._score(key), -self._depth[key], self._stamp, key)
        self._entry[key] = e
        heap = self._heaps[seg]
        heapq.heappush(heap, e)
        if len(heap) > 2 * len(self._entry) + 64:
            for i in (0, 1):
                self._heaps[i] = [e for k, e in self._entry.items() if self._seg[k] == i]
                heapq.heapify(self._heaps[i])

    def _set_seg(self, key: Key, seg: int) -> None:
        old = self._seg.get(key)
        size = self._sizes[key]
        if old is not None:
            self._seg_size[old] -= size
        self._seg[key] = seg
        self._seg_size[seg] += size

    def _ghost_hit(self, key: Key) -> bool:
        """ARC's adaptation: a ghost of the new segment asks for a bigger new segment."""
        for seg in (0, 1):
            size = self._ghost[seg].pop(key, None)
            if size is not None:
                self._ghost_size[seg] -= size
                if self._adaptive:
                    g0, g1 = self._ghost_size
                    if seg == 0:
                        self.p = min(self.p + max(g1 / max(g0, 1), 1) * size, self.capacity)
                    else:
                        self.p = max(self.p - max(g0 / max(g1, 1), 1) * size, 0.0)
                return True
        return False

    def _ghost_add(self, key: Key, seg: int, size: int) -> None:
        g = self._ghost[seg]
        g[key] = size
        self._ghost_size[seg] += size
        c = self.capacity * self._ghost_factor
        while self._ghost_size[0] + self._seg_size[0] > c and self._ghost[0]:
            self._ghost_size[0] -= self._ghost[0].popitem(last=False)[1]
        while sum(self._ghost_size) + sum(self._seg_size) > c + self.capacity and (self._ghost[1] or self._ghost[0]):
            i = 1 if self._ghost[1] else 0
            self._ghost_size[i] -= self._ghost[i].popitem(last=False)[1]

    def _touch_chain(self, key: Key, parent: Key | None) -> None:
        """Advance the request tick when ``key`` does not continue the previous chain."""
        if parent is None or parent != self._last:
            last = self._last
            if last is not None and last in self._sizes and not self._tail[last]:
                self._tail[last] = True
                if last in self._entry:
                    self._push(last)
            self._tick += 1
        self._last = key

    # -- the experts -------------------------------------------------------------------------
    def _observe(self, key: Key, size: int, cost: float | None, parent: Key | None) -> None:
        """Replay one access on every expert's shadow cache, count their prefix hits and
        keep the surplus of the followed one. O(experts) shadow requests, plus
        O(experts^2) at the end of a request where they scored differently."""
        run, cnt = self._run, self._cnt
        n = len(run)
        if parent is None or parent != self._last:
            self._settle()
            for i in range(n):
                run[i] = True
        if self._probe is not None:
            self._probe.request(key, size, cost, parent)
        shadows = self.shadows
        for i in range(n):
            if shadows[i].request(key, size, cost, parent):
                if run[i]:
                    cnt[i] += 1
            else:
                run[i] = False
        gone = shadows[self.expert].gone
        if gone:
            sizes, surplus = self._sizes, self._surplus
            for k in gone:
                if k in sizes:
                    surplus[k] = None
        for sh in shadows:
            sh.gone.clear()

    def _settle(self) -> None:
        """Close a request: add each pair's difference in prefix hits to the paired test
        and switch expert if another one leads significantly. The request, not the block,
        is the unit: the blocks of one chain hit or miss together, so counting them one by
        one would make a single long prompt look significant. O(experts^2)."""
        cnt = self._cnt
        n = len(cnt)
        if max(cnt) != min(cnt):
            s1, s2 = self.score, self._score2
            for i in range(n):
                for j in range(n):
                    d = cnt[i] - cnt[j]
                    if d:
                        s1[i][j] += d
                        s2[i][j] += d * d
            cur = self.expert
            best, best_lead = cur, 0
            for o in range(n):
                lead = s1[o][cur]
                if lead > best_lead and lead * lead > self._z2 * s2[o][cur]:
                    best, best_lead = o, lead
            if best != cur:
                self._follow(best)
        for i in range(n):
            cnt[i] = 0

    def _follow(self, i: int) -> None:
        """Follow expert ``i`` from now on: what it does not hold goes first, newest first
        (a child is inserted after its parent, so leaves come before the blocks they hang
        off and the victim search does not step over whole chains). O(n)."""
        self.expert = i
        self.switches += 1
        held = self.shadows[i]._sizes
        self._surplus = OrderedDict.fromkeys(k for k in reversed(self._sizes) if k not in held)

    def _surplus_victim(self) -> Key | None:
        """The unpinned resident leaf the followed expert dropped first; entries it holds
        again or that left are discarded. O(1) amortised, plus the inner or pinned
        surplus keys passed over (an inner one is evictable once its children are)."""
        surplus = self._surplus
        if not surplus:
            return None
        held = self.shadows[self.expert]._sizes
        sizes, pins, nchild = self._sizes, self._pins, self._nchild
        stale = []
        found = None
        for k in surplus:
            if k not in sizes or k in held:
                stale.append(k)
                continue
            if k in pins or nchild[k]:
                continue
            found = k
            break
        for k in stale:
            del surplus[k]
        if found is not None:
            del surplus[found]
        return found

    # -- hooks -------------------------------------------------------------------------------
    def _on_insert(self, key, size, cost, parent) -> None:
        if self.shadows:
            self._observe(key, size, cost, parent)
        self._insert(key, size, cost, parent)

    def _insert(self, key, size, cost, parent) -> None:
        reused = self._ghost_hit(key) or (self._warm and not self._full)
        self._set_seg(key, 1 if reused and self._two_seg else 0)
        self._touch_chain(key, parent)
        self._tickof[key] = self._tick
        self._parent[key] = parent
        if parent is not None and (parent not in self._sizes or parent in self._broken):
            self._broken.add(key)
        if parent is not None and parent in self._sizes:
            self._depth[key] = self._depth[parent] + 1
            self._nchild[parent] += 1
            self._entry.pop(parent, None)  # no longer a leaf: its heap entry goes stale
        else:
            self._depth[key] = 0 if parent is None else 1
            if parent is not None:  # parent not resident (yet): remember the link
                self._waiting[parent] = self._waiting.get(parent, 0) + 1
        self._nchild[key] = self._waiting.pop(key, 0)
        self._hits[key] = 0
        self._cost[key] = cost
        if cost is not None and cost > 0:
            self._cost_n += 1
            self._cost_mean += (cost - self._cost_mean) / min(self._cost_n, 1024)
        self._tail[key] = False
        if self._nchild[key] == 0:
            self._push(key)
        if self.shadows and key not in self.shadows[self.expert]._sizes:
            self._surplus[key] = None  # the followed expert did not admit it

    def _on_access(self, key) -> None:
        p = self._parent.get(key)
        parent = p if p is not None else (self._last if self._depth[key] else None)
        if self.shadows:
            self._observe(key, self._sizes[key], self._cost[key], parent)
        self._hit(key, parent)

    def _hit(self, key: Key, chain_parent: Key | None) -> None:
        """Record a hit on a resident block reached through ``chain_parent``. O(log n)."""
        self._touch_chain(key, chain_parent)
        self._tickof[key] = self._tick
        self._hits[key] += 1
        self._tail[key] = False
        if self._seg[key] == 0 and self._two_seg:
            self._set_seg(key, 1)
        if self._nchild[key] == 0:
            self._push(key)

    def _detach(self, key: Key) -> None:
        if self.gone is not None:
            self.gone.append(key)
        parent = self._parent.pop(key)
        self._seg_size[self._seg.pop(key)] -= self._sizes.get(key, self._detached_size)
        n = self._nchild.pop(key)
        if n:  # an inner block leaves (fallback or remove): its children wait for it
            self._waiting[key] = self._waiting.get(key, 0) + n
        for d in (self._tickof, self._depth, self._hits, self._cost, self._tail):
            del d[key]
        self._broken.discard(key)
        self._entry.pop(key, None)
        if parent is not None:
            if parent in self._nchild:
                n = self._nchild[parent] - 1
                self._nchild[parent] = n
                if n == 0:
                    self._push(parent)
            else:
                w = self._waiting[parent] - 1
                if w:
                    self._waiting[parent] = w
                else:
                    del self._waiting[parent]
        if key == self._last:
            self._last = None

    def remove(self, key: Key) -> None:
        """Forget ``key`` (no ghost), here and in every expert. Its resident children keep
        their link and re-attach if it comes back."""
        self._detached_size = self._sizes[key]
        super().remove(key)

    def _on_remove(self, key) -> None:
        self._detach(key)
        self._surplus.pop(key, None)
        if self._probe is not None and key in self._probe._sizes:
            self._probe.remove(key)
        for sh in self.shadows:
            if key in sh._sizes:
                sh.remove(key)
            sh.gone.clear()

    def _peek(self, heap: list) -> Key | None:
        """The best unpinned leaf of ``heap``, left in place (stale tops are dropped).
        Amortised O(log n)."""
        entry, pins = self._entry, self._pins
        held = []
        found = None
        while heap:
            e = heap[0]
            key = e[3]
            if entry.get(key) is not e:
                heapq.heappop(heap)
                continue
            if key in pins:
                held.append(heapq.heappop(heap))
                continue
            found = key
            break
        for e in held:
            heapq.heappush(heap, e)
        return found

    def _evict_one(self) -> Key:
        if self._probe is not None:  # the first eviction: start where the probe stands
            pe = self._probe.expert
            if pe != self.expert:
                self._follow(pe)
            self._probe = None
        self._full = True
        key = self._surplus_victim() if self.shadows else None
        if key is None:
            first = 0 if self._seg_size[0] > self.p or self._seg_size[1] == 0 else 1
            key = self._peek(self._heaps[first])
            if key is None:
                key = self._peek(self._heaps[1 - first])
        if key is not None:
            seg = self._seg[key]
            size = self._sizes[key]
            self._detach(key)
            self._ghost_add(key, seg, size)
            return key
        # every leaf is pinned: fall back to the oldest unpinned inner block (its children
        # wait for it to come back) so the store can always make room. O(n), rare.
        pins = self._pins
        key = min((k for k in self._sizes if k not in pins), key=lambda k: self._tickof[k])
        self._detach(key)
        return key

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        if self.shadows:
            self._observe(key, size, cost, parent)
        if key in self._sizes:
            self._hit(key, parent)
            return True
        if size > self.capacity:
            return False
        while self.used + size > self.capacity:
            self.evict()
        self._sizes[key] = size
        self.used += size
        self._insert(key, size, cost, parent)
        return False

    def _check(self) -> None:
        super()._check()
        for d in (self._tickof, self._depth, self._nchild, self._hits, self._tail, self._parent):
            assert set(d) == set(self._sizes)
        counts: dict = {}
        waiting: dict = {}
        for k, p in self._parent.items():
            if p is not None:
                (counts if p in self._sizes else waiting)[p] = (counts if p in self._sizes else waiting).get(p, 0) + 1
        assert waiting == self._waiting, "waiting links out of sync"
        for k in self._sizes:
            assert self._nchild[k] == counts.get(k, 0), "child count out of sync"
            if self._nchild[k] == 0:
                assert k in self._entry, "leaf without a heap entry"
            else:
                assert k not in self._entry, "inner block still a candidate"
        assert sum(self._seg_size) == self.used
        assert set(self._entry) <= set(self._sizes)
        if self.shadows:
            n = len(self.shadows)
            assert 0 <= self.expert < n and min(map(min, self._score2)) >= 0
            assert all(self.score[i][j] == -self.score[j][i] for i in range(n) for j in range(n))
            held = self.shadows[self.expert]._sizes
            missing = {k for k in self._sizes if k not in held}
            assert missing <= set(self._surplus), "a key the followed expert dropped is not surplus"
            for sh in self.shadows:
                assert not sh.gone
                sh._check()
        if self._probe is not None:
            assert not self._full, "the probe outlived the first eviction"
            self._probe._check()
