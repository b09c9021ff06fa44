"""Belady's MIN: evict the key whose next access is farthest (offline; needs the future)."""

from __future__ import annotations

from eviction.base import PriorityPolicy

NEVER = float("inf")


class BeladyPolicy(PriorityPolicy):
    """Offline optimal for unit sizes (and libCacheSim ``Belady`` for any sizes: always
    admits, evicts the farthest next access; keys never accessed again go first).

    The simulator passes ``next_access`` (position of the key's next access in the trace,
    ``None``/inf for never). Through the tier-manager API there is no future, so keys
    inserted by ``insert`` count as never re-accessed.

    The priority is minus the next access. Structure and complexity:
    :class:`~eviction.base.PriorityPolicy` (a lazy heap): insert/access O(log n); evict
    amortised O(log n); remove O(1) (lazy).
    """

    name = "belady"
    offline = True

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self._pending: float = NEVER

    def _on_insert(self, key, size, cost, parent) -> None:
        self._set_priority(key, -self._pending)

    def _on_access(self, key) -> None:
        self._set_priority(key, -self._pending)

    def _on_remove(self, key) -> None:
        self._forget(key)

    def request(self, key, size=1, cost=None, parent=None, next_access=None) -> bool:
        self._pending = NEVER if next_access is None or next_access < 0 else next_access
        try:
            return super().request(key, size, cost, parent, next_access)
        finally:
            self._pending = NEVER
