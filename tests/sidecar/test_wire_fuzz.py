"""Wire-protocol fuzzing: hypothesis drives random valid and invalid request sequences at a
running sidecar and checks it against a model (a dict: block prefix -> the bytes first
stored for it). After every step the server answers, ``lookup`` agrees with the model and
every cached prefix reads back exactly as the model says: no stored block ever changed.

The store is sized so nothing is evicted, which makes the model exact (a miss is a bug).
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
import msgpack
import pytest
import torch
import xxhash
import zmq

from allocator.shm import map_shared
from kvstore import ModelLayout, StoreConfig
from kvstore.sidecar.protocol import MAGIC, OPS, VERSION, pack, unpack
from kvstore.sidecar.server import ServerOptions, SidecarServer

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=4, hidden_size=16, dtype=torch.float16)
BT = 4
MAX_BLOCKS = 6
# a few prompts that share leading blocks, so puts overlap and dedup
PROMPTS = [[1] * BT * 2 + list(range(100, 100 + BT * 4)), [1] * BT * 2 + list(range(200, 200 + BT * 4)),
           list(range(300, 300 + BT * MAX_BLOCKS)), [1] * BT * MAX_BLOCKS]
_ns = itertools.count()

plain = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
                     | st.text(max_size=20) | st.binary(max_size=64),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)
arg_names = st.sampled_from(["ns", "tokens", "kv", "claim", "layout", "block_tokens", "shm", "profile", "owner"])


@pytest.fixture(scope="module")
def server():
    bb = LAYOUT.kv_block_bytes(BT)
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=0, host_bytes=4096 * bb, disk_bytes=0),
                        ServerOptions(workers=2, max_message_bytes=1 << 20, lease_timeout_s=30)).start()
    yield srv
    srv.stop(timeout=10)


class WireMachine(RuleBasedStateMachine):
    server: SidecarServer

    @initialize()
    def setup(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.server.endpoint)
        self.rid = itertools.count(1)
        self.ns = f"fuzz-{next(_ns)}"
        self.model: dict[tuple, bytes] = {}
        h, _ = self.call("hello", {"ns": self.ns, "layout": LAYOUT.to_dict(), "block_tokens": BT})
        assert h["ok"], h
        self.rows = [map_shared(s["path"], s["num_slots"], s["slot_bytes"]) for s in h["result"]["shm"]["segments"]]
        self.idents = [s["ident"] for s in h["result"]["shm"]["segments"]]

    def teardown(self):
        if hasattr(self, "sock"):
            self.sock.close(0)
            self.ctx.destroy(0)

    # -- transport -----------------------------------------------------------------------
    def send_raw(self, frames):
        self.sock.send_multipart(frames)
        assert self.sock.poll(10_000), "the server did not answer"
        reply = self.sock.recv_multipart()
        assert reply[0] == MAGIC
        header = unpack(reply[1])
        assert isinstance(header, dict) and isinstance(header.get("ok"), bool), header
        return header, reply[2:]

    def call(self, op, args, payload=()):
        rid = next(self.rid)
        h, frames = self.send_raw([MAGIC, pack({"v": VERSION, "id": rid, "op": op, "args": args,
                                                "deadline_ms": 10_000}), *payload])
        assert h["id"] == rid
        return h, frames

    # -- model -----------------------------------------------------------------------------
    def expected_prefix(self, tokens) -> int:
        n = 0
        while n + BT <= len(tokens) and tuple(tokens[:n + BT]) in self.model:
            n += BT
        return n

    @staticmethod
    def tok(tokens):
        return torch.tensor(tokens, dtype=torch.int32).numpy().tobytes()

    @staticmethod
    def kv(nb, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(LAYOUT.kv_shape(nb * BT), generator=g).to(LAYOUT.dtype)

    @staticmethod
    def block_bytes(kv, i):
        return kv[:, :, i * BT:(i + 1) * BT].contiguous().numpy().tobytes()

    def remember(self, tokens, kv, blocks):
        for i in blocks:
            self.model.setdefault(tuple(tokens[:(i + 1) * BT]), self.block_bytes(kv, i))

    # -- valid operations ----------------------------------------------------------------
    @rule(p=st.integers(0, len(PROMPTS) - 1), nb=st.integers(1, MAX_BLOCKS), seed=st.integers(0, 2**16),
          extra=st.integers(0, BT - 1))
    def put_frames(self, p, nb, seed, extra):
        tokens = PROMPTS[p][:nb * BT] + [7] * extra  # a partial tail block is never stored
        kv = torch.cat([self.kv(nb, seed), torch.zeros(LAYOUT.kv_shape(extra), dtype=LAYOUT.dtype)], dim=2)
        h, _ = self.call("put", {"ns": self.ns, "tokens": self.tok(tokens),
                                 "kv": {"dtype": "float16", "shape": list(kv.shape)}}, [kv.numpy().tobytes()])
        assert h["ok"] and h["result"] == nb * BT, h
        self.remember(tokens, kv, range(nb))

    @rule(p=st.integers(0, len(PROMPTS) - 1), nb=st.integers(1, MAX_BLOCKS), seed=st.integers(0, 2**16),
          abort=st.booleans())
    def put_shm(self, p, nb, seed, abort):
        tokens = PROMPTS[p][:nb * BT]
        kv = self.kv(nb, seed)
        h, _ = self.call("reserve", {"ns": self.ns, "tokens": self.tok(tokens)})
        assert h["ok"], h
        res = h["result"]
        if res["mode"] == "done":
            assert res["tokens"] == nb * BT == self.expected_prefix(tokens)
            return
        assert res["mode"] == "shm"
        assert res["arena"] == self.idents
        sums = []
        for pos, seg, slot in res["blocks"]:
            self.rows[seg][slot].copy_(torch.frombuffer(bytearray(self.block_bytes(kv, pos)), dtype=torch.uint8))
            sums.append(xxhash.xxh3_64_intdigest(self.block_bytes(kv, pos)))
        h, _ = self.call("release" if abort else "commit", {"claim": res["claim"], "arena": self.idents,
                                                             "sums": struct.pack(f"<{len(sums)}Q", *sums)})
        assert h["ok"], h
        if not abort:
            assert h["result"] == nb * BT
            self.remember(tokens, kv, [pos for pos, _, _ in res["blocks"]])

    @rule(p=st.integers(0, len(PROMPTS) - 1), nb=st.integers(0, MAX_BLOCKS), shm=st.booleans())
    def get(self, p, nb, shm):
        tokens = PROMPTS[p][:nb * BT]
        h, frames = self.call("get", {"ns": self.ns, "tokens": self.tok(tokens), "shm": shm})
        if not tokens:
            assert not h["ok"] and h["error"]["code"] == "invalid_argument", h
            return
        if self.expected_prefix(tokens) < len(tokens):
            assert not h["ok"] and h["error"]["code"] == "not_found", h
            return
        assert h["ok"], h
        self.check_bytes(tokens, h["result"], frames)

    @rule(p=st.integers(0, len(PROMPTS) - 1), nb=st.integers(0, MAX_BLOCKS))
    def lookup(self, p, nb):
        tokens = PROMPTS[p][:nb * BT]
        h, _ = self.call("lookup", {"ns": self.ns, "tokens": self.tok(tokens)})
        if not tokens:
            assert not h["ok"] and h["error"]["code"] == "invalid_argument", h
            return
        assert h["ok"] and h["result"] == self.expected_prefix(tokens), (h, self.expected_prefix(tokens))

    # -- invalid operations --------------------------------------------------------------
    @rule(frames=st.lists(st.binary(max_size=48), min_size=0, max_size=4))
    def garbage_frames(self, frames):
        if frames and frames[0] == MAGIC:
            frames[0] = b"KVS0"
        h, _ = self.send_raw(frames or [b""])
        assert not h["ok"] and h["error"]["code"] == "bad_frame", h

    @rule(op=st.sampled_from(OPS) | st.text(max_size=12), args=st.dictionaries(arg_names, plain, max_size=4),
          v=st.sampled_from([VERSION, VERSION, 0, 2, "1", None]), payload=st.lists(st.binary(max_size=32), max_size=2))
    def random_request(self, op, args, v, payload):
        if op == "hello" or op == "clear" or isinstance(args.get("ns"), str) and args["ns"].startswith("fuzz-"):
            args["ns"] = "not-ours"  # a random clear of our namespace would be a legal request
        header = {"v": v, "id": next(self.rid), "op": op, "args": args}
        h, _ = self.send_raw([MAGIC, pack(header), *payload])
        if v != VERSION:
            assert not h["ok"] and h["error"]["code"] == "bad_version"
        elif op not in OPS:
            assert not h["ok"] and h["error"]["code"] == "unknown_op"
        elif not h["ok"]:
            assert h["error"]["code"] in ("bad_frame", "invalid_argument", "unknown_namespace", "unknown_lease",
                                          "not_found", "too_large", "config", "capacity", "unsupported",
                                          "layout_mismatch", "not_implemented", "stale_arena"), h

    @rule(p=st.integers(0, len(PROMPTS) - 1), nb=st.integers(1, MAX_BLOCKS),
          shape_delta=st.integers(-3, 3), dtype=st.sampled_from(["float16", "float32", "int8", "bogus"]))
    def put_mismatched(self, p, nb, shape_delta, dtype):
        tokens = PROMPTS[p][:nb * BT]
        shape = list(LAYOUT.kv_shape(nb * BT))
        shape[2] += shape_delta
        if shape_delta == 0 and dtype == "float16":
            shape[0] += 1
        nbytes = max(0, int(torch.tensor(shape).prod())) * 2
        h, _ = self.call("put", {"ns": self.ns, "tokens": self.tok(tokens), "kv": {"dtype": dtype, "shape": shape}},
                         [b"\x55" * nbytes])
        assert not h["ok"] and h["error"]["code"] in ("invalid_argument", "bad_frame"), h

    @rule(data=st.binary(min_size=1, max_size=64))
    def bad_msgpack_header(self, data):
        try:
            decoded = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception:
            decoded = None
        h, _ = self.send_raw([MAGIC, data])
        if not (isinstance(decoded, dict) and decoded.get("v") == VERSION and decoded.get("op") in OPS):
            assert not h["ok"], h

    # -- invariants ------------------------------------------------------------------------
    def check_bytes(self, tokens, result, frames):
        nb = len(tokens) // BT
        if result["mode"] == "shm":
            got = [self.rows[seg][slot].numpy().tobytes() for seg, slot in result["blocks"]]
            h, _ = self.call("release", {"claim": result["claim"]})
            assert h["ok"]
        else:
            kv = torch.frombuffer(bytearray(frames[0]), dtype=LAYOUT.dtype).view(result["kv"]["shape"])
            got = [self.block_bytes(kv, i) for i in range(nb)]
        assert len(got) == nb
        for i in range(nb):
            assert got[i] == self.model[tuple(tokens[:(i + 1) * BT])], f"block {i} of {tokens[:8]}... changed"

    @invariant()
    def stored_blocks_are_unchanged(self):
        if not hasattr(self, "sock"):
            return
        for tokens in PROMPTS:
            h, _ = self.call("lookup", {"ns": self.ns, "tokens": self.tok(tokens)})
            n = self.expected_prefix(tokens)
            assert h["ok"] and h["result"] == n, (h, n)
            if n:
                h, frames = self.call("get", {"ns": self.ns, "tokens": self.tok(tokens[:n])})
                assert h["ok"], h
                self.check_bytes(tokens[:n], h["result"], frames)


def test_wire_protocol_state_machine(server):
    WireMachine.server = server
    run = WireMachine.TestCase
    run.settings = settings(max_examples=25, stateful_step_count=30, deadline=None, derandomize=False,
                            suppress_health_check=list(HealthCheck), print_blob=True)
    run().runTest()
    assert server.counters["malformed"] > 0
    h = server._handlers["health"]({}, [])[0]  # the op table with the server's context bound in
    assert h["status"] == "ok" and h["open_claims"] == 0
