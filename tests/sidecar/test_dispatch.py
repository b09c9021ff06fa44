"""The op table and the Context: every op has one handler, found by name, and a handler
runs on a Context alone (no server, no socket): what the split of the server is for."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvstore import ModelLayout, StoreConfig
from kvstore.config import sidecar_config
from kvstore.errors import ForbiddenError, InvalidInputError
from kvstore.sidecar import dispatch, gpu_pool, limits, session_ops, shm_plane, store_ops
from kvstore.sidecar.claims import ClaimBook, GpuPools, Registered
from kvstore.sidecar.context import Context
from kvstore.sidecar.metrics import Counters
from kvstore.sidecar.namespaces import PEER, NamespaceBook, Peer
from kvstore.sidecar.options import ServerOptions
from kvstore.sidecar.protocol import OPS, ProtocolError, UnknownLeaseError, tensor_desc, tensor_frame, tensor_from_frame

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
BT = 4


def test_the_op_table_names_one_handler_for_every_op():
    assert set(dispatch.OP_TABLE) == set(OPS)
    groups = {session_ops, store_ops, shm_plane, gpu_pool}
    for op, handler in dispatch.OP_TABLE.items():
        assert handler.__name__ == f"op_{op}", op  # a search for the op finds its handler
        assert any(getattr(g, handler.__name__, None) is handler for g in groups), op
    with pytest.raises(TypeError):
        dispatch.OP_TABLE["put_shm"] = store_ops.op_put  # type: ignore[index]


@dataclass
class Loop:
    """The loop's side of a Context, as the session ops see it."""

    endpoint: str = "inproc://nowhere"
    waiting: int = 3

    def uptime_s(self) -> float:
        return 1.5

    def queued(self) -> int:
        return self.waiting


@pytest.fixture
def ctx(tmp_path):
    options = ServerOptions(workers=1, lease_timeout_s=60.0)
    bb = LAYOUT.kv_block_bytes(BT)
    namespaces = NamespaceBook(sidecar_config(StoreConfig(host_bytes=8 * bb, disk_bytes=0)), options, curve=False)
    namespaces.shm_dir = str(tmp_path)
    counters = Counters()
    claims = ClaimBook(options, "this-host", counters.count)
    ctx = Context(options, namespaces, claims, GpuPools(), limits.ReplyBudget(1 << 24, 1 << 26), counters,
                  "this-host", False, Loop())
    yield ctx
    for ns in namespaces.all():
        ns.store.close()


def args(**kw):
    return {PEER: Peer(b"conn-1", None), "ns": "m", **kw}


def test_handlers_run_on_a_context_alone(ctx, seed):
    table = dispatch.bind(ctx)
    hello, _ = table["hello"](args(layout=LAYOUT.to_dict(), block_tokens=BT), [])
    assert hello["block_tokens"] == BT and hello["shm"]["host"] == "this-host" and hello["shm"]["segments"]
    g = torch.Generator().manual_seed(seed)
    tokens = list(range(3 * BT))
    kv = torch.randn(LAYOUT.kv_shape(len(tokens)), generator=g).to(LAYOUT.dtype)
    assert table["put"](args(tokens=tokens, kv=tensor_desc(kv)), [tensor_frame(kv)])[0] == len(tokens)
    assert table["lookup"](args(tokens=tokens), [])[0] == len(tokens)

    # KV as frames: one copy out of the (shared) host tier, its bytes held against the peer's budget
    reply, frames = table["get"](args(tokens=tokens), [])
    assert reply["mode"] == "frames" and torch.equal(tensor_from_frame(frames[0], reply["kv"]), kv)
    peer, nbytes = ctx.take_reply_grant()
    assert peer == b"conn-1" and nbytes == kv.numel() * kv.element_size()
    assert ctx.take_reply_grant() is None

    # a lease over shared memory is a claim in the context's book until it is released
    lease, _ = table["get"](args(tokens=tokens, shm=True), [])
    assert lease["mode"] == "shm" and len(lease["blocks"]) == 3 and ctx.claims.open() == 1
    stats, _ = table["stats"]({PEER: Peer(b"conn-2", None)}, [])
    assert stats["server"]["open_claims"] == 1 and stats["server"]["endpoint"] == "inproc://nowhere"
    health, _ = table["health"]({}, [])
    assert health["queued"] == 3 and health["namespaces"] == 1
    assert table["release"](args(claim=lease["claim"]), [])[0] is True and ctx.claims.open() == 0
    with pytest.raises(UnknownLeaseError):
        table["release"](args(claim=lease["claim"]), [])

    # staged slots: a claim of the plane's own, topped up to what was asked
    staged, _ = table["stage"](args(blocks=2), [])
    assert staged["mode"] == "shm" and len(staged["slots"]) >= 2 and ctx.claims.open(("staging",)) == 1
    with pytest.raises(ProtocolError):
        table["stage"](args(blocks=2), [b"stray"])


def test_a_claim_is_its_creators_key(ctx):
    ctx.namespaces.curve = True  # keys separate tenants: the book is keyed by key name
    table = dispatch.bind(ctx)
    mine = {PEER: Peer(b"a", "alice"), "ns": "m"}
    table["hello"]({**mine, "layout": LAYOUT.to_dict(), "block_tokens": BT}, [])
    ns = ctx.namespaces.get(mine)
    cid = ctx.claims.add("reservation", ns, ns.store.port.reserve(list(range(BT)), 0), mine)
    with pytest.raises(ForbiddenError):
        ctx.claims.take({PEER: Peer(b"b", "bob"), "claim": cid})
    assert ctx.claims.open() == 1
    ctx.claims.take({**mine, "claim": cid})
    assert ctx.claims.open() == 0


def test_the_pool_ops_run_on_a_context_alone(ctx, seed):
    """The GPU pool ops through the context, with a CPU pool put in the registry directly
    (standing in for one opened by CUDA IPC, which needs a GPU and a second process). The
    namespace's tiers are private memory here: ``KVStore.save_from`` into a shared arena
    records no checksums for what it wrote (a store defect: its rows are copied past the
    arena's hashing ``write``), so its blocks would read back as corrupt."""
    ctx.namespaces.shm_dir = None
    table = dispatch.bind(ctx)
    table["hello"](args(layout=LAYOUT.to_dict(), block_tokens=BT), [])
    ns = ctx.namespaces.get(args())
    g = torch.Generator().manual_seed(seed)
    L, H, D = LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_dim
    src = torch.randn((4, L, 2, BT, H, D), generator=g).to(LAYOUT.dtype)
    dst = torch.zeros_like(src)
    pid_src = ctx.gpu_pools.add(Registered(ns, src, b"conn-1", None))
    pid_dst = ctx.gpu_pools.add(Registered(ns, dst, b"conn-1", None))
    tokens = list(range(2 * BT))
    assert table["save_pool"](args(pool=pid_src, tokens=tokens, block_ids=[2, 0]), [])[0] == 2 * BT
    assert table["load_pool"](args(pool=pid_dst, tokens=tokens, block_ids=[1, 3]), [])[0] == 2 * BT
    assert torch.equal(dst[[1, 3]], src[[2, 0]]) and not dst[[0, 2]].any()
    assert table["unregister_pool"](args(pool=pid_dst), [])[0] is True
    with pytest.raises(InvalidInputError, match="no GPU pool"):
        table["load_pool"](args(pool=pid_dst, tokens=tokens, block_ids=[0, 1]), [])
    with pytest.raises(InvalidInputError, match="own host"):  # pid 1 is not a client of this host's
        table["register_pool"](args(owner=[1, 1], tensors=[{}]), [])
