"""``kvstore serve``: run the sidecar until SIGTERM/SIGINT (then finish in-flight work, exit 0).

Security: only loopback TCP or ipc:// unless ``--curve-secret``/``--curve-allow`` (CurveZMQ)
or ``--insecure-allow-remote``; see :mod:`kvstore.sidecar.security`.

Store capacities come from ``--config store.toml`` (keys = ``StoreConfig`` field names) with
flags overriding the file; every namespace gets these capacities, and its layout and block
size from its first client.

Fail fast: the whole configuration (file, flags, the disk path and shared-memory directory
on this machine) is checked before anything is bound; every mistake is printed, one line
each, and the command exits 2. ``--check`` does only that (exit 0 when all is well).
"""

from __future__ import annotations

import argparse


def _size(text: str) -> int:
    """Bytes from ``123``, ``64MiB``, ``1GiB``, ``500MB``..."""
    units = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1048576, 64MiB, 1GiB)")
    return int(float(num) * units[unit])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555",
                        help="ZeroMQ endpoint to bind: tcp://HOST:PORT (PORT * = any free) or ipc:///path")
    parser.add_argument("--config", default=None, help="TOML file whose keys are StoreConfig fields")
    for tier in ("device", "host", "disk"):
        parser.add_argument(f"--{tier}-bytes", type=_size, default=None, help=f"{tier} tier capacity per namespace")
    parser.add_argument("--disk-path", default=None, help="directory for the namespaces' slab files")
    parser.add_argument("--policy", default=None, help="eviction policy for every tier (registry name)")
    parser.add_argument("--fsync", choices=("always", "interval", "never"), default=None)
    parser.add_argument("--persist", action="store_true", default=None, help="keep disk blocks across restarts")
    parser.add_argument("--device", default=None,
                        help="device tier device: cpu, cuda or cuda:N (default: cpu -- a sidecar takes no GPU "
                             "memory unless asked; cuda:N is checked against this machine's devices at start)")
    parser.add_argument("--remote-url", default=None,
                        help="shared remote tier: redis://HOST:PORT[/DB], rediss://..., or "
                             "redis+cluster://H1:P1,H2:P2 (password in the URL or KVSTORE_REDIS_PASSWORD)")
    parser.add_argument("--remote-write", choices=("through", "back"), default=None,
                        help="write remote blocks during put (through) or from a bounded queue (back)")
    parser.add_argument("--remote-ttl", type=float, default=None, help="seconds remote blocks live (default: forever)")
    parser.add_argument("--remote-deadline", type=float, default=None,
                        help="seconds a remote call may take before its blocks count as misses")
    parser.add_argument("--remote-queue-bytes", type=_size, default=None,
                        help="write-behind queue bound (beyond it, puts' remote writes are dropped and counted)")
    parser.add_argument("--remote-drain", type=float, default=None,
                        help="seconds SIGTERM waits for the write-behind queue to reach Redis before exit "
                             "(what is still queued then is dropped and counted)")
    for tier in ("host", "disk", "remote"):
        parser.add_argument(f"--{tier}-codec", default=None,
                            help=f"how the {tier} tier stores blocks: none, lossless, fp8, int8 or int4 (README: codecs)")
    parser.add_argument("--lossy-ok", action="store_true", default=None,
                        help="gets that do not say exact= accept blocks a lossy codec stored")
    parser.add_argument("--workers", type=int, default=4, help="threads serving blocking requests")
    parser.add_argument("--lease-timeout", type=float, default=30.0,
                        help="seconds after which a client's unreleased lease/reservation is reclaimed")
    parser.add_argument("--max-message-bytes", type=_size, default=1 << 30,
                        help="larger requests are refused with a too_large error")
    parser.add_argument("--max-namespaces", type=int, default=64)
    parser.add_argument("--no-shm", action="store_true", help="no shared-memory data plane (frames only)")
    parser.add_argument("--shm-dir", default=None,
                        help="where shared arenas live (a tmpfs; one sidecar per directory). Default: a "
                             "directory of this sidecar's own under /dev/shm, named after the endpoint")
    parser.add_argument("--max-slots-per-namespace", type=int, default=1 << 20,
                        help="blocks one namespace's tiers may hold in all (bounds index memory; tiny "
                             "blocks are refused at hello)")
    parser.add_argument("--max-namespaces-per-key", type=int, default=16,
                        help="namespaces one CurveZMQ client key may create")
    parser.add_argument("--max-claims", type=int, default=1024,
                        help="open shared-memory leases/reservations per connection (more get busy)")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration (file, flags, paths) and exit: 0 when usable, 2 otherwise")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-addr", default="127.0.0.1", help="address for the metrics endpoint")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="tokens one request may name")
    parser.add_argument("--max-reply-bytes", type=_size, default=1 << 30,
                        help="bytes of replies not yet read by their peers the sidecar holds in all (beyond: busy)")
    parser.add_argument("--max-reply-bytes-per-peer", type=_size, default=256 << 20,
                        help="the same for one connection")
    parser.add_argument("--max-inflight", type=int, default=64,
                        help="requests one connection may have queued or running (more get a busy error)")
    parser.add_argument("--curve-secret", default=None,
                        help="CurveZMQ: the server's NAME.key_secret (from kvstore keygen)")
    parser.add_argument("--curve-allow", default=None,
                        help="CurveZMQ: directory of allowed client NAME.key files; others are refused")
    parser.add_argument("--insecure-allow-remote", action="store_true",
                        help="allow a non-loopback tcp bind without CurveZMQ (anyone who can reach it can "
                             "read and write every namespace)")


