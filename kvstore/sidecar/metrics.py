"""The sidecar's counters and its Prometheus metrics.

:class:`Counters` counts server events by kind (requests, errors, malformed, busy,
unauthorised, reclaimed, kept_alive); ``stats`` and the metrics endpoint read them.
:class:`Metrics` (only with ``metrics_port``) serves a registry of this server's own (no
process-global state): request latency and outcomes by op (:meth:`Metrics.observe`), and a
collector that reads every namespace's ``stats()`` at scrape time, so no store counter is
duplicated here. O(1) per observation; a scrape is O(namespaces x tiers).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

from kvstore.sidecar.claims import ClaimBook
from kvstore.sidecar.namespaces import NamespaceBook

#: the server events counted, in the order ``stats`` lists them
EVENTS = ("requests", "errors", "malformed", "reclaimed", "kept_alive", "unauthorised", "busy")


class Counters:
    """Server events by kind; thread-safe. ``counters["busy"]`` reads one."""

    def __init__(self) -> None:
        self._values = dict.fromkeys(EVENTS, 0)
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class Metrics:
    """Prometheus metrics in a registry of this server's own (no process-global state)."""

    def __init__(self, namespaces: NamespaceBook, claims: ClaimBook, counters: Counters) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram("kvstore_request_seconds", "request latency by op", ["op"],
                                 registry=self.registry,
                                 buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                                          0.25, 0.5, 1, 2.5, 5, 10))
        self.requests = Counter("kvstore_requests", "requests by op and outcome code", ["op", "code"],
                                registry=self.registry)
        self.registry.register(StoreCollector(namespaces, claims, counters))
        self._http: Any = None

    def observe(self, op: str, code: str, seconds: float) -> None:
        self.latency.labels(op).observe(seconds)
        self.requests.labels(op, code).inc()

    def serve(self, port: int, addr: str) -> int:
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def observe(metrics: Metrics | None, op: str, code: str, received: float) -> None:
    """Record one request's outcome and latency since ``received`` (no-op without metrics)."""
    if metrics is not None:
        metrics.observe(op, code, time.monotonic() - received)


class StoreCollector:
    """Reads every namespace's ``stats()`` at scrape time (no duplicated counters)."""

    def __init__(self, namespaces: NamespaceBook, claims: ClaimBook, counters: Counters) -> None:
        self.namespaces = namespaces
        self.claims = claims
        self.counters = counters

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {name: CounterMetricFamily(f"kvstore_{name}", f"{name} (blocks)", labels=["namespace"])
                    for name in ("hits", "misses", "evictions", "demotions", "promotions", "put_blocks", "get_blocks")}
        used = GaugeMetricFamily("kvstore_tier_used_bytes", "bytes held per tier", labels=["namespace", "tier"])
        cap = GaugeMetricFamily("kvstore_tier_capacity_bytes", "capacity per tier", labels=["namespace", "tier"])
        claims = GaugeMetricFamily("kvstore_open_claims", "leases and reservations held by clients")
        remote = {name: CounterMetricFamily(f"kvstore_remote_{name}", f"remote tier: {name}", labels=["namespace"])
                  for name in ("hit_blocks", "miss_blocks", "written_blocks", "errors", "timeouts",
                               "dropped_unsent_blocks", "refilled_blocks", "wrong_type_blocks", "pool_timeouts",
                               "denied")}
        remote_queued = GaugeMetricFamily("kvstore_remote_queued_blocks", "remote write-behind queue",
                                          labels=["namespace"])
        remote_degraded = GaugeMetricFamily("kvstore_remote_degraded", "1 while a remote shard is failing",
                                            labels=["namespace"])
        server = CounterMetricFamily("kvstore_server_events", "sidecar events by kind (requests, errors, "
                                     "malformed, reclaimed, unauthorised, busy...)", labels=["kind"])
        for name, value in self.counters.snapshot().items():
            server.add_metric([name], value)
        for ns in self.namespaces.all():
            st = ns.store.stats()
            label = self.namespaces.metric_label(ns)
            for name, fam in counters.items():
                fam.add_metric([label], st[name])
            for tier, t in st["tiers"].items():
                used.add_metric([label, tier], t["used_bytes"])
                cap.add_metric([label, tier], t["capacity_bytes"])
            if "remote" in st:
                for name, fam in remote.items():
                    fam.add_metric([label], st["remote"][name])
                remote_queued.add_metric([label], st["remote"]["queued_blocks"])
                remote_degraded.add_metric([label], int(st["remote"]["degraded"]))
        claims.add_metric([], self.claims.open())
        yield from counters.values()
        yield used
        yield cap
        yield claims
        yield server
        yield from remote.values()
        yield remote_queued
        yield remote_degraded
