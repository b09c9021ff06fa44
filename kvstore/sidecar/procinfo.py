"""Which process owns a shared-memory claim, and is it still alive?

Why: a client writing a put into shared-memory slots may stall (GC pause, swapped out,
SIGSTOP) past the lease timeout. Reclaiming its reservation on the timeout alone would hand
those slots to another block while the stalled client can still write into them: silent
corruption. So a same-host client names itself by ``(pid, start time)`` -- the start time
(field 22 of ``/proc/<pid>/stat``, clock ticks since boot) guards against a recycled pid --
and the server reclaims an expired claim only when that process is gone.

O(1) per check (one small /proc read).
"""

from __future__ import annotations

import os
import socket
from typing import Any


def host_id() -> str:
    """Names this host (and boot): a client maps shared memory only when its own id matches.
    O(1) (one small /proc read)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist (or no /proc)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    rest = data[data.rfind(b")") + 2:].split()
    try:
        state, start = rest[0], int(rest[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None
    if state in (b"Z", b"X"):  # a zombie has exited; it only waits to be reaped
        return None
    return start


def self_identity(host: str) -> dict[str, Any]:
    """What a client sends so the server can check its liveness: host, pid, start time."""
    pid = os.getpid()
    return {"host": host, "pid": pid, "start": process_start_time(pid)}


def owner_from_wire(value: Any, server_host: str) -> tuple[int, int] | None:
    """The ``(pid, start)`` of a claim's owner when it is checkable on this host, else None.

    A client on another host (or without /proc) gets None: its claims expire on the timeout,
    as they must (it cannot write shared memory here anyway).
    """
    if not isinstance(value, dict) or value.get("host") != server_host:
        return None
    pid, start = value.get("pid"), value.get("start")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, start)) or pid <= 0 or start < 0:
        return None
    return pid, start


def owner_alive(owner: tuple[int, int]) -> bool:
    """True while the process ``owner`` names runs (same pid and same start time)."""
    pid, start = owner
    return process_start_time(pid) == start
