"""Who may talk to the sidecar: bind policy, CurveZMQ keys, the ZAP handler, refusals.

Why these pieces:

* **Bind policy.** A sidecar hands out every tenant's KV; by default it listens only where
  the host's own users can reach it (``ipc://`` with a 0600 socket file, or ``tcp://`` on a
  loopback address). A routable TCP address needs CurveZMQ, or an explicit
  ``insecure_allow_remote`` that logs a loud warning.
* **CurveZMQ.** The server's key pair comes from ``kvstore keygen``'s ``.key_secret``; the
  allow-list is a directory of client ``.key`` files (ZeroMQ certificate format). A ZAP
  handler (RFC 27) in the server's own context checks each handshake's client key against
  it: one log line per refusal, a counter, and the key file's stem as the peer's
  ``User-Id`` (read from every request's frames; namespaces are bound to it).
* **Handshake failures that never reach ZAP** (a client without CURVE, or one holding the
  wrong server key) are seen by a socket monitor: :func:`handshake_failure` classifies its
  events so the server counts and logs them too.

Everything here is O(keys) at start and O(1) per handshake; no process-global state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import ipaddress
import logging
import os
from pathlib import Path
import threading
import time

import zmq

from kvstore.errors import ConfigError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"kvstore"


class InsecureBindError(ConfigError):
    """A routable TCP bind without CurveZMQ (and without ``insecure_allow_remote``)."""

    code = "insecure_bind"


def endpoint_host(endpoint: str) -> str | None:
    """The host part of ``tcp://HOST:PORT`` (brackets stripped); None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    if ";" in rest:  # tcp://src;dst form: the part we bind is the last
        rest = rest.rsplit(";", 1)[1]
    host = rest.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_local_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and for TCP on a loopback address or ``localhost``.

    ``*``, ``0.0.0.0``, ``::``, an interface name or any routable address are not local.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint_host(endpoint)
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name, a DNS name: may be routable


def check_bind(endpoint: str, curve: bool, insecure_allow_remote: bool) -> None:
    """Refuse a non-local bind without CurveZMQ unless explicitly allowed (then warn loudly)."""
    if is_local_endpoint(endpoint) or curve:
        return
    if not insecure_allow_remote:
        raise InsecureBindError(
            f"refusing to bind {endpoint}: it is reachable from other hosts and CurveZMQ is off, so anyone "
            "there could read and overwrite every tenant's KV. Bind tcp://127.0.0.1:PORT or ipc:///path, "
            "enable --curve-secret/--curve-allow, or pass --insecure-allow-remote if the network is trusted.")
    log.warning("!!! INSECURE: serving %s to the network WITHOUT authentication or encryption "
                "(--insecure-allow-remote); any host that can reach it can read and write every namespace !!!",
                endpoint)


# -- keys ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurveKeys:
    """A Z85 key pair (``secret`` may be None for a public-only certificate)."""

    public: bytes
    secret: bytes | None


def load_keys(path: str | os.PathLike) -> CurveKeys:
    """Read a ZeroMQ certificate (``kvstore keygen`` output); ConfigError when unreadable."""
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CurveZMQ key file {path}: {exc}") from None
    if not public:
        raise ConfigError(f"{path} holds no public-key")
    return CurveKeys(public, secret)


