"""The sidecar's wire protocol (docs/architecture.md): msgpack over ZeroMQ ROUTER/DEALER.

A request is the frames ``[MAGIC, header, *payload]`` with ``header`` a msgpack map
``{v, id, op, args, deadline_ms}``; a reply is ``[MAGIC, header, *payload]`` with
``{v, id, ok, result}`` or ``{v, id, ok: False, error: {code, message}}``. Tensors travel
as raw payload frames described in the header by ``{dtype, shape}`` (sent zero-copy,
received into a tensor with ``torch.frombuffer``), or, for a client on the same host, as
slots of a shared-memory arena the client maps (see :mod:`kvstore.sidecar.shm_plane`).

Why msgpack and never pickle: a sidecar serves many engine processes, and unpickling is
code execution; msgpack only yields plain data, which the server validates field by field.
``deadline_ms`` is the client's remaining budget in milliseconds when it sent the request
(relative, so client and server clocks need not agree); ``None`` or 0 means no deadline.

Everything here is O(size of the header); tensors are never copied by this module.
"""

from __future__ import annotations

from typing import Any
import warnings

import msgpack
import torch

# the sidecar's error classes are declared once, in kvstore.errors; re-exported here
from kvstore.errors import (BlockNotFoundError, BusyError, CapacityError, ConfigError, ForbiddenError,  # noqa: F401
                            InvalidInputError, KVStoreError, LayoutMismatchError, RemoteError, SidecarError, SidecarUnavailableError,
                            StoreClosedError, ProtocolError, VersionMismatchError, UnknownOpError, MessageTooLargeError,
                            UnsupportedError, DeadlineExceededError, UnknownNamespaceError, UnknownLeaseError,
                            StaleArenaError)
from kvstore.layout import ModelLayout, dtype_from_name, dtype_name
from kvstore.validate import check_act, check_kv  # noqa: F401 -- the client's checks

MAGIC = b"KVS1"
VERSION = 1
#: a header (msgpack map) larger than this is refused before it is decoded
MAX_HEADER_BYTES = 16 << 20
#: headers up to this size decode without per-container accounting (at most this many objects)
SMALL_HEADER_BYTES = 64 << 10
#: larger headers: at most this many maps+arrays, items per array, keys per map
MAX_HEADER_CONTAINERS = 4096
MAX_HEADER_ARRAY = 1 << 20
MAX_HEADER_MAP = 1024
#: a tensor dimension above this is refused (no real KV has one; keeps shape arithmetic exact)
MAX_TENSOR_DIM = 1 << 40
#: every op the server knows; ``capabilities`` in the hello reply lists what it serves
OPS = ("hello", "lookup", "put", "get", "release", "reserve", "commit", "plan", "stats", "health", "clear",
       "stage", "put_shm", "register_pool", "load_pool", "save_pool", "unregister_pool")
#: ops a client may resend after a timeout (same effect when done twice)
IDEMPOTENT = frozenset({"hello", "lookup", "get", "plan", "stats", "health"})
#: ops that give something back (a lease, reserved or staged slots, a registered pool). The
#: sidecar runs them however late and however busy it is: refusing one only keeps what it
#: frees held until its lease times out, and a client sends most of them without waiting.
GIVE_BACK = frozenset({"release", "unregister_pool"})


#: code -> exception class raised by clients; store errors keep their embedded classes
CODE_TO_ERROR: dict[str, type[Exception]] = {
    "invalid_argument": InvalidInputError,
    "not_found": BlockNotFoundError,
    "config": ConfigError,
    "capacity": CapacityError,
    "closed": StoreClosedError,
    "not_implemented": NotImplementedError,
    "layout_mismatch": LayoutMismatchError,
    "bad_frame": ProtocolError,
    "bad_version": VersionMismatchError,
    "unknown_op": UnknownOpError,
    "too_large": MessageTooLargeError,
    "unsupported": UnsupportedError,
    "deadline_exceeded": DeadlineExceededError,
    "unknown_namespace": UnknownNamespaceError,
    "unknown_lease": UnknownLeaseError,
    "stale_arena": StaleArenaError,
    "forbidden": ForbiddenError,
    "busy": BusyError,
    "unavailable": SidecarUnavailableError,
    "internal": SidecarError,
}


