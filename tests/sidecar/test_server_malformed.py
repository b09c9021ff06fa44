"""The sidecar answers every malformed input with an error reply and keeps serving."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from kvstore import ModelLayout, StoreConfig
from kvstore.sidecar.protocol import MAGIC, VERSION, pack, request_frames, unpack
from kvstore.sidecar.server import ServerOptions, SidecarServer

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
BT = 4


@pytest.fixture(scope="module")
def server():
    bb = LAYOUT.kv_block_bytes(BT)
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=8 * bb, host_bytes=8 * bb, disk_bytes=0),
                        ServerOptions(workers=2, max_message_bytes=1 << 20)).start()
    yield srv
    srv.stop(timeout=10)


@pytest.fixture
def sock(server):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.endpoint)
    yield s
    s.close(0)
    ctx.term()


def roundtrip(sock, frames, timeout_ms=5000):
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), "the server did not answer"
    reply = sock.recv_multipart()
    assert reply[0] == MAGIC
    header = unpack(reply[1])
    return header, reply[2:]


def call(sock, op, args, payload=(), rid=1, v=VERSION):
    frames = [MAGIC, pack({"v": v, "id": rid, "op": op, "args": args, "deadline_ms": 5000}), *payload]
    return roundtrip(sock, frames)


def hello(sock, ns="m"):
    h, _ = call(sock, "hello", {"ns": ns, "layout": LAYOUT.to_dict(), "block_tokens": BT})
    assert h["ok"], h
    return h["result"]


def assert_still_serving(sock):
    h, _ = call(sock, "health", {}, rid=999)
    assert h["ok"] and h["id"] == 999 and h["result"]["status"] == "ok"


def tok(n=8):
    return torch.arange(n, dtype=torch.int32).numpy().tobytes()


KV_DESC = {"dtype": "float16", "shape": list(LAYOUT.kv_shape(8))}
KV_BYTES = LAYOUT.kv_block_bytes(BT) * 2

MALFORMED = {
    "only magic": ([MAGIC], "bad_frame"),
    "bad magic": ([b"XXXX", pack({"v": VERSION, "id": 1, "op": "health"})], "bad_frame"),
    "no magic frame": ([pack({"v": VERSION, "id": 1, "op": "health"})], "bad_frame"),
    "not msgpack": ([MAGIC, b"\xc1\xc1\xc1"], "bad_frame"),
    "truncated msgpack": ([MAGIC, pack({"v": VERSION, "id": 1, "op": "health"})[:-3]], "bad_frame"),
    "msgpack with trailing bytes": ([MAGIC, pack({"v": 1}) + b"\x00"], "bad_frame"),
    "header is a list": ([MAGIC, pack([1, 2, 3])], "bad_frame"),
    "header is a string": ([MAGIC, pack("hello")], "bad_frame"),
    "empty header": ([MAGIC, b""], "bad_frame"),
    "non-str map keys": ([MAGIC, msgpack.packb({1: 2}, use_bin_type=True)], "bad_frame"),
    "wrong version": ([MAGIC, pack({"v": 99, "id": 1, "op": "health"})], "bad_version"),
    "missing version": ([MAGIC, pack({"id": 1, "op": "health"})], "bad_version"),
    "version as string": ([MAGIC, pack({"v": "1", "id": 1, "op": "health"})], "bad_version"),
    "unknown op": ([MAGIC, pack({"v": VERSION, "id": 1, "op": "format_disk"})], "unknown_op"),
    "op not a string": ([MAGIC, pack({"v": VERSION, "id": 1, "op": 7})], "bad_frame"),
    "id is a map": ([MAGIC, pack({"v": VERSION, "id": {"a": 1}, "op": "health"})], "bad_frame"),
    "args not a map": ([MAGIC, pack({"v": VERSION, "id": 1, "op": "health", "args": [1]})], "invalid_argument"),
    "negative deadline": ([MAGIC, pack({"v": VERSION, "id": 1, "op": "health", "deadline_ms": -5})],
                          "invalid_argument"),
    "extra frame on health": ([MAGIC, pack({"v": VERSION, "id": 1, "op": "health"}), b"junk"], "bad_frame"),
    "oversize": ([MAGIC, pack({"v": VERSION, "id": 1, "op": "health"}), b"\0" * (2 << 20)], "too_large"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_get_an_error_reply(sock, name):
    frames, code = MALFORMED[name]
    header, payload = roundtrip(sock, frames)
    assert header["ok"] is False and header["v"] == VERSION
    assert header["error"]["code"] == code, header
    assert isinstance(header["error"]["message"], str) and header["error"]["message"]
    assert payload == []
    assert_still_serving(sock)


BAD_ARGS = [
    ("hello", {}, "invalid_argument"),
    ("hello", {"ns": 5, "layout": LAYOUT.to_dict(), "block_tokens": BT}, "invalid_argument"),
    ("hello", {"ns": "", "layout": LAYOUT.to_dict(), "block_tokens": BT}, "invalid_argument"),
    ("hello", {"ns": "x", "layout": "big", "block_tokens": BT}, "invalid_argument"),
    ("hello", {"ns": "x", "layout": {**LAYOUT.to_dict(), "dtype": "int3"}, "block_tokens": BT}, "invalid_argument"),
    ("hello", {"ns": "x", "layout": {**LAYOUT.to_dict(), "num_layers": -1}, "block_tokens": BT}, "invalid_argument"),
    ("hello", {"ns": "x", "layout": LAYOUT.to_dict(), "block_tokens": True}, "invalid_argument"),
    ("hello", {"ns": "x", "layout": LAYOUT.to_dict(), "block_tokens": 0}, "invalid_argument"),
    ("hello", {"ns": "huge", "layout": {**LAYOUT.to_dict(), "num_layers": 10**6}, "block_tokens": BT}, "config"),
    ("lookup", {"ns": "nobody", "tokens": tok()}, "unknown_namespace"),
    ("lookup", {"ns": "m"}, "invalid_argument"),
    ("lookup", {"ns": "m", "tokens": "abc"}, "invalid_argument"),
    ("lookup", {"ns": "m", "tokens": b"abc"}, "invalid_argument"),
    ("lookup", {"ns": "m", "tokens": [1.5, 2]}, "invalid_argument"),
    ("lookup", {"ns": "m", "tokens": b""}, "invalid_argument"),
    ("lookup", {"ns": ["m"], "tokens": tok()}, "invalid_argument"),
    ("get", {"ns": "m", "tokens": tok(6)}, "invalid_argument"),
    ("get", {"ns": "m", "tokens": tok(8), "shm": "yes"}, "invalid_argument"),
    ("get", {"ns": "m", "tokens": tok(8)}, "not_found"),
    ("release", {"claim": 12345}, "unknown_lease"),
    ("release", {"claim": "x"}, "invalid_argument"),
    ("commit", {"claim": 12345}, "unknown_lease"),
    ("plan", {"ns": "m", "tokens": tok(), "profile": {"version": -1}}, "invalid_argument"),
    ("clear", {"ns": 3}, "invalid_argument"),
    ("stats", {"ns": "nobody"}, "unknown_namespace"),
]


@pytest.mark.parametrize("op, args, code", BAD_ARGS, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(BAD_ARGS)])
def test_wrong_arguments_get_an_error_reply(sock, op, args, code):
    hello(sock)
    header, _ = call(sock, op, args, rid=41)
    assert header["ok"] is False and header["id"] == 41
    assert header["error"]["code"] == code, header
    assert_still_serving(sock)


PUT_PAYLOADS = [
    ("no payload", {"kv": KV_DESC}, [], "bad_frame"),
    ("two payloads", {"kv": KV_DESC}, [b"\0" * KV_BYTES, b"\0"], "bad_frame"),
    ("short frame", {"kv": KV_DESC}, [b"\0" * (KV_BYTES - 2)], "bad_frame"),
    ("long frame", {"kv": KV_DESC}, [b"\0" * (KV_BYTES + 2)], "bad_frame"),
    ("no descriptor", {}, [b"\0" * KV_BYTES], "invalid_argument"),
    ("descriptor not a map", {"kv": [1]}, [b"\0" * KV_BYTES], "invalid_argument"),
    ("unknown dtype", {"kv": {**KV_DESC, "dtype": "complex7"}}, [b"\0" * KV_BYTES], "invalid_argument"),
    ("negative dim", {"kv": {**KV_DESC, "shape": [-1, 2]}}, [b"\0" * KV_BYTES], "invalid_argument"),
    ("shape of strings", {"kv": {**KV_DESC, "shape": ["a"]}}, [b"\0" * KV_BYTES], "invalid_argument"),
    ("wrong dtype for layout", {"kv": {"dtype": "bfloat16", "shape": KV_DESC["shape"]}}, [b"\0" * KV_BYTES],
     "invalid_argument"),
    ("wrong shape for layout", {"kv": {"dtype": "float16", "shape": [KV_BYTES // 2]}}, [b"\0" * KV_BYTES],
     "invalid_argument"),
    ("activations without their frame", {"kv": KV_DESC, "act": {"dtype": "float16", "shape": [1]}},
     [b"\0" * KV_BYTES], "bad_frame"),
    ("activations of the wrong shape", {"kv": KV_DESC, "act": {"dtype": "float16", "shape": [2]}},
     [b"\0" * KV_BYTES, b"\0" * 4], "invalid_argument"),
]


@pytest.mark.parametrize("name, extra, payload, code", PUT_PAYLOADS, ids=[p[0] for p in PUT_PAYLOADS])
def test_bad_put_payloads_get_an_error_reply(sock, name, extra, payload, code):
    hello(sock)
    header, _ = call(sock, "put", {"ns": "m", "tokens": tok(), **extra}, payload, rid=7)
    assert header["ok"] is False and header["error"]["code"] == code, header
    h, _ = call(sock, "lookup", {"ns": "m", "tokens": tok()})
    assert h["ok"] and h["result"] == 0  # nothing half-stored
    assert_still_serving(sock)


def test_layout_mismatch_is_refused_clearly(sock):
    hello(sock, ns="fixed")
    other = {**LAYOUT.to_dict(), "num_kv_heads": 4}
    header, _ = call(sock, "hello", {"ns": "fixed", "layout": other, "block_tokens": BT})
    assert header["error"]["code"] == "layout_mismatch"
    assert "fixed" in header["error"]["message"] and "first client" in header["error"]["message"]
    header, _ = call(sock, "hello", {"ns": "fixed", "layout": LAYOUT.to_dict(), "block_tokens": 2 * BT})
    assert header["error"]["code"] == "layout_mismatch"
    assert_still_serving(sock)


def test_a_storm_of_garbage_then_real_work(sock, rng):
    """Random bytes and random frame counts, then a valid put/get still round-trips."""
    for _ in range(200):
        frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.5:
            frames[0] = MAGIC
        sock.send_multipart(frames)
    answered = 0
    for _ in range(200):
        assert sock.poll(5000)
        h = unpack(sock.recv_multipart()[1])
        assert h["ok"] is False and h["error"]["code"] in ("bad_frame", "bad_version", "unknown_op",
                                                            "invalid_argument")
        answered += 1
    assert answered == 200
    hello(sock)
    kv = torch.randn(LAYOUT.kv_shape(8)).half()
    h, _ = call(sock, "put", {"ns": "m", "tokens": tok(), "kv": KV_DESC}, [kv.numpy().tobytes()])
    assert h["ok"] and h["result"] == 8
    h, payload = call(sock, "get", {"ns": "m", "tokens": tok()})
    assert h["ok"] and h["result"]["mode"] == "frames"
    assert torch.equal(torch.frombuffer(bytearray(payload[0]), dtype=torch.float16).view(kv.shape), kv)
    call(sock, "clear", {"ns": "m"})


def test_reply_echoes_string_ids_and_request_frames_helper(sock):
    header, _ = roundtrip(sock, request_frames("abc", "health", {}, 1000))
    assert header["ok"] and header["id"] == "abc"


def test_expired_deadline_is_refused_not_run(server):
    """A request whose deadline passed while it was queued is answered, not run."""
    import time

    ran = []
    server._handlers["health"], orig = (lambda args, payload: ran.append(1) or ({}, [])), server._handlers["health"]
    try:
        frames = server._run("health", {}, [], 9, time.monotonic() - 1.0, 0.5)
    finally:
        server._handlers["health"] = orig
    h = unpack(frames[1])
    assert h["ok"] is False and h["id"] == 9 and h["error"]["code"] == "deadline_exceeded" and not ran
