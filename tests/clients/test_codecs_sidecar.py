"""Issue 24 over the sidecar: encoded host/disk tiers behind a sidecar, ``exact`` carried on
the wire (shared-memory and frame clients alike), lossy blocks never leased to an exact read."""

from __future__ import annotations

import pytest
import torch

from clients import connect
from kvstore import BlockNotFoundError, ModelLayout, StoreConfig
from kvstore.sidecar.server import ServerOptions, SidecarServer

BT = 4
LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)


@pytest.fixture(scope="module")
def coded_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec")
    bb = LAYOUT.kv_block_bytes(BT)
    cfg = StoreConfig(disk_path=str(d / "disk"), device_bytes=2 * bb, host_bytes=4 * bb, disk_bytes=64 * bb,
                      host_codec="int8", disk_codec="lossless")
    srv = SidecarServer(f"ipc://{d}/kvs.sock", cfg, ServerOptions(workers=2, lease_timeout_s=5.0)).start()
    yield srv
    srv.stop(timeout=10)


def kv_for(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.kv_shape(tokens), generator=g).to(LAYOUT.dtype)


@pytest.mark.parametrize("shm", [True, False])
def test_exact_travels_over_the_wire(coded_server, shm, seed):
    c = connect(coded_server.endpoint, layout=LAYOUT, namespace=f"exact-{shm}", block_tokens=BT, timeout=10.0,
                shm=shm)
    try:
        old = list(range(BT * 2))  # fits the raw top tier: a shm put lands there whole
        kv_old = kv_for(len(old), seed)
        c.put(old, kv_old)
        c.put(list(range(10**6, 10**6 + BT * 2)), kv_for(BT * 2, seed + 1))  # fills the raw top tier
        # the old blocks were demoted into the int8 host tier: lossy, refused by default
        with pytest.raises(BlockNotFoundError):
            c.get(old)
        with pytest.raises(BlockNotFoundError):
            c.get(old, exact=True)
        assert c.lookup(old) == 0 and c.lookup(old, exact=False) == len(old)
        got = c.get(old, exact=False)
        err = ((got.float() - kv_old.float()).norm() / kv_old.float().norm()).item()
        assert 0 < err < 0.01
        # promoted into the shared raw tier by that read: still lossy, still never leased to an exact read
        with pytest.raises(BlockNotFoundError):
            c.get(old, exact=True)
        pool = torch.zeros(8, LAYOUT.num_layers, 2, BT, LAYOUT.num_kv_heads, LAYOUT.head_dim, dtype=LAYOUT.dtype)
        with pytest.raises(BlockNotFoundError):
            c.load_into(old, pool, [1, 2], exact=True)
        assert not pool.any()
        assert c.load_into(old, pool, [1, 2], exact=False) == len(old)
        tiers = c.stats()["tiers"]
        assert tiers["host"]["codec"] == "int8" and tiers["disk"]["codec"] == "lossless"
    finally:
        c.close()


def test_lossless_tiers_behind_a_sidecar_are_byte_exact(coded_server, seed):
    c = connect(coded_server.endpoint, layout=LAYOUT, namespace="lossless", block_tokens=BT, timeout=10.0)
    try:
        prompts = [[p * 1000 + i for i in range(BT * 2)] for p in range(8)]
        kvs = [kv_for(BT * 2, seed + p) for p in range(8)]
        for toks, kv in zip(prompts, kvs):
            c.put(toks, kv)
        # the first prompts went down through int8 host (lossy) to the lossless disk: still lossy
        assert c.lookup(prompts[0], exact=True) == 0
        # the newest one is in the raw top tier and exact
        assert torch.equal(c.get(prompts[-1], exact=True), kvs[-1])
    finally:
        c.close()
