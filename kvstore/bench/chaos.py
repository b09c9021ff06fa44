"""``kvstore bench chaos``: SIGKILL the sidecar during a put storm, restart it, and check
that every acknowledged block comes back exactly (issue 6's evidence).

Setup: ``kvstore serve`` with ``persist = true``, ``fsync = "always"`` on a temporary
``disk_path`` whose disk tier holds every block the storm can write (nothing is evicted, so
"acknowledged and lost" must be 0). Client processes (``python -m kvstore.bench.chaos_client
storm``; ``kvstore`` does not import ``clients``) put unique prompts and log each
acknowledged one. This module kills the sidecar at seeded random moments (``--kills``, at
least 20 for the full run), restarts it each time, and between kills throws seeded
garbage at it (random frames and headers) that must all be answered with errors. Then a
verifier process reads every acknowledged prompt back (and probes a second tenant for
them), and a CurveZMQ sidecar is started to count refused unauthorised handshakes.

Figures: kills survived, blocks acknowledged / recovered, acknowledged-but-lost (must be 0),
corrupt reads (must be 0), fuzzed inputs, unauthorised connections refused, cross-tenant
hits (must be 0). ``--quick`` is a < 60 s smoke run (fewer kills) for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import tempfile
import time

from kvstore.bench.report import Report, machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 2  # kvstore.bench.chaos_client.LAYOUT with BT=4 (checked by the verifier's gets)


def configure(parser: argparse.ArgumentParser) -> None:
    """The suite's flags; the environment variables ``KVSTORE_CHAOS_KILLS``,
    ``KVSTORE_CHAOS_CLIENTS`` and ``KVSTORE_CHAOS_SEED`` give the same when a flag is absent."""
    parser.add_argument("--kills", type=int, default=None, help="SIGKILLs of the sidecar (default 20; 4 quick)")
    parser.add_argument("--clients", type=int, default=None, help="client processes (default 4; 2 quick)")
    parser.add_argument("--seed", type=int, default=None, help="seed of kill times and fuzz (default: random)")


class _Sidecar:
    """``kvstore serve`` as a child process we can SIGKILL and restart on the same endpoint."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log = open(log_path, "ab")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + timeout
        assert self.proc.stderr is not None
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.write(line)
            if b"serving on " in line:
                self.serving_line = line.decode(errors="replace")
                # keep draining stderr so the child never blocks on a full pipe
                import threading

                threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
                return
        self.kill()
        raise RuntimeError(f"the sidecar did not start: {' '.join(self.cmd)}")

    def _drain(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log.write(line)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.flush()


def _fuzz(endpoint: str, rng: random.Random, n: int) -> tuple[int, int]:
    """Send ``n`` seeded malformed requests; returns (sent, answered with an error)."""
    import zmq

    from kvstore.sidecar.protocol import MAGIC, OPS, VERSION, pack, unpack

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 1000)
    sock.connect(endpoint)
    sent = answered = 0
    junk = lambda k: bytes(rng.getrandbits(8) for _ in range(rng.randrange(k)))  # noqa: E731
    try:
        for i in range(n):
            kind = rng.randrange(5)
            if kind == 0:
                frames = [junk(64) for _ in range(rng.randrange(1, 4))]
            elif kind == 1:
                frames = [MAGIC, junk(64)]
            elif kind == 2:
                frames = [MAGIC, pack({"v": rng.choice([0, 2, "1", None]), "id": i, "op": "health"})]
            elif kind == 3:
                frames = [MAGIC, pack({"v": VERSION, "id": i, "op": rng.choice([*OPS, "drop_tables"]),
                                       "args": {"ns": rng.choice(["chaos", "nope", 7, None]),
                                                "tokens": junk(32), "claim": rng.randrange(-5, 1 << 40),
                                                "kv": {"dtype": "float16", "shape": [rng.randrange(-2, 9)]}}}),
                          junk(128)]
            else:
                frames = [MAGIC, pack({"v": VERSION, "id": i, "op": "put",
                                       "args": {"ns": "chaos", "tokens": junk(40),
                                                "kv": {"dtype": "float16", "shape": [3, 3]}}}), junk(18)]
            if frames[0] == MAGIC and kind == 3:
                hdr = unpack(frames[1])
                if hdr["op"] in ("clear", "hello", "commit", "release"):  # legal ops that would change state
                    frames[1] = pack({**hdr, "args": {**hdr["args"], "ns": "nope", "claim": -1}})
            try:
                sock.send_multipart(frames)
            except zmq.Again:
                break
            sent += 1
            if sock.poll(2000):
                reply = sock.recv_multipart()
                if len(reply) >= 2 and reply[0] == MAGIC:
                    answered += 1
    finally:
        sock.close(0)
        ctx.destroy(0)
    return sent, answered


