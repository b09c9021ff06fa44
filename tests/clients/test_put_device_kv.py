"""A sidecar client's put of device KV (issue 26 item 4): the KV crosses to host memory once,
on the caller's stream, and is hashed and copied from there -- proven on CPU with the
delayed-copy device (the bytes land only when the put waits for them)."""

from __future__ import annotations

import pytest
import torch

from clients.sidecar import kv_on_host
from tests.delayed_copies import DelayedCopier


def _kv(layout, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(tokens), generator=g).to(layout.dtype)


@pytest.mark.parametrize("kind", ["tcp-shm", "ipc-shm", "tcp-frames"])
def test_put_of_device_kv_stores_and_hashes_the_landed_bytes(make_client, layout, seed, kind):
    c = make_client(kind)
    copier = DelayedCopier()
    c.copier = copier
    for i in range(3):
        tokens = list(range(1000 * i, 1000 * i + 12))
        kv = copier.put_on(_kv(layout, 12, seed + i))  # "engine KV on the GPU"
        assert c.put(tokens, kv) == 12
        got = c.get(tokens, device="cpu")  # verified against the put's checksums on the way out
        assert torch.equal(got, kv), f"put {i} (seed {seed})"
    assert copier.crossings == 3 and copier.in_flight() == 0


def test_kv_on_host_reuses_one_buffer_and_passes_host_kv_through(layout, seed):
    copier = DelayedCopier()
    host = _kv(layout, 8, seed)
    assert kv_on_host(host, copier) is host and copier.crossings == 0
    a = kv_on_host(copier.put_on(_kv(layout, 8, seed + 1)), copier)
    ptr = a.data_ptr()
    b_src = copier.put_on(_kv(layout, 4, seed + 2))
    b = kv_on_host(b_src, copier)
    assert b.data_ptr() == ptr and torch.equal(b, b_src)  # same buffer, the new bytes


@pytest.mark.cuda
def test_cuda_put_of_kv_written_on_a_side_stream(make_client, layout, seed):
    """On a GPU: KV produced on an engine's own stream, put without a sync by the caller
    (the put runs on that stream), reads back exactly."""
    c = make_client("tcp-shm")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        kv = torch.randn(layout.kv_shape(16), device="cuda").to(layout.dtype)
        kv.mul_(3)  # queued on the side stream
        assert c.put(list(range(16)), kv) == 16
    side.synchronize()
    assert torch.equal(c.get(list(range(16)), device="cuda"), kv)
