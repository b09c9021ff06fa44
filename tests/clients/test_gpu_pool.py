"""Issue 23: an engine's GPU pool reached from the sidecar by CUDA IPC (registered once;
blocks then move by DMA between the sidecar's host tier and the GPU, never through the
client's CPU memory). The CUDA tests need a GPU and a sidecar in another process (CUDA IPC
cannot open a handle in the process that made it); without CUDA they skip and say so, and
the tests here that need none check what a CPU-only host must do: decline cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from clients import connect
from kvstore import BlockNotFoundError, ModelLayout
from kvstore.errors import InvalidInputError, SidecarError
from kvstore.sidecar.gpu_pool import open_tensor
from tests.clients.conftest import BT, capacities
from tests.clients.test_shm_integrity import _scribble
from tests.kvstore.test_datapath import blocks_of, make_kv, pool_blocks, pools

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_cpu_pool_is_not_registered_and_its_calls_are_unchanged(make_client, layout):
    c = make_client("tcp-shm")
    pool = pools(layout, 4, "cpu")["xlayer"]
    assert c.register_pool(pool) is False and not c._gpu_pools
    kv = make_kv(layout, 2 * BT, 1, "cpu")
    c.put(list(range(2 * BT)), kv)
    assert c.load_into(list(range(2 * BT)), pool, [3, 1]) == 2 * BT
    assert torch.equal(pool_blocks(pool, [3, 1]), blocks_of(kv))


def test_a_malformed_pool_description_is_refused(make_client, layout):
    c = make_client("tcp-shm")
    for tensors in ([{"device": 0}], [], ["x"]):
        with pytest.raises(InvalidInputError):
            c._request("register_pool", {"ns": c.namespace, "owner": c._owner, "tensors": tensors})
    with pytest.raises(InvalidInputError, match="no GPU pool"):
        c._request("load_pool", {"ns": c.namespace, "pool": 12345, "tokens": b"\0" * 4 * BT, "block_ids": [0]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a sidecar without CUDA")
def test_a_sidecar_without_cuda_declines_a_well_formed_pool():
    desc = {"device": 0, "handle": b"h" * 64, "storage_bytes": 1024, "storage_offset_bytes": 0,
            "ref_handle": b"r", "ref_offset": 0, "event_handle": b"", "event_sync": False,
            "shape": [4], "stride": [1], "offset": 0, "dtype": "float16"}
    with pytest.raises(SidecarError) as err:
        open_tensor(desc)
    assert err.value.code == "unsupported"


@pytest.fixture
def sidecar_process(tmp_path):
    """``kvstore serve`` in its own process on an ipc socket (CUDA IPC needs two processes)."""
    lay = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
    caps = capacities(lay)
    sock = tmp_path / "kvs.sock"
    shm = tmp_path / "shm"
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--endpoint", f"ipc://{sock}",
                             "--device-bytes", "0", "--host-bytes", str(caps["host_bytes"] * 4), "--disk-bytes", "0",
                             "--shm-dir", str(shm)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    yield f"ipc://{sock}", shm
    proc.terminate()
    proc.wait(30)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["xlayer", "layers"])
def test_a_registered_gpu_pool_moves_by_dma_exactly(sidecar_process, layout, kind):
    endpoint, _ = sidecar_process
    dev = torch.device("cuda")
    with connect(endpoint, layout=layout, namespace=f"gpu-{kind}", block_tokens=BT) as c:
        assert c.uses_shm
        src = pools(layout, 6, dev)[kind]
        dst = pools(layout, 6, dev)[kind]
        assert c.register_pool(src) and c.register_pool(dst)
        tokens = list(range(3 * BT))
        kv = make_kv(layout, 3 * BT, 7, dev)
        for i, b in enumerate([4, 0, 2]):
            if kind == "xlayer":
                src[b] = blocks_of(kv)[i]
            else:
                for layer, p in enumerate(src):
                    p[:, b] = blocks_of(kv)[i][layer]
        assert c.save_from(tokens, src, [4, 0, 2]) == 3 * BT
        assert torch.equal(c.get(tokens, device=dev), kv)
        got = c.load_into(tokens, dst, [1, 5, 3])
        assert got == 3 * BT and got.failed_block_ids == ()
        assert torch.equal(pool_blocks(dst, [1, 5, 3]), blocks_of(kv))
        assert not pool_blocks(dst, [0, 2, 4]).any()
        assert not c._bounces  # nothing crossed through this process's CPU memory
        h = c.save_from_async(list(range(100, 100 + 3 * BT)), src, [4, 0, 2])
        assert h.wait(30) == 3 * BT
        assert torch.equal(c.get(list(range(100, 100 + 3 * BT)), device=dev), kv)
        c.unregister_pool(src)
        assert c.save_from(list(range(200, 200 + 3 * BT)), src, [4, 0, 2]) == 3 * BT  # the pinned bounce path
        assert c._bounces


@pytest.mark.cuda
def test_a_block_changed_in_shared_memory_never_reaches_a_registered_gpu_pool(sidecar_process, layout):
    endpoint, shm = sidecar_process
    dev = torch.device("cuda")
    with connect(endpoint, layout=layout, namespace="gpu-late", block_tokens=BT) as c:
        pool = pools(layout, 4, dev)["xlayer"]
        assert c.register_pool(pool)
        tokens = list(range(2 * BT))
        kv = make_kv(layout, 2 * BT, 8, dev)
        assert c.put(tokens, kv) == 2 * BT
        arena = next(p for p in shm.iterdir() if p.name.endswith(".shm"))
        slot_bytes = layout.kv_block_bytes(BT)
        nslots = arena.stat().st_size // slot_bytes
        for slot in range(nslots):  # scribble every slot: whichever holds our blocks
            _scribble(str(arena), nslots, slot, 1)
        with pytest.raises(BlockNotFoundError):
            c.load_into(tokens, pool, [0, 1])
        assert not pool.any()
        res = c.load_into(tokens, pool, [0, 1], on_error="report")
        assert int(res) == 0 and res.failed_block_ids == (0, 1)