def _unauthorised(tmp: Path, rng: random.Random, attempts: int) -> tuple[int, int]:
    """Start a CurveZMQ sidecar; try ``attempts`` connections with unknown keys or none.
    Returns (refusals the sidecar counted, attempts that got any answer: must be 0)."""
    import zmq

    from kvstore.sidecar.security import write_keypair
    from kvstore.sidecar.protocol import MAGIC, VERSION, pack, unpack
    from kvstore.sidecar.security import load_keys

    keys = tmp / "keys"
    write_keypair(keys, "server")
    write_keypair(keys / "allow", "ops")
    write_keypair(keys, "intruder")
    side = _Sidecar([sys.executable, "-m", "kvstore", "serve", "--endpoint", f"ipc://{tmp}/curve.sock",
                     "--host-bytes", "1MiB", "--device-bytes", "0", "--curve-secret", str(keys / "server.key_secret"),
                     "--curve-allow", str(keys / "allow"), "--metrics-port", "0"], tmp / "curve-sidecar.log")
    side.start()
    ctx = zmq.Context()
    answered = 0
    server_pub = load_keys(keys / "server.key").public
    try:
        for i in range(attempts):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 300)
            if rng.random() < 0.5:
                k = load_keys(keys / "intruder.key_secret")
                s.curve_publickey, s.curve_secretkey, s.curve_serverkey = k.public, k.secret, server_pub
            s.connect(f"ipc://{tmp}/curve.sock")
            try:
                s.send_multipart([MAGIC, pack({"v": VERSION, "id": 1, "op": "health"})])
                answered += bool(s.poll(300))
            except zmq.Again:
                pass
            s.close(0)
        ok = ctx.socket(zmq.DEALER)
        ok.setsockopt(zmq.LINGER, 0)
        k = load_keys(keys / "allow" / "ops.key_secret")
        ok.curve_publickey, ok.curve_secretkey, ok.curve_serverkey = k.public, k.secret, server_pub
        ok.connect(f"ipc://{tmp}/curve.sock")
        ok.send_multipart([MAGIC, pack({"v": VERSION, "id": 1, "op": "stats", "args": {}})])
        if not ok.poll(10_000):
            raise RuntimeError("the allowed key got no answer from the CurveZMQ sidecar")
        assert unpack(ok.recv_multipart()[1])["ok"]
        ok.close(0)
        # The refusal count is the operator's (its metrics endpoint), not any tenant's to see.
        import re
        import urllib.request

        url = re.search(r"metrics on (http://\S+)", side.serving_line).group(1)
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        found = re.search(r'kvstore_server_events_total\{kind="unauthorised"\} ([0-9.e+]+)', metrics)
        refused = int(float(found.group(1))) if found else 0
    finally:
        ctx.destroy(0)
        side.stop()
    return refused, answered


