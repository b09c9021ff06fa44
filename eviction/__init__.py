"""Eviction policies over opaque keys, a trace simulator and the Belady bound.

Imports nothing else of this project (see docs/architecture.md).
"""

from eviction.base import EvictionPolicy, NoVictimError
from eviction.registry import CLASSIC, OFFLINE, POLICIES, available, make_policy, online

__all__ = ["EvictionPolicy", "NoVictimError", "POLICIES", "OFFLINE", "CLASSIC", "available",
           "make_policy", "online"]
