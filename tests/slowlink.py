"""A throttling TCP proxy on loopback: a slow link in front of a real server, for deadline tests.

Each accepted connection is forwarded to the target with both directions paced to at most
``rate_Bps`` bytes per second (``chunk`` bytes, then a pause). Every loop is bounded: the
proxy stops by itself after ``lifetime_s`` and at :meth:`close`; a pump ends at EOF, on an
error, or when the proxy stops. ``forwarded`` counts the bytes it has passed (so a test can
see whether a call's traffic really ended when the call returned); ``sent`` counts only
what clients sent towards the server.
"""

from __future__ import annotations

import socket
import threading
import time


class SlowLink:
    def __init__(self, target_port: int, rate_Bps: float, *, target_host: str = "127.0.0.1",
                 chunk: int = 1024, lifetime_s: float = 120.0, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.rate_Bps = float(rate_Bps)
        self.chunk = chunk
        self.end_at = time.monotonic() + lifetime_s
        self.forwarded = 0
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a small window: the link holds little in flight (accepted sockets inherit it)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.end_at

    def _accept(self) -> None:
        while self._running():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)
        self._listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, towards_server: bool) -> None:
        src.settimeout(0.05)
        try:
            while self._running():
                if src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    break  # reset by its peer: what it had in flight is dropped, as on a wire
                try:
                    data = src.recv(self.chunk)
                except socket.timeout:
                    continue
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    self.forwarded += len(data)
                    self.sent += len(data) if towards_server else 0
                time.sleep(len(data) / self.rate_Bps)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        with self._lock:
            for s in self._socks:
                s.close()

    def __enter__(self) -> "SlowLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
