"""``kvstore simulate``: trace-driven eviction study (engine in ``eviction.simulator``).

Top-level imports stay light (argparse only); the simulator, the trace readers and
matplotlib are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_POLICIES = "lru,fifo,clock,lfu,arc,s3fifo,sieve,lirs,gdsf,kv,belady"


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        for suffix, m in (("k", 1_000), ("m", 1_000_000), ("g", 1_000_000_000)):
            if part.endswith(suffix):
                part, mult = part[:-1], m
                break
        out.append(int(float(part) * mult))
    if not out or any(c <= 0 for c in out):
        raise argparse.ArgumentTypeError(f"capacities must be positive integers: {text!r}")
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace file (Mooncake .jsonl, oracleGeneral .bin, .csv)")
    parser.add_argument("--format", default="auto", choices=["auto", "mooncake", "oracle", "csv"],
                        help="trace format (default: from the file name)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated registry names (default: {DEFAULT_POLICIES})")
    parser.add_argument("--capacities", type=_int_list, required=True,
                        help="comma-separated capacities (blocks for block traces, bytes for sized ones; 1k/5m ok)")
    parser.add_argument("--metric", choices=["block", "prefix"], default="block",
                        help="block: every access is a get; prefix: a request scores its leading run of hits")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--plot", metavar="PNG", help="write a miss-ratio-vs-capacity plot (needs matplotlib)")
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (default: CPU count)")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N records/requests")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


class _Progress:
    """A one-line progress bar on stderr (never stdout)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, res: dict) -> None:
        if not self.enabled:
            return
        width = 30
        fill = int(width * done / total)
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                f"{res['policy']}@{res['capacity']} hit={res['hit_ratio']:.4f} ({res['seconds']:.1f}s)")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
            if done == total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _table(doc: dict, policies: list[str], capacities: list[int]) -> str:
    by = {(r["policy"], r["capacity"]): r for r in doc["results"]}
    head = f"{'policy':<10}" + "".join(f"{c:>12}" for c in capacities)
    lines = [f"trace {doc['trace']}  metric {doc['metric']}  hit ratio by capacity ({doc['unit']})", head]
    for p in policies:
        lines.append(f"{p:<10}" + "".join(f"{by[(p, c)]['hit_ratio']:>12.4f}" for c in capacities))
    return "\n".join(lines)


def _plot(doc: dict, policies: list[str], capacities: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eviction.registry import OFFLINE

    by = {(r["policy"], r["capacity"]): r for r in doc["results"]}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        ys = [1.0 - by[(p, c)]["hit_ratio"] for c in capacities]
        ax.plot(capacities, ys, marker="o", label=p, linestyle="--" if p in OFFLINE else "-",
                color="black" if p in OFFLINE else None)
    ax.set_xscale("log")
    ax.set_xlabel(f"capacity ({doc['unit']})")
    ax.set_ylabel("miss ratio")
    ax.set_title(f"{doc['trace']} ({doc['metric']} metric)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from eviction.registry import available, make_policy
    from eviction.simulator import simulate_many
    from eviction.traces import read_trace

    policies = [p.strip().lower() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        try:
            make_policy(p, 1)
        except ValueError as exc:
            print(f"kvstore simulate: {exc}", file=sys.stderr)
            return 2
    if not policies:
        print(f"kvstore simulate: no policies given; choose from {available()}", file=sys.stderr)
        return 2
    try:
        trace = read_trace(args.trace, args.format, args.limit)
    except (OSError, ValueError) as exc:
        print(f"kvstore simulate: cannot read trace: {exc}", file=sys.stderr)
        return 2
    capacities = sorted(set(args.capacities))
    t0 = time.perf_counter()
    results = simulate_many(trace, policies, capacities, args.metric, jobs=args.jobs or None,
                            progress=_Progress(not args.no_progress))
    elapsed = time.perf_counter() - t0
    print(f"simulated {len(results)} runs of {trace.n_accesses} accesses in {elapsed:.1f}s",
          file=sys.stderr)
    for r in results:
        r.pop("seconds", None)
    doc = {"trace": trace.name, "metric": args.metric, "unit": trace.unit, "results": results}
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(_table(doc, policies, capacities))
    if args.plot:
        try:
            _plot(doc, policies, capacities, args.plot)
        except ImportError:
            print("kvstore simulate: --plot needs matplotlib (pip install 'kvstore[plot]')", file=sys.stderr)
            return 1
    return 0
