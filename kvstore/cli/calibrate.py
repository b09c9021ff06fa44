"""``kvstore calibrate``: measure link bandwidths, latencies and compute rates into a cost
profile (the measurements are :mod:`kvstore.restore.calibrate`'s)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvstore.restore.calibrate import default_profile_path, load_or_measure


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refresh", action="store_true", help="measure again even if a profile exists")
    parser.add_argument("--json", action="store_true", help="print the profile as one JSON document on stdout")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile path (default: the user cache dir's cost_profile.json)")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the disk test file (default: temp)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (seconds, noisier)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size for the GEMM shapes")
    parser.add_argument("--kv-dim", type=int, default=1024, help="num_kv_heads * head_dim for the GEMM shapes")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per recompute GEMM")
    parser.add_argument("--device", default=None,
                        help="device to measure: cpu, cuda or cuda:N (default: cuda when present); a store "
                             "uses a profile only when it was measured on its kind of device")
    parser.add_argument("--remote-url", default=None,
                        help="also measure the remote tier's link (remote->host) on this Redis / Cluster")


def run(args: argparse.Namespace) -> int:
    path = args.profile or default_profile_path()
    profile, measured = load_or_measure(path, args.refresh, args)
    doc = {**profile.to_dict(), "path": str(path), "measured": measured}
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"cost profile ({'measured' if measured else 'cached'}): {path}", file=sys.stderr)
        for name, link in profile.links.items():
            print(f"  {name:14s} {link.bandwidth_Bps / 1e9:8.2f} GB/s  latency {link.latency_s * 1e6:8.1f} us")
        print(f"  recompute      {profile.recompute.flops_per_s / 1e9:8.1f} GFLOP/s latency "
              f"{profile.recompute.latency_s * 1e6:8.1f} us")
        print(f"  prefill        {profile.prefill.flops_per_s / 1e9:8.1f} GFLOP/s latency "
              f"{profile.prefill.latency_s * 1e6:8.1f} us")
    return 0
