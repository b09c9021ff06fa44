"""The shape every benchmark reports (docs/decisions.md), printed as a table or one JSON document.

Every figure is measured beside the machine limit for the same work in the same run, so a
noisy shared machine shows up in both and the ratio stays meaningful.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Literal

from allocator.checksum import usable_cpus


@dataclass
class Result:
    name: str
    value: float
    unit: str
    limit: float | None = None
    target: float | None = None
    better: Literal["higher", "lower"] = "higher"
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.limit:
            self.ratio = self.value / self.limit

    def meets_target(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.better == "higher" else self.ratio <= self.target


@dataclass
class Report:
    suite: str
    machine: dict = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Result:
        r = Result(*args, **kwargs)
        self.results.append(r)
        print(f"  {r.name}: {r.value:.4g} {r.unit}" + (f" (limit {r.limit:.4g}, ratio {r.ratio:.3f})" if r.limit else ""),
              file=sys.stderr, flush=True)
        return r

    def to_json(self) -> str:
        return json.dumps({"suite": self.suite, "machine": self.machine,
                           "results": [asdict(r) for r in self.results]}, indent=2)

    def to_table(self) -> str:
        rows = [("name", "value", "unit", "limit", "ratio", "target", "ok")]
        for r in self.results:
            ok = r.meets_target()
            rows.append((r.name, f"{r.value:.4g}", r.unit,
                         "" if r.limit is None else f"{r.limit:.4g}",
                         "" if r.ratio is None else f"{r.ratio:.3f}",
                         "" if r.target is None else (("≥" if r.better == "higher" else "≤") + f"{r.target:g}"),
                         "" if ok is None else ("yes" if ok else "NO")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"suite: {self.suite}   machine: {self.machine}"]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        return "\n".join(lines)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "usable_cpus": usable_cpus()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    return info


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
