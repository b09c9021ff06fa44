"""``kv``: a prefix-tree-aware policy for chained KV blocks (also registered as ``kvtree``).

What it knows that the classic policies do not:

* **Blocks form chains.** A block is useless without its parent, so only *leaves* (no
  resident child) are eviction candidates: a conversation's tail goes before the shared
  prefix it hangs off, and a prefix is never broken in the middle. The resident set stays
  prefix-closed, so (almost) every block hit is also a prefix hit.
* **Broken blocks go first.** A block inserted while its parent is not resident (or is
  itself broken) cannot be served as part of a prefix; it is the first victim instead of
  occupying space as an unservable fragment. (This is how a chain the policy does not
  admit passes through: its deepest block is evicted as it arrives, the rest follow as
  broken blocks, and the shared prefixes it hung off stay.)
* **A request touches its chain root-first.** All blocks one request touches get the same
  request tick (recency is per request, not per block); within a tick deeper blocks go
  first, so a cut always shortens a chain from its end.
* **The tail of a finished request is rarely reused as is** (the next turn of a chat
  re-sends that prefix minus its partial last block, plus more tokens): when the next
  request starts, the previous request's last block is demoted by ``tail_age`` ticks
  (default: below everything that is not a tail).
* **Reused chains are protected (ARC-style, on the tree).** Leaves live in two segments,
  *new* (not hit since insertion) and *reused*, each ordered by request tick; a victim is
  taken from *new* while it is over its target ``p``. ``p`` adapts on ghost hits as in ARC
  (ghosts of evicted keys, ``ghost_factor`` x capacity), but starts at ``p0`` (40% of
  capacity) instead of ARC's 0: a large cache sees too few ghost hits in a trace a few
  capacities long to climb from 0 (on Mooncake's conversation trace at 30k blocks ``p``
  was still rising at the end of the hour), and starting at 0 starves new chains.
* **Shared prefixes are worth more.** A block that several requests reused earns a
  frequency bonus of ``freq_bonus * log2(1 + hits)`` request ticks, so a popular system
  prompt outlives one conversation's tail once it becomes a leaf. Every request through a
  block is a hit on it, so a node's hits are its subtree's hits.
* **Cost.** When the store passes a block's ``cost`` (recompute or transfer time), the
  frequency bonus is scaled by the cost relative to the running mean cost, so expensive
  blocks are kept longer; ``depth_weight`` adds that many ticks per chain depth (0 by
  default: on hit ratio it only hurts; a cost-aware store passes real costs instead).

Tried and not kept (see the issue note): LHD-style learned hit density per block class
(own hits, anchor, tail) with sampled eviction won at the extremes but lost to ARC/LIRS at
5k-10k blocks; ``rel_bonus`` (bonus scaled by the requests the cache holds) and
``protect_current`` (never cut the chain being served while the other segment has a
victim) helped some generated mixes and hurt others; both stay as options, off.

Eviction order is a min-heap per segment on ``(score, -depth, stamp)`` with lazy deletion.
Complexity: insert/access O(log n); evict amortised O(log n) (stale heap entries are
skipped, and the heaps are rebuilt when they grow past twice the live entries); remove
O(1) (lazy) plus O(log n) when the parent becomes a leaf. Ghost lists: O(1) per step.
The every-leaf-pinned fallback is O(n) and only reached when the store pins every leaf.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from eviction.base import EvictionPolicy, Key


class KVPolicy(EvictionPolicy):
    name = "kv"

    def __init__(self, capacity: int, *, freq_bonus: float = 50.0, tail_age: float = 1e9,
                 depth_weight: float = 0.0, adaptive: bool = True, ghost_factor: float = 2.0,
                 min_new: float = 0.0, p0: float = 0.4, rel_bonus: bool = False,
                 protect_current: bool = False,
                 **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._detached_size = 0
        self._ghost_factor = ghost_factor
        self._min_new = min_new * self.capacity
        self._adaptive = adaptive
        self.p = max(self._min_new, p0 * self.capacity)  # target size of the "new" segment (ARC's p)
        self._seg_size = [0, 0]        # resident size of segment 0 (new) and 1 (reused)
        self._ghost: list[OrderedDict] = [OrderedDict(), OrderedDict()]
        self._ghost_size = [0, 0]
        self._heaps: list[list] = [[], []]
        self._seg: dict[Key, int] = {}
        self._freq_bonus = freq_bonus
        self._tail_age = tail_age
        self._depth_weight = depth_weight
        self._tick = 0
        self._broken: set = set()
        self._cost_mean = 0.0
        self._cost_n = 0
        self._acc = 0
        self._rel = rel_bonus
        self._protect = protect_current
        self._stamp = 0
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
            # in units of "requests the cache holds" (capacity / mean blocks per request)
            scale = self.capacity * self._tick / max(self._acc, 1) if self._rel else 1.0
            c = self._cost[key]
            if c is not None and self._cost_mean > 0:
                scale *= c / self._cost_mean
            s += self._freq_bonus * scale * math.log2(1 + h)
        if self._depth_weight:
            s += self._depth_weight * self._depth[key]
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
                        self.p = max(self.p - max(g0 / max(g1, 1), 1) * size, self._min_new)
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
        self._acc += 1
        if parent is None or parent != self._last:
            last = self._last
            if last is not None and last in self._sizes and not self._tail[last]:
                self._tail[last] = True
                if last in self._entry:
                    self._push(last)
            self._tick += 1
        self._last = key

    # -- hooks -------------------------------------------------------------------------------
    def _on_insert(self, key, size, cost, parent) -> None:
        self._set_seg(key, 1 if self._ghost_hit(key) else 0)
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

    def _on_access(self, key) -> None:
        p = self._parent.get(key)
        self._hit(key, p if p is not None else (self._last if self._depth[key] else None))

    def _hit(self, key: Key, chain_parent: Key | None) -> None:
        """Record a hit on a resident block reached through ``chain_parent``. O(log n)."""
        self._touch_chain(key, chain_parent)
        self._tickof[key] = self._tick
        self._hits[key] += 1
        self._tail[key] = False
        if self._seg[key] == 0:
            self._set_seg(key, 1)
        if self._nchild[key] == 0:
            self._push(key)

    def _detach(self, key: Key) -> None:
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
        """Forget ``key`` (no ghost). Its resident children keep their link and re-attach if
        it comes back."""
        self._detached_size = self._sizes[key]
        super().remove(key)

    def _on_remove(self, key) -> None:
        self._detach(key)

    def _pop_leaf(self, seg: int) -> Key | None:
        heap, entry, pins = self._heaps[seg], self._entry, self._pins
        held = []
        try:
            while heap:
                e = heapq.heappop(heap)
                key = e[3]
                if entry.get(key) is not e:
                    continue
                if key in pins:
                    held.append(e)
                    continue
                return key
            return None
        finally:
            for e in held:
                heapq.heappush(heap, e)

    def _evict_one(self) -> Key:
        first = 0 if self._seg_size[0] > self.p or self._seg_size[1] == 0 else 1
        key = self._pop_leaf(first)
        if key is not None and self._protect and self._tickof[key] == self._tick \
                and key not in self._broken:
            # the segment's best victim is the chain being served right now: cutting it
            # would leave its next blocks unservable; take the other segment's if it has one
            other = self._pop_leaf(1 - first)
            if other is not None and self._tickof[other] != self._tick:
                self._push(key)
                key, first = other, 1 - first
            elif other is not None:
                self._push(other)
        for seg in (first, 1 - first):
            if key is None:
                key = self._pop_leaf(seg)
            if key is not None:
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
        if key in self._sizes:
            self._hit(key, parent)
            return True
        return super().request(key, size, cost, parent, next_access)

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
