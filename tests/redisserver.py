"""Real ``redis-server`` processes for tests: one node, or a Redis Cluster of masters.

Each server binds 127.0.0.1 on a free port, keeps its files in a temporary directory and
persists nothing. Tests that need one call :func:`require_redis` first, which skips with a
clear reason when the binaries are missing (``.ci/run`` installs them, so CI never skips).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def require_redis() -> None:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing and os.environ.get("KVSTORE_REQUIRE_REDIS"):  # CI: a missing server is a failure
        pytest.fail(f"{' and '.join(missing)} not on PATH and KVSTORE_REQUIRE_REDIS is set")
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: install redis-server (apt-get install -y redis-server)")


def _free_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


class RedisServer:
    """One ``redis-server`` process. ``kill()`` ends it (SIGKILL), ``pause()``/``resume()``
    stop and continue it (a hung shard)."""

    def __init__(self, *, password: str | None = None, maxmemory: int | None = None,
                 policy: str = "allkeys-lru", cluster: bool = False, tls: bool = False, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvstore-redis-")
        self.password = password
        self.tls = tls
        if tls:  # a self-signed certificate for 127.0.0.1 (the CA clients must be given)
            if shutil.which("openssl") is None:
                pytest.skip("openssl not on PATH: cannot make a certificate for the TLS test")
            self.cert = os.path.join(self.dir, "cert.pem")
            key = os.path.join(self.dir, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
                            self.cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                            "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
        for attempt in range(5):
            self.port = port if port is not None else _free_port()  # a given port: a restart in place
            ports = (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.cert, "--tls-key-file", key,
                      "--tls-ca-cert-file", self.cert, "--tls-auth-clients", "no"] if tls
                     else ["--port", str(self.port)])
            args = ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
                    "--logfile", os.path.join(self.dir, "redis.log")]
            if password:
                args += ["--requirepass", password, "--masterauth", password]
            if maxmemory:
                args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", policy]
            if cluster:
                args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                         "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]
            args += list(extra)
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_up(10.0):
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError(f"redis-server did not start (see {self.dir}/redis.log)")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}?ssl_ca_certs={self.cert}"
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args], env=env,
                              capture_output=True, text=True, timeout=timeout).stdout

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def _wait_up(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def restart(self) -> None:
        """Kill the server and start a new one on the same port, empty (no persistence)."""
        self.kill()
        fresh = RedisServer(password=self.password, port=self.port)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir, self.proc = fresh.dir, fresh.proc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterProcs:
    """``masters`` cluster-enabled servers (each with ``replicas`` replicas) joined with
    ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3, replicas: int = 0, password: str | None = None) -> None:
        self.nodes: list[RedisServer] = []
        self.password = password
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(RedisServer(cluster=True, password=password))
            env = {**os.environ, **({"REDISCLI_AUTH": password} if password else {})}
            out = subprocess.run(["redis-cli", "--cluster", "create", *[n.addr for n in self.nodes],
                                  "--cluster-replicas", str(replicas), "--cluster-yes"],
                                 capture_output=True, text=True, timeout=60, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            end = time.monotonic() + 30
            while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                if time.monotonic() > end:
                    raise RuntimeError("cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes)

    def node_of(self, key: bytes) -> RedisServer:
        """The master that owns ``key``'s slot (redis-py's CRC16 slot, the cluster's slot map)."""
        from redis.crc import key_slot

        return self.node_for_slot(key_slot(key))

    def node_for_slot(self, slot: int) -> RedisServer:
        alive = next(n for n in self.nodes if n.proc.poll() is None)
        info = alive.client().execute_command("CLUSTER", "SLOTS")
        for start, end, master, *_ in info:
            if start <= slot <= end:
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise KeyError(slot)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
