"""``kvstore stats --endpoint URL``: a running sidecar's statistics (all namespaces)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="the sidecar's endpoint")
    parser.add_argument("--namespace", default=None, help="only this namespace")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--curve-secret", default=None, help="CurveZMQ: this client's NAME.key_secret")
    parser.add_argument("--curve-server", default=None, help="CurveZMQ: the sidecar's public NAME.key")


def request_once(endpoint: str, op: str, args: dict, timeout: float = 5.0,
                 curve: tuple[str, str] | None = None):
    """One request on a fresh DEALER socket; returns the result or raises the mapped error.

    No retry (the caller is a human or a script); ``LINGER=0`` so an absent sidecar costs
    exactly ``timeout``.
    """
    import zmq

    from kvstore.sidecar.protocol import (SidecarUnavailableError, VERSION, error_from_reply, parse_request,
                                  request_frames)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        if curve is not None:
            from kvstore.sidecar.security import apply_client_curve, load_keys

            apply_client_curve(sock, load_keys(curve[0]), load_keys(curve[1]).public)
        sock.connect(endpoint)
        sock.send_multipart(request_frames(1, op, args, int(timeout * 1000)))
        if not sock.poll(int(timeout * 1000)):
            raise SidecarUnavailableError(f"no sidecar answered at {endpoint} within {timeout:g} s")
        header, _ = parse_request(sock.recv_multipart())
        if header.get("v") != VERSION or not header.get("ok"):
            raise error_from_reply(header.get("error"))
        return header.get("result")
    except zmq.Again:
        raise SidecarUnavailableError(f"could not send to {endpoint} within {timeout:g} s "
                                      "(refused handshake? check the CurveZMQ keys)") from None
    finally:
        sock.close(0)
        ctx.term()


def _table(stats: dict) -> str:
    s = stats["server"]
    counters = "".join(f"  {label} {s[key]}" for key, label in (
        ("requests", "requests"), ("errors", "errors"), ("open_claims", "open leases"), ("reclaimed", "reclaimed"),
        ("unauthorised", "unauthorised"), ("busy", "busy")) if key in s)  # a CurveZMQ tenant sees fewer
    lines = [f"sidecar {s['endpoint']}  protocol v{s['version']}  up {s['uptime_s']:.0f} s{counters}"]
    r = s.get("replies")
    if r:
        lines.append(f"unread replies {r['queued_bytes']} B (peak {r['peak_bytes']} B) of at most {r['max_bytes']} B, "
                     f"{r['max_bytes_per_peer']} B per connection; refused {r['refused']}")
    if "namespace" in stats:
        namespaces = {stats["namespace"]["namespace"]: stats["namespace"]}
    else:
        namespaces = stats.get("namespaces") or {}
    if not namespaces:
        lines.append("  no namespaces yet (a namespace is created by its first client's hello)")
    for name, st in namespaces.items():
        lines.append(f"  namespace {name}: {st['blocks']} blocks of {st['block_bytes']} B, hits {st['hits']}, "
                     f"misses {st['misses']}, evictions {st['evictions']}, demotions {st['demotions']}")
        for tier, t in st["tiers"].items():
            lines.append(f"    {tier:6s} {t['used_blocks']:>8d}/{t['capacity_blocks']:<8d} blocks  "
                         f"{t['used_bytes'] / 2**20:10.1f} MiB  policy {t['policy']}")
        r = st.get("remote")
        if r:
            lines.append(f"    remote {r['url']}  {'DEGRADED' if r['degraded'] else 'ok'}  hits {r['hit_blocks']} "
                         f"misses {r['miss_blocks']} written {r['written_blocks']} queued {r['queued_blocks']} "
                         f"errors {r['errors']} ({r['write']})")
            lines.append(f"      dropped unsent {r.get('dropped_unsent_blocks', 0)}  refilled "
                         f"{r.get('refilled_blocks', 0)}  wrong-type deleted {r.get('wrong_type_blocks', 0)}  "
                         f"pool waits expired {r.get('pool_timeouts', 0)}  refused by ACL {r.get('denied', 0)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from kvstore.errors import KVStoreError

    try:
        if bool(args.curve_secret) != bool(args.curve_server):
            print("kvstore stats: CurveZMQ needs both --curve-secret and --curve-server", file=sys.stderr)
            return 2
        curve = (args.curve_secret, args.curve_server) if args.curve_secret else None
        stats = request_once(args.endpoint, "stats", {"ns": args.namespace} if args.namespace else {}, args.timeout,
                             curve)
    except KVStoreError as exc:
        print(f"kvstore stats: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else _table(stats))
    return 0