def run(args: argparse.Namespace) -> Report:
    quick = bool(getattr(args, "quick", False))
    env = os.environ.get
    kills = getattr(args, "kills", None) or int(env("KVSTORE_CHAOS_KILLS", 0)) or (4 if quick else 20)
    nclients = getattr(args, "clients", None) or int(env("KVSTORE_CHAOS_CLIENTS", 0)) or (2 if quick else 4)
    seed = getattr(args, "seed", None)
    seed = seed if seed is not None else (int(env("KVSTORE_CHAOS_SEED")) if env("KVSTORE_CHAOS_SEED") else None)
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos: seed {seed} (rerun with --seed {seed}), {kills} kills, {nclients} clients", file=sys.stderr,
          flush=True)
    max_puts = 150 if quick else 2000
    report = Report("chaos", {**machine_info(), "seed": seed, "kills": kills, "clients": nclients})
    with tempfile.TemporaryDirectory(prefix="kvstore-chaos-", dir=getattr(args, "dir", None)) as d:
        tmp = Path(d)
        blocks = nclients * max_puts * 2
        disk_bytes = (blocks * 2 + 1024) * (BLOCK_BYTES + 4096)  # room for every block, headers, alignment
        (tmp / "store.toml").write_text(
            f'persist = true\nfsync = "always"\ndisk_path = "{tmp / "disk"}"\ndevice_bytes = 0\n'
            f"host_bytes = {64 * BLOCK_BYTES}\ndisk_bytes = {disk_bytes}\n")
        endpoint = f"ipc://{tmp}/kvs.sock"
        side = _Sidecar([sys.executable, "-m", "kvstore", "serve", "--config", str(tmp / "store.toml"),
                         "--endpoint", endpoint, "--workers", "2"], tmp / "sidecar.log")
        stop = tmp / "stop"
        logs = [tmp / f"ack-{i}.log" for i in range(nclients)]
        t0 = time.monotonic()
        side.start()
        storm = [subprocess.Popen([sys.executable, "-m", "kvstore.bench.chaos_client", "storm", "--endpoint", endpoint,
                                   "--client", str(i), "--seed", str(seed), "--log", str(logs[i]), "--stop", str(stop),
                                   "--max-puts", str(max_puts), "--max-seconds", "900"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp / f"client-{i}.err", "w"),
                                  text=True)
                 for i in range(nclients)]
        survived = fuzz_sent = fuzz_answered = 0
        try:
            for k in range(kills):
                if rng.random() < 0.5:
                    sent, answered = _fuzz(endpoint, rng, 20 if quick else 100)
                    fuzz_sent += sent
                    fuzz_answered += answered
                time.sleep(rng.uniform(0.1, 0.6 if quick else 1.5))
                side.kill()
                side.start()
                survived += 1
                print(f"  kill {k + 1}/{kills}: restarted", file=sys.stderr, flush=True)
            stop.touch()
            for p in storm:
                p.wait(120)
            outs = []
            for i, p in enumerate(storm):
                lines = p.stdout.read().strip().splitlines()
                if p.returncode != 0 or not lines:
                    raise RuntimeError(f"storm client {i} failed:\n{(tmp / f'client-{i}.err').read_text()[-3000:]}")
                outs.append(json.loads(lines[-1]))
            sent, answered = _fuzz(endpoint, rng, 50 if quick else 500)
            fuzz_sent += sent
            fuzz_answered += answered
            side.kill()  # one more crash, right after the storm, then verify from disk alone
            side.start()
            v = subprocess.run([sys.executable, "-m", "kvstore.bench.chaos_client", "verify", "--endpoint", endpoint,
                                "--seed", str(seed), *map(str, logs)], cwd=ROOT, capture_output=True, text=True,
                               timeout=600)
            if v.returncode != 0:
                raise RuntimeError(f"verifier failed:\n{v.stderr[-3000:]}")
            res = json.loads(v.stdout.strip().splitlines()[-1])
        finally:
            stop.touch()
            for p in storm:
                if p.poll() is None:
                    p.kill()
                    p.wait(30)
            side.stop()
        refused, unauth_answered = _unauthorised(tmp, rng, 4 if quick else 20)
        elapsed = time.monotonic() - t0
    report.machine.update({"client_errors_retried": sum(o["errors"] for o in outs),
                           "fuzz_answered": fuzz_answered, "unauthorised_answered": unauth_answered,
                           "cross_tenant_probes": res["cross_tenant_probes"], "seconds": round(elapsed, 1)})
    report.add("kills_survived", survived, "kills", target=None, better="higher")
    report.add("blocks_acknowledged", res["blocks_acknowledged"], "blocks", better="higher")
    report.add("blocks_recovered", res["blocks_recovered"], "blocks", limit=res["blocks_acknowledged"] or None,
               target=1.0, better="higher")
    report.add("acknowledged_but_lost", res["lost"], "blocks", better="lower")
    report.add("corrupt_reads", res["corrupt"], "blocks", better="lower")
    report.add("fuzzed_inputs", fuzz_sent, "requests", better="higher")
    report.add("fuzzed_inputs_answered", fuzz_answered, "requests", limit=fuzz_sent or None, target=1.0,
               better="higher")
    report.add("unauthorised_refused", refused, "handshakes", better="higher")
    report.add("cross_tenant_hits", res["cross_tenant_hits"], "hits", better="lower")
    return report
