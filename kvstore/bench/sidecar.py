"""``kvstore bench sidecar``: the sidecar beside bare ZeroMQ and memcpy, in one run.

Results (the bench shape, docs/decisions.md), each with the machine limit measured in the same run --
for the data-path figures timed alternately with the op (limit, op, limit, ...; medians), so
on a shared machine both see the same load:

* ``lookup_p50_us`` / ``lookup_p99_us``: a ``lookup`` of a 32-block prefix over TCP vs a bare
  pyzmq DEALER/ROUTER echo of the same request bytes, alternately (target p50 <= 1.3); the
  prompt is asked about repeatedly, as an engine does while a request waits, so its block
  keys come from the store's memo; ``lookup_unseen_p50_us`` is the same with a block no
  request named before (hashing paid; no target);
* ``shm_get_gbps`` / ``shm_put_gbps``: 64 MiB of KV through shared memory vs one memcpy of
  the same bytes (``clone`` for get, which returns a new tensor; ``copy_`` into existing
  memory for put) (target >= 0.8); a put is one copy into staged slots, each cache-sized
  piece of the source hashed (xxh3) right after its copy, on every core, and one ``put_shm``
  message; a get one copy out, each piece of the private copy hashed right after its copy
  and verified against the writer's checksums, and a release not waited for;
* ``shm_load_into_gbps`` / ``shm_save_from_gbps``: the same KV between the sidecar and an
  engine's cross-layer paged pool at shuffled block ids, vs one memcpy (``copy_``) of the
  same bytes (target >= 0.8): one copy each, slot -> pool rows (verified in the pool) and
  pool rows -> staged slots; ``shm_save_from_async_gbps``: ``save_from_async(...).wait()``;
* ``tcp_get_gbps`` / ``tcp_put_gbps``: the same KV as ZeroMQ frames vs a bare zmq transfer
  of the same bytes (target >= 0.7);
* ``lookup_ops_per_s_8_clients``: 8 client processes doing lookups vs 8 processes echoing.

And the parts a data-path figure is made of, each timed the same way beside the same limit,
so a figure below its target shows where the time went (on this machine and the next):

* ``health_rt_us``: a ``health`` round trip vs the bare echo (the sidecar's least work per
  message, answered on its loop); every shared-memory op pays one such exchange or more;
* ``copy_hash_gbps``: the client's own copy-and-hash step (:func:`allocator.checksum.copy_digests`,
  on the client's cores) from a put's blocks into private memory -- no sidecar, no shared
  memory -- vs the same memcpy: the cost of the integrity check alone;
* ``hash_cache_gbps``: xxh3 over a cache-resident piece on one core vs the memcpy (how much
  a core's share of the hashing adds to a copy).

``--cpus 0`` (a list as ``taskset -c`` takes) pins the sidecar, the echo peer and the
driver to those cores: ``--cpus 0`` against ``--cpus 0,1`` shows what one core more buys.

Layout: the engine-side work runs in ``python -m kvstore.bench.sidecar_client`` (``kvstore`` does
not import ``clients``); the sidecar is ``python -m kvstore serve`` and the echo peer is
this module's ``__main__``, each in its own process, so the GIL of one never slows another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from kvstore.bench.report import Report, machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spawn_and_read_endpoint(cmd: list[str], marker: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        if marker in line:
            return proc, line.split(marker, 1)[1].split()[0].rstrip(",")
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd[:4])} did not start")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpus", type=parse_cpus, default=None,
                        help="run the sidecar, the echo peer and the driver on these cores only "
                             "(as taskset -c: 0 or 0,1 or 0-3; default: all this process may use)")


def parse_cpus(text: str) -> frozenset[int]:
    """``"0,2-3"`` -> {0, 2, 3}; every core must be one this process may run on."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if last < first:
                raise ValueError(part)
            cpus.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus takes a list like 0 or 0,1 or 0-3, got {text!r}") from None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    if not cpus or not cpus <= allowed:
        raise argparse.ArgumentTypeError(f"--cpus {text!r}: cores must be among {sorted(allowed)}")
    return frozenset(cpus)


def _cores_of(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except (AttributeError, OSError):
        return None


def run(args: argparse.Namespace) -> Report:
    quick = bool(getattr(args, "quick", False))
    cpus = getattr(args, "cpus", None)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # inherited by every process started below
    report = Report("sidecar", machine_info())
    host_bytes = (64 if quick else 256) << 20
    sidecar, endpoint = _spawn_and_read_endpoint(
        [sys.executable, "-m", "kvstore", "serve", "--endpoint", "tcp://127.0.0.1:*", "--device-bytes", "0",
         "--host-bytes", str(host_bytes), "--workers", "4"], "serving on ")
    echo, echo_endpoint = _spawn_and_read_endpoint([sys.executable, "-m", "kvstore.bench.sidecar", "echo"],
                                                   "echo on ")
    try:
        affinity = {name: _cores_of(p.pid) for name, p in (("sidecar", sidecar), ("echo", echo))}
        affinity["driver"] = _cores_of(0)  # it inherits ours
        cmd = [sys.executable, "-m", "kvstore.bench.sidecar_client", "--endpoint", endpoint, "--echo", echo_endpoint]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"bench driver failed:\n{proc.stderr[-3000:]}")
        sys.stderr.write(proc.stderr)
        data = json.loads(proc.stdout)
    finally:
        for p in (sidecar, echo):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    report.machine.update(data.get("machine", {}))
    report.machine["cores_of"] = affinity  # what each process of the run was allowed to use
    for r in data["results"]:
        report.add(r["name"], r["value"], r["unit"], limit=r.get("limit"), target=r.get("target"),
                   better=r.get("better", "higher"))
    return report


def echo_main() -> int:
    """A bare ROUTER peer: echoes frames back; ``[b"GET", n]`` -> n bytes; ``[b"PUT", data]`` -> ``b"ok"``."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"echo on tcp://127.0.0.1:{port}", file=sys.stderr, flush=True)
    blobs: dict[int, bytearray] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        ident, body = frames[0], frames[1:]
        tag = body[0].bytes if len(body[0]) <= 8 else b""
        if tag == b"GET":
            n = int(body[1].bytes)
            blob = blobs.setdefault(n, bytearray(n))
            sock.send_multipart([ident, blob], copy=False)
        elif tag == b"PUT":
            sock.send_multipart([ident, b"ok"])
        else:
            sock.send_multipart([ident, *body], copy=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["echo"]:
        raise SystemExit(echo_main())
    raise SystemExit("usage: python -m kvstore.bench.sidecar echo")