def load_allow_dir(directory: str | os.PathLike) -> dict[bytes, str]:
    """Client public keys (Z85) -> name (file stem) from every ``*.key`` in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"--curve-allow {d} is not a directory of client .key files")
    allowed = {}
    for f in sorted(d.glob("*.key")):
        allowed[load_keys(f).public] = f.stem
    if not allowed:
        log.warning("the CurveZMQ allow-list %s holds no .key files: every client will be refused", d)
    return allowed


def fingerprint(z85_or_raw: bytes) -> str:
    """A short printable name for a public key (first 8 Z85 characters)."""
    if len(z85_or_raw) == 32:
        z85_or_raw = zmq.utils.z85.encode(z85_or_raw)
    return z85_or_raw[:8].decode(errors="replace")


# -- ZAP -------------------------------------------------------------------------------
class RefusalLog:
    """Logs refusals one line each, but folds repeats of the same (address, reason) within
    ``quiet_s`` into the next line's count, so a client retrying in a loop (ZeroMQ reconnects
    every 100 ms) cannot flood the log. Bounded memory. O(1) per refusal."""

    def __init__(self, logger: logging.Logger, quiet_s: float = 5.0) -> None:
        self.log = logger
        self.quiet_s = quiet_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, address: str, reason: str) -> None:
        now = time.monotonic()
        first, suppressed = self._last.get((address, reason), (-1e18, 0))
        if now - first >= self.quiet_s:
            extra = f" (and {suppressed} more like it in the last {self.quiet_s:g} s)" if suppressed else ""
            self.log.warning("refused a connection from %s: %s%s", address or "?", reason, extra)
            if len(self._last) > 4096:  # a key-spraying peer cannot grow this without bound
                self._last.clear()
            self._last[(address, reason)] = (now, 0)
        else:
            self._last[(address, reason)] = (first, suppressed + 1)


class ZapHandler:
    """Answers ZAP requests for one ZeroMQ context from a thread of its own.

    ``allowed`` maps client public keys (Z85) to names; ``on_refused(reason)`` is called once
    per refused handshake (the server counts it). Repeated refusals of the same key and
    address within ``quiet_s`` are logged as one line with a count, so a client retrying in
    a loop cannot flood the log; every one is counted. O(1) per handshake.
    """

    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str], on_refused: Callable[[str], None],
                 quiet_s: float = 5.0) -> None:
        self.allowed = dict(allowed)
        self.on_refused = on_refused
        self.quiet_s = quiet_s
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._log = RefusalLog(log, quiet_s)
        self._thread = threading.Thread(target=self._run, name="kvs-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(100):
                    continue
                msg = self._sock.recv_multipart()
                self._sock.send_multipart(self._answer(msg))
        except zmq.ZMQError as exc:  # context terminated under us: nothing left to guard
            if not self._stop.is_set():
                log.error("ZAP handler stopped: %s", exc)
        finally:
            self._sock.close(0)

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        """RFC 27: [version, request_id, domain, address, identity, mechanism, *credentials]."""
        if len(msg) < 6:
            return [b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        version, rid, _domain, address, _identity, mechanism = msg[:6]
        creds = msg[6:]
        addr = address.decode(errors="replace")
        if mechanism == b"CURVE" and creds and len(creds[0]) == 32:
            key = zmq.utils.z85.encode(creds[0])
            name = self.allowed.get(key)
            if name is not None:
                return [version, rid, b"200", b"OK", name.encode(), b""]
            self._refuse(addr, f"unknown client key {fingerprint(key)}...")
            return [version, rid, b"400", b"client key not in the allow-list", b"", b""]
        self._refuse(addr, f"mechanism {mechanism.decode(errors='replace')} is not allowed (CURVE required)")
        return [version, rid, b"400", b"CURVE required", b"", b""]

    def _refuse(self, address: str, reason: str) -> None:
        self.on_refused(reason)
        self._log(address, reason)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def handshake_failure(event: int) -> str | None:
    """A reason for a monitor event that is a refused handshake ZAP did not see, else None.

    ``HANDSHAKE_FAILED_AUTH`` is left out: the ZAP handler already counted that refusal.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "handshake failed (a client without CURVE, or holding the wrong server key)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "handshake failed (no detail; e.g. the wrong server key)"
    return None


def apply_client_curve(sock: zmq.Socket, keys: CurveKeys, server_public: bytes) -> None:
    """Make ``sock`` a CurveZMQ client with ``keys`` talking to the server ``server_public``."""
    if keys.secret is None:
        raise ConfigError("the client's CurveZMQ key file holds no secret-key (use NAME.key_secret)")
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = server_public


__all__ = ["InsecureBindError", "RefusalLog", "CurveKeys", "ZapHandler", "check_bind", "is_local_endpoint", "load_keys",
           "load_allow_dir", "handshake_failure", "apply_client_curve", "fingerprint", "ZAP_DOMAIN"]

def write_keypair(directory: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create the pair; refuses to overwrite unless ``force``. Returns (public, secret) paths."""
    import zmq

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public_path.exists() or secret_path.exists()):
        raise FileExistsError(f"{public_path} or {secret_path} exists (use --force to replace)")
    public, secret = zmq.curve_keypair()
    header = "#   ZeroMQ CURVE certificate written by kvstore keygen\n"
    public_path.write_text(f"{header}metadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{header}metadata\ncurve\n    public-key = \"{public.decode()}\"\n"
                f"    secret-key = \"{secret.decode()}\"\n")
    os.chmod(secret_path, 0o600)
    return public_path, secret_path
