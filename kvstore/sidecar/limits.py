"""What keeps one sidecar's resources bounded and its identity unique on a host.

* :func:`check_slots`: a namespace's slot count is capped before its store is built (each
  slot costs tens of bytes of Python state, whatever the block size: 2-byte blocks in a
  48 MiB tier would be 25M slots and ~1 GB of index).
* :class:`InstanceLock`: an ``flock`` held for the sidecar's life on a lock file. One
  sidecar per ``ipc://`` path (libzmq would otherwise unlink a live sidecar's socket and
  take it over) and one per shared-memory directory. ``flock`` is kept by the kernel on
  the open file, so it is seen across pid namespaces and released when the holder dies,
  even by SIGKILL: whoever holds a directory's lock knows every arena file in it is its own
  or a dead sidecar's.
* :class:`ReplyBudget`: bytes of replies handed to ZeroMQ that its socket has not yet taken
  (written to the kernel, or dropped with their peer), per peer and in all. ZeroMQ's send
  high-water mark counts messages, so a peer that never reads could pin ``send_hwm`` x its
  largest reply; the budget bounds the bytes instead, and a ``get`` over it is answered
  ``busy`` before its reply is built.
* :class:`OwnerCheck`: may a claim's named owner keep it past its expiry? Only a live
  process that really maps this namespace's shared arenas (a client can name any pid, e.g.
  pid 1, as its owner; a process that does not map our arenas cannot be writing into them).
  Results are cached per reaper pass, so 70k claims of one client cost one /proc read.

O(1) per call except :func:`sweep_dir` (O(files)) and the maps read (O(mappings of a pid)).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path
import threading
from typing import Any

import torch

from allocator.shm import fresh_memory
from kvstore.errors import BusyError, CapacityError, ConfigError
from kvstore.sidecar.procinfo import owner_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".kvstore-sidecar.lock"


def check_slots(name: str, capacities: dict[str, int], block_bytes: int, max_slots: int) -> None:
    """Refuse a namespace whose tiers would hold more than ``max_slots`` slots in all.

    Raises :class:`CapacityError` naming the block size and the way out. O(tiers).
    """
    slots = sum(c // block_bytes for c in capacities.values() if c > 0)
    if slots > max_slots:
        raise CapacityError(
            f"namespace {name[:100]!r}: blocks of {block_bytes} bytes give {slots} slots over the tiers "
            f"({', '.join(f'{t}={c}' for t, c in capacities.items() if c > 0)} bytes), more than this "
            f"sidecar's limit of {max_slots} per namespace; use more block_tokens (larger blocks)")


def default_shm_dir(endpoint: str, root: str = "/dev/shm") -> str:
    """The shared-memory directory of the sidecar bound at ``endpoint``: one per endpoint,
    so two sidecars never share (or sweep) one directory unless told to."""
    digest = hashlib.blake2b(endpoint.encode(), digest_size=8).hexdigest()
    return os.path.join(root, f"kvstore-sidecar-{digest}")


class InstanceLock:
    """An exclusive, non-blocking ``flock`` on ``path`` held until :meth:`release`.

    Raises :class:`ConfigError` saying who is in the way when another process holds it.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                holder = _read_holder(path)
                raise ConfigError(f"another sidecar{holder} already serves {what} (lock {path} is held); "
                                  "stop it first, or choose another endpoint / --shm-dir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def remove_dir(self) -> None:
        """Unlink the lock file and its directory if empty, still holding the lock (a newcomer
        meanwhile is refused, not handed a stale inode). For a directory made for us alone."""
        try:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (unlinking would race a newcomer)
            self._fd = None


def _read_holder(path: str) -> str:
    try:
        pid = Path(path).read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid} in its pid namespace)" if pid.isdigit() else ""


def lock_ipc_endpoint(endpoint: str) -> InstanceLock | None:
    """For ``ipc:///path`` the lock ``/path.lock``; None for other transports (TCP refuses a
    second bind of the same port by itself)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if not path or path.startswith("@"):  # abstract sockets: the kernel refuses a second bind
        return None
    return InstanceLock(path + ".lock", endpoint)


def lock_shm_dir(directory: str) -> InstanceLock:
    """Create ``directory`` (0700) if needed and hold its lock."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the shared-memory directory {directory}: {exc}") from None
    return InstanceLock(os.path.join(directory, LOCK_NAME), f"the shared-memory directory {directory}")


