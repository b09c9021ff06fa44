"""Exceptions a user of the store can catch by meaning."""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the store raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """The configuration cannot work (capacity below one block, unwritable disk path...).

    ``problems`` lists every mistake found, one message each (the message joins them)."""

    def __init__(self, message: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


class NamespaceOwnerError(ConfigError, PermissionError):
    """The namespace's persisted data belongs to another owner (authenticated identity)."""


class InvalidInputError(KVStoreError, ValueError):
    """A call's arguments are malformed: wrong dtype, shape, length, token type..."""


class BlockNotFoundError(KVStoreError, KeyError):
    """A requested prefix is not (fully) cached. Nothing partial is ever returned."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "block not found"


class CapacityError(KVStoreError):
    """No room could be made (every block in the way is pinned by in-flight reads)."""


class StoreClosedError(KVStoreError):
    """The store was closed."""


# -- errors of the sidecar, raised by its clients -----------------------------------------
# Declared here only (kvstore.sidecar.protocol re-exports them and maps wire codes to them)
# so an engine catches every error of the store by meaning from one module, embedded or remote.
class SidecarError(KVStoreError):
    """An error reply whose code has no more specific class; ``code`` says which."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


#: the old name, kept for one release: "remote" now names the remote tier (Redis) only
RemoteError = SidecarError


class SidecarUnavailableError(SidecarError, ConnectionError):
    """No sidecar answered within the deadline (absent, crashed or overloaded)."""

    code = "unavailable"


class LayoutMismatchError(ConfigError):
    """The namespace exists on the sidecar with another layout or block size."""

    code = "layout_mismatch"


class ForbiddenError(SidecarError, PermissionError):
    """The namespace is not this client's to use (CurveZMQ: another key created it)."""

    code = "forbidden"


class BusyError(SidecarError):
    """The sidecar refused the request for now (too many queued or in flight): retry later."""

    code = "busy"


class ProtocolError(SidecarError):
    """A frame or header the peer cannot understand (bad magic, not msgpack, wrong type...)."""

    code = "bad_frame"


class VersionMismatchError(SidecarError):
    """The peer speaks another protocol version."""

    code = "bad_version"


class UnknownOpError(SidecarError):
    code = "unknown_op"


class MessageTooLargeError(SidecarError):
    code = "too_large"


class UnsupportedError(SidecarError):
    """The op exists but this server cannot do it (e.g. ``plan`` without the planner)."""

    code = "unsupported"


class DeadlineExceededError(SidecarError, TimeoutError):
    """The request's deadline passed before the server got to it."""

    code = "deadline_exceeded"


class UnknownNamespaceError(SidecarError):
    """The sidecar has no such namespace (it restarted): say ``hello`` again."""

    code = "unknown_namespace"


class UnknownLeaseError(SidecarError):
    """A lease or reservation that expired (reclaimed) or never existed."""

    code = "unknown_lease"


class StaleArenaError(SidecarError):
    """The request names slots of shared arenas the namespace no longer has (the sidecar
    restarted): the client maps the current arenas again and retries."""

    code = "stale_arena"
