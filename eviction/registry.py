"""Policies by lower-case name."""

from __future__ import annotations

from eviction.arc import ARCPolicy
from eviction.base import EvictionPolicy
from eviction.belady import BeladyPolicy
from eviction.clock import ClockPolicy
from eviction.fifo import FIFOPolicy
from eviction.gdsf import GDSFPolicy
from eviction.kv import KVPolicy
from eviction.lfu import LFUPolicy
from eviction.lirs import LIRSPolicy
from eviction.lru import LRUPolicy
from eviction.s3fifo import S3FIFOPolicy
from eviction.sieve import SievePolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (LRUPolicy, FIFOPolicy, ClockPolicy, LFUPolicy, ARCPolicy, S3FIFOPolicy,
                SievePolicy, LIRSPolicy, GDSFPolicy, BeladyPolicy, KVPolicy)
}
#: other names a policy answers to
ALIASES: dict[str, str] = {"kvtree": "kv"}

#: Policies that need the future (the simulator supplies next-access times).
OFFLINE: frozenset[str] = frozenset({"belady"})

#: The classic policies checked against libCacheSim (its class name for each).
CLASSIC: dict[str, str] = {
    "lru": "LRU", "fifo": "FIFO", "clock": "Clock", "lfu": "LFU", "arc": "ARC",
    "s3fifo": "S3FIFO", "sieve": "Sieve", "lirs": "LIRS", "gdsf": "GDSF", "belady": "Belady",
}


def available() -> list[str]:
    return sorted(POLICIES)


def online() -> list[str]:
    """Registered policies usable without knowledge of the future (the tier manager's)."""
    return sorted(n for n in POLICIES if n not in OFFLINE)


def make_policy(name: str, capacity: int, **kwargs) -> EvictionPolicy:
    """Build a policy by registry name; unknown names raise ``ValueError`` listing the choices."""
    key = name.lower()
    key = ALIASES.get(key, key)
    try:
        cls = POLICIES[key]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {available()}") from None
    return cls(capacity, **kwargs)