def build(args: argparse.Namespace):
    """The (endpoint, StoreConfig, ServerOptions) an invocation asks for."""
    from kvstore.config import StoreConfig, sidecar_config
    from kvstore.sidecar.server import ServerOptions

    overrides = {"device_bytes": args.device_bytes, "host_bytes": args.host_bytes, "disk_bytes": args.disk_bytes,
                 "disk_path": args.disk_path, "policy": args.policy, "fsync": args.fsync, "persist": args.persist,
                 "device": args.device, "remote_url": args.remote_url, "remote_write": args.remote_write,
                 "remote_ttl_s": args.remote_ttl, "remote_deadline_s": args.remote_deadline,
                 "remote_queue_bytes": args.remote_queue_bytes, "remote_drain_s": args.remote_drain,
                 "host_codec": args.host_codec, "disk_codec": args.disk_codec, "remote_codec": args.remote_codec,
                 "lossy_ok": args.lossy_ok}
    if args.config:
        config = StoreConfig.from_toml(args.config, **overrides)
    else:
        config = StoreConfig(**{k: v for k, v in overrides.items() if v is not None})
    config = sidecar_config(config)
    options = ServerOptions(workers=args.workers, lease_timeout_s=args.lease_timeout,
                            max_message_bytes=args.max_message_bytes, max_namespaces=args.max_namespaces,
                            shm=not args.no_shm, shm_dir=args.shm_dir, metrics_port=args.metrics_port,
                            metrics_addr=args.metrics_addr, max_tokens=args.max_tokens,
                            max_inflight_per_client=args.max_inflight, curve_secret=args.curve_secret,
                            curve_allow=args.curve_allow, insecure_allow_remote=args.insecure_allow_remote,
                            max_slots_per_namespace=args.max_slots_per_namespace,
                            max_namespaces_per_key=args.max_namespaces_per_key, max_claims_per_client=args.max_claims,
                            max_reply_bytes=args.max_reply_bytes,
                            max_reply_bytes_per_peer=args.max_reply_bytes_per_peer)
    return args.endpoint, config, options


def problems(args: argparse.Namespace) -> tuple[list[str], tuple | None]:
    """Every mistake in this invocation (one message each) and, when there is none, what
    :func:`build` made. Touches the disk path (creates it, writes a probe) but binds nothing."""
    from kvstore.config import environment_problems
    from kvstore.errors import ConfigError
    from kvstore.sidecar.limits import option_problems
    from kvstore.sidecar.security import check_bind

    try:
        built = build(args)
    except ConfigError as exc:
        return exc.problems, None
    endpoint, config, options = built
    found = environment_problems(config) + option_problems(options)
    if not (endpoint.startswith("tcp://") or endpoint.startswith("ipc://")):
        found.append(f"endpoint {endpoint!r} must be tcp://HOST:PORT or ipc:///path")
    else:
        try:
            check_bind(endpoint, bool(options.curve_secret or options.curve_allow), options.insecure_allow_remote)
        except (ConfigError, ValueError) as exc:
            found.append(str(exc))
    return found, (None if found else built)


def run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import sys

    from kvstore.errors import ConfigError
    from kvstore.sidecar.server import SidecarServer

    log = logging.getLogger("kvstore.serve")
    found, built = problems(args)
    if found:
        for p in found:
            print(f"kvstore serve: {p}", file=sys.stderr)
        print(f"kvstore serve: {len(found)} problem(s) in the configuration; nothing started", file=sys.stderr)
        return 2
    if args.check:
        print("kvstore serve: configuration OK", file=sys.stderr)
        return 0
    try:
        endpoint, config, options = built
        server = SidecarServer(endpoint, config, options)
        bound = server.bind()
    except (ConfigError, OSError) as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 2

    stopping = []

    def on_signal(signum, _frame):
        # Once only: a second signal can land while the first handler is inside
        # Event.set() (its lock is not re-entrant), which deadlocked the process.
        if stopping:
            log.warning("received %s again: already stopping (write-behind queues drain for up to "
                        "remote_drain_s = %s s)", signal.Signals(signum).name, config.remote_drain_s)
            return
        stopping.append(signum)
        drain = (f", then draining write-behind queues for up to {config.remote_drain_s} s"
                 if config.remote_url and config.remote_write == "back" else "")
        log.warning("received %s: finishing in-flight requests%s", signal.Signals(signum).name, drain)
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = f", metrics on http://{options.metrics_addr}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"kvstore sidecar serving on {bound}{metrics}", file=sys.stderr, flush=True)
    server.serve_forever()
    print("kvstore sidecar stopped", file=sys.stderr, flush=True)
    return 0