def error_code(exc: BaseException) -> str:
    """The wire code of an exception raised while serving (most specific class first)."""
    code = getattr(exc, "code", None)
    if isinstance(exc, SidecarError) or isinstance(exc, LayoutMismatchError):
        return code or "internal"
    for cls, name in ((InvalidInputError, "invalid_argument"), (BlockNotFoundError, "not_found"),
                      (ConfigError, "config"), (CapacityError, "capacity"), (StoreClosedError, "closed"),
                      (NotImplementedError, "not_implemented")):
        if isinstance(exc, cls):
            return name
    return "internal"


def error_from_reply(error: Any) -> Exception:
    """The exception a client raises for an error reply's ``{code, message}``."""
    if not isinstance(error, dict):
        return ProtocolError(f"malformed error reply: {error!r:.200}")
    code = str(error.get("code", "internal"))
    message = str(error.get("message", ""))
    cls = CODE_TO_ERROR.get(code, SidecarError)
    if issubclass(cls, SidecarError):
        return cls(message, code)
    return cls(message)


# -- headers -----------------------------------------------------------------------------
def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class _ContainerBudget:
    """Counts the maps and arrays one decode builds and stops it past ``limit``.

    Why: a header is a few small maps plus the tokens (one bin, or one array of ints); a
    hostile one of millions of empty maps costs ~64 bytes of Python per byte of msgpack
    (16 MiB -> 1 GiB) and seconds of the loop thread. msgpack's ``max_*_len`` bound each
    container, not their number; these hooks bound the number. O(1) per container.
    """

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise MessageTooLargeError(f"header holds more than {MAX_HEADER_CONTAINERS} maps/arrays")

    def map(self, pairs: list) -> dict:
        self._spend()
        return dict(pairs)

    def array(self, items: list) -> list:
        self._spend()
        return items


def unpack(data: bytes | memoryview) -> Any:
    """Decode one msgpack document; anything else (trailing bytes, bad data) is a ProtocolError.

    Bounded: at most :data:`MAX_HEADER_BYTES`; a header above :data:`SMALL_HEADER_BYTES` (a
    long token list, or an attack) decodes with at most :data:`MAX_HEADER_CONTAINERS` maps
    and arrays, :data:`MAX_HEADER_ARRAY` items per array and :data:`MAX_HEADER_MAP` keys per
    map, so no header costs more than a small multiple of its size. Small headers (every
    ordinary request) take the plain C decoder. O(len(data)).
    """
    n = len(data)
    if n > MAX_HEADER_BYTES:
        raise MessageTooLargeError(f"header of {n} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        if n <= SMALL_HEADER_BYTES:
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        budget = _ContainerBudget(MAX_HEADER_CONTAINERS)
        return msgpack.unpackb(data, raw=False, strict_map_key=True, object_pairs_hook=budget.map,
                               list_hook=budget.array, max_array_len=MAX_HEADER_ARRAY,
                               max_map_len=MAX_HEADER_MAP, max_ext_len=0)
    except MessageTooLargeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}"[:300]) from None


def request_frames(rid: int, op: str, args: dict, deadline_ms: int | None,
                   payload: list | tuple = (), *, reply: bool = True) -> list:
    """A request's frames. ``reply=False`` (honoured for the give-backs, :data:`GIVE_BACK`):
    the sender will not read the answer, so the sidecar sends none."""
    header = {"v": VERSION, "id": rid, "op": op, "args": args, "deadline_ms": deadline_ms}
    if not reply:
        header["reply"] = False
    return [MAGIC, pack(header), *payload]


def wants_reply(header: dict, op: str) -> bool:
    """Whether to answer a request: always, except a give-back whose sender said
    ``reply: false`` (it does not read the answer; an error in it costs the sender
    nothing it could act on, the claim expires anyway)."""
    return not (op in GIVE_BACK and header.get("reply") is False)


def reply_ok(rid: Any, result: Any, payload: list | tuple = ()) -> list:
    return [MAGIC, pack({"v": VERSION, "id": rid, "ok": True, "result": result}), *payload]


def reply_error(rid: Any, code: str, message: str) -> list:
    return [MAGIC, pack({"v": VERSION, "id": rid, "ok": False,
                         "error": {"code": code, "message": message[:2000]}})]


def parse_request(frames: list) -> tuple[dict, list]:
    """Validate ``[MAGIC, header, *payload]``; returns (header, payload frames).

    Raises :class:`SidecarError` subclasses with the code to reply with. The header's ``id``
    is set (possibly to None) whenever one could be read, so the reply can carry it.
    """
    if len(frames) < 2:
        raise ProtocolError(f"a request is [{MAGIC!r}, header, *payload]; got {len(frames)} frame(s)")
    if bytes(frames[0]) != MAGIC:
        raise ProtocolError(f"bad magic frame (expected {MAGIC!r})")
    header = unpack(frames[1])
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return header, list(frames[2:])