def sweep_dir(directory: str) -> int:
    """Unlink arena files (``kvstore-*.shm``) in a directory whose lock we hold: they were left
    by a sidecar that died without cleanup. O(files)."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if name.startswith("kvstore-") and name.endswith(".shm"):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    if removed:
        log.warning("removed %d shared arena file(s) left by a dead sidecar in %s", removed, directory)
    return removed


class ReplyBudget:
    """Bytes of large replies not yet taken by the socket, per peer and in all.

    A worker reserves a reply's size before it builds it (over either budget:
    ``busy``, nothing allocated; a reply larger than the per-peer budget could never be
    sent: ``too_large``); after the send it hands the send's ``MessageTracker`` to
    :meth:`track`; :meth:`sweep` (the loop calls it every pass) releases the bytes of replies
    ZeroMQ has let go of. So the memory that replies can hold in the sidecar is at most
    ``total`` bytes, whatever the peers do. O(1) per reserve/release, O(pending) per sweep.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer = int(per_peer)
        self.total = int(total)
        self._lock = threading.Lock()
        self._of: dict[bytes, int] = {}
        self._queued = 0
        self._pending: list[tuple[Any, bytes, int]] = []
        self.admitted = 0
        self.refused = 0
        self.peak = 0

    def reserve(self, peer: bytes, nbytes: int) -> None:
        """Count ``nbytes`` of a reply to ``peer`` as queued, or raise ``BusyError``."""
        from kvstore.sidecar.protocol import MessageTooLargeError

        if nbytes > self.per_peer:
            with self._lock:
                self.refused += 1
            raise MessageTooLargeError(f"a reply of {nbytes} bytes exceeds the sidecar's reply budget per peer "
                                       f"({self.per_peer} bytes, max_reply_bytes_per_peer); ask for fewer tokens")
        self.sweep()
        with self._lock:
            mine = self._of.get(peer, 0)
            if mine + nbytes > self.per_peer or self._queued + nbytes > self.total:
                self.refused += 1
                raise BusyError(f"replies not yet read hold {mine} bytes for this connection and {self._queued} in "
                                f"all; a reply of {nbytes} more would pass the budget (max_reply_bytes_per_peer="
                                f"{self.per_peer}, max_reply_bytes={self.total}): read the replies, then retry")
            self._of[peer] = mine + nbytes
            self._queued += nbytes
            self.admitted += 1
            self.peak = max(self.peak, self._queued)

    def release(self, peer: bytes, nbytes: int) -> None:
        with self._lock:
            left = self._of.get(peer, 0) - nbytes
            if left > 0:
                self._of[peer] = left
            else:
                self._of.pop(peer, None)
            self._queued = max(0, self._queued - nbytes)

    def track(self, tracker: Any, peer: bytes, nbytes: int) -> None:
        """The reply was sent with ``tracker`` (None: its bytes are already gone)."""
        if tracker is None or tracker.done:
            self.release(peer, nbytes)
            return
        with self._lock:
            self._pending.append((tracker, peer, nbytes))

    def sweep(self) -> None:
        """Release the bytes of every tracked reply ZeroMQ no longer holds."""
        if not self._pending:
            return
        with self._lock:
            keep: list[tuple[Any, bytes, int]] = []
            done: list[tuple[Any, bytes, int]] = []
            for p in self._pending:
                (done if p[0].done else keep).append(p)
            self._pending = keep
        for _, peer, nbytes in done:
            self.release(peer, nbytes)

    def stats(self) -> dict:
        """What ``kvstore stats`` shows: the bound and what is held now."""
        self.sweep()
        with self._lock:
            return {"max_bytes": self.total, "max_bytes_per_peer": self.per_peer, "queued_bytes": self._queued,
                    "peak_bytes": self.peak, "peers_holding": len(self._of), "admitted": self.admitted,
                    "refused": self.refused}


