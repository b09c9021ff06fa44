"""Activations travel over the wire as a second tensor frame and land in the sidecar's
activation tiers; a store that keeps none accepts and ignores them, like the embedded one."""

from __future__ import annotations

import torch

from clients import connect
from kvstore import ModelLayout, StoreConfig
from kvstore.sidecar.server import ServerOptions, SidecarServer


def tensors(layout: ModelLayout, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)
    act = torch.randn(layout.act_shape(n), generator=g).to(layout.dtype)
    return kv, act


def test_remote_put_stores_activations_beside_kv(layout, tmp_path):
    bb, ab = layout.kv_block_bytes(4), layout.act_block_bytes(4)
    cfg = StoreConfig(device_bytes=0, host_bytes=16 * (bb + ab), disk_bytes=0, act_share=ab / (bb + ab),
                      activations="beside")
    srv = SidecarServer(f"ipc://{tmp_path}/s.sock", cfg, ServerOptions(workers=2)).start()
    try:
        with connect(srv.endpoint, layout=layout, namespace="acts", block_tokens=4, timeout=10.0) as c:
            kv, act = tensors(layout, 12, 0)
            assert c.put(list(range(12)), kv, activations=act) == 12
            st = c.stats()
            assert st["activations"]["blocks"] == 3, st
            assert torch.equal(c.get(list(range(12)), device="cpu"), kv)
    finally:
        srv.stop(timeout=10)


def test_valid_activations_are_accepted_alike_without_activation_tiers(make_client, layout):
    results = []
    for kind in ("embedded", "tcp-frames", "ipc-shm"):
        c = make_client(kind)
        kv, act = tensors(layout, 8, 1)
        results.append((c.put(list(range(8)), kv, activations=act), c.lookup(list(range(8))),
                        torch.equal(c.get(list(range(8)), device="cpu"), kv)))
    assert results == [(8, 8, True)] * 3