def check_header(header: dict) -> tuple[str, dict, float | None]:
    """The (op, args, deadline seconds) of a request header; raises on any bad field."""
    v = header.get("v")
    if v != VERSION:
        raise VersionMismatchError(f"protocol version {v!r} is not supported; this server speaks v{VERSION}")
    rid = header.get("id")
    if rid is not None and not isinstance(rid, (int, str)):
        raise ProtocolError(f"id must be an int or a string, got {type(rid).__name__}")
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError(f"op must be a string, got {type(op).__name__}")
    if op not in OPS:
        raise UnknownOpError(f"unknown op {op[:64]!r}; known: {', '.join(OPS)}")
    args = header.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidInputError(f"args must be a map, got {type(args).__name__}")
    deadline = header.get("deadline_ms")
    if deadline is not None and (not isinstance(deadline, (int, float)) or isinstance(deadline, bool)
                                 or deadline < 0):
        raise InvalidInputError(f"deadline_ms must be a non-negative number, got {deadline!r}")
    return op, args, (deadline / 1000.0 if deadline else None)


# -- argument helpers --------------------------------------------------------------------
def arg(args: dict, name: str, types: type | tuple[type, ...], *, required: bool = True, default: Any = None) -> Any:
    """``args[name]`` checked against ``types`` (bools are not ints); raises InvalidInputError."""
    if name not in args:
        if required:
            raise InvalidInputError(f"missing argument {name!r}")
        return default
    value = args[name]
    allowed = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in allowed:
        raise InvalidInputError(f"argument {name!r} must be {'/'.join(t.__name__ for t in allowed)}, got bool")
    if not isinstance(value, allowed):
        raise InvalidInputError(f"argument {name!r} must be {'/'.join(t.__name__ for t in allowed)}, "
                                f"got {type(value).__name__}")
    return value


def tokens_to_wire(arr) -> bytes:
    """Tokens (already validated int32 LE numpy array) as raw bytes: 4 bytes per token."""
    return arr.tobytes()


def tokens_from_wire(data: Any):
    """Tokens sent by a client: raw int32 LE bytes, or a list of ints."""
    import numpy as np

    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) % 4:
            raise InvalidInputError(f"tokens bytes must be int32 LE (a multiple of 4 bytes), got {len(data)}")
        return np.frombuffer(data, dtype="<i4")
    if isinstance(data, list):
        return data
    raise InvalidInputError(f"tokens must be int32 bytes or a list of ints, got {type(data).__name__}")


# -- tensors -----------------------------------------------------------------------------
def tensor_desc(t: torch.Tensor) -> dict:
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}


def tensor_frame(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a memoryview (no copy) for a zero-copy send."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    flat = t.detach().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def tensor_from_frame(frame: Any, desc: Any) -> torch.Tensor:
    """A tensor over a received frame's bytes (no copy unless its address is misaligned).

    Validates ``desc`` (dtype name, shape of non-negative ints) against the frame length.
    """
    if not isinstance(desc, dict):
        raise InvalidInputError(f"tensor descriptor must be a map, got {type(desc).__name__}")
    try:
        dtype = dtype_from_name(arg(desc, "dtype", str))
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    shape = arg(desc, "shape", list)
    if len(shape) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_TENSOR_DIM
                                 for s in shape):
        raise InvalidInputError(f"tensor shape must be a list of at most 8 ints in [0, {MAX_TENSOR_DIM}], "
                                f"got {shape!r:.100}")
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != len(buf):
        raise ProtocolError(f"tensor frame holds {len(buf)} bytes, {{dtype, shape}} says {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # zmq frames are read-only buffers; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(buf, dtype=torch.uint8)
    try:
        return raw.view(dtype).view(shape)
    except RuntimeError:  # misaligned for the dtype: one copy
        return raw.clone().view(dtype).view(shape)


def layout_to_wire(layout: ModelLayout) -> dict:
    return layout.to_dict()


def layout_from_wire(d: Any) -> ModelLayout:
    if not isinstance(d, dict):
        raise InvalidInputError(f"layout must be a map, got {type(d).__name__}")
    try:
        return ModelLayout.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"bad layout: {exc}") from None