def reply_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh memory for one reply, as a uint8 tensor, in an anonymous mapping of
    its own (:func:`allocator.shm.fresh_memory`): unmapped (given back to the OS) as soon as
    the last reference goes -- when ZeroMQ lets go of the frame. From malloc, a freed 16 MiB
    reply stays in a thread's arena (glibc raises its mmap threshold after such frees), so
    RSS would keep what the budget already released. O(nbytes)."""
    return fresh_memory(nbytes)


def _mapped_paths(pid: int) -> set[str] | None:
    """Files ``pid`` maps (from /proc/<pid>/maps), or None when it cannot be read (another
    user's process, pid 1 as non-root, no /proc). O(mappings)."""
    try:
        with open(f"/proc/{int(pid)}/maps", "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    paths = set()
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6:
            paths.add(parts[5].decode(errors="replace").removesuffix(" (deleted)"))
    return paths


class OwnerCheck:
    """One reaper pass's answers to "may this owner keep its claim?" (cached per owner)."""

    def __init__(self) -> None:
        self._alive: dict[tuple[int, int], bool] = {}
        self._maps: dict[int, set[str] | None] = {}

    def keeps(self, owner: tuple[int, int], arena_paths: set[str]) -> bool:
        """True when ``owner`` runs and maps one of ``arena_paths``."""
        alive = self._alive.get(owner)
        if alive is None:
            alive = self._alive[owner] = owner_alive(owner)
        if not alive or not arena_paths:
            return False
        pid = owner[0]
        if pid not in self._maps:
            self._maps[pid] = _mapped_paths(pid)
        mapped = self._maps[pid]
        return mapped is not None and not mapped.isdisjoint(arena_paths)


def option_problems(opts) -> list[str]:
    """Every mistake in a :class:`~kvstore.sidecar.options.ServerOptions`, one message each.
    O(fields)."""
    out: list[str] = []

    def positive(name: str, value, kind=int) -> None:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok or value <= 0 or (kind is float and value != value):
            out.append(f"{name} must be a positive {'number' if kind is float else 'int'}, got {value!r}")

    positive("workers", opts.workers)
    positive("lease_timeout_s", opts.lease_timeout_s, float)
    for name in ("max_message_bytes", "max_namespaces", "max_queued", "max_tokens", "max_inflight_per_client",
                 "max_slots_per_namespace", "max_namespaces_per_key", "max_claims_per_client", "send_hwm",
                 "recv_hwm", "max_reply_bytes", "max_reply_bytes_per_peer"):
        positive(name, getattr(opts, name))
    if isinstance(opts.max_reply_bytes, int) and isinstance(opts.max_reply_bytes_per_peer, int) and \
            opts.max_reply_bytes_per_peer > opts.max_reply_bytes:
        out.append(f"max_reply_bytes_per_peer ({opts.max_reply_bytes_per_peer}) must not exceed max_reply_bytes "
                   f"({opts.max_reply_bytes})")
    if not isinstance(opts.loop_lookup_tokens, int) or opts.loop_lookup_tokens < 0:
        out.append(f"loop_lookup_tokens must be a non-negative int, got {opts.loop_lookup_tokens!r}")
    if opts.metrics_port is not None and (not isinstance(opts.metrics_port, int) or not 0 <= opts.metrics_port < 65536):
        out.append(f"metrics_port must be a TCP port (0-65535), got {opts.metrics_port!r}")
    if bool(opts.curve_secret) != bool(opts.curve_allow):
        out.append("CurveZMQ needs both the server's key (curve_secret) and an allow-list directory (curve_allow)")
    for name in ("curve_secret", "curve_allow"):
        path = getattr(opts, name)
        if path and not os.path.exists(path):
            out.append(f"{name} {path} does not exist")
    if opts.shm and opts.shm_dir is not None:
        parent = opts.shm_dir if os.path.isdir(opts.shm_dir) else os.path.dirname(os.path.abspath(opts.shm_dir))
        if not os.access(parent, os.W_OK | os.X_OK):
            out.append(f"shm_dir {opts.shm_dir} is not a writable directory")
    return out
