"""Fixtures for the client tests: sidecars on tcp:// and ipc:// (one per module), and a
factory that builds any client kind with the same store capacities."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import itertools
import threading

import pytest

from allocator.disk import slab_file_bytes
from clients import connect
from kvstore import StoreConfig
from kvstore.sidecar.server import ServerOptions, SidecarServer

BT = 4
DEVICE_BLOCKS, HOST_BLOCKS, DISK_BLOCKS = 4, 4, 8
KINDS = ["embedded", "tcp-frames", "tcp-shm", "ipc-shm"]
_ns_counter = itertools.count()


def capacities(layout, block_tokens: int = BT) -> dict:
    bb = layout.kv_block_bytes(block_tokens)
    return dict(device_bytes=DEVICE_BLOCKS * bb, host_bytes=HOST_BLOCKS * bb,
                disk_bytes=slab_file_bytes(DISK_BLOCKS, bb))


def start_server(endpoint: str, tmp_path, scale: int = 1, **options) -> SidecarServer:
    # Capacities are per namespace; the block size comes from each namespace's first client,
    # so the server config holds byte counts computed for the test layout (see capacities()).
    from kvstore import ModelLayout
    import torch

    lay = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
    cfg = StoreConfig(disk_path=str(tmp_path / "disk"), **{k: v * scale for k, v in capacities(lay).items()})
    opts = ServerOptions(**{"workers": 2, "lease_timeout_s": 5.0, **options})
    return SidecarServer(endpoint, cfg, opts).start()


@contextmanager
def stats_gated(srv: SidecarServer, timeout: float = 20.0) -> Iterator[threading.Event]:
    """Inside the block a ``stats`` request holds the worker that runs it until the yielded
    event is set (at most ``timeout``): how a test keeps workers busy. The block's end
    sets the event and restores the handler."""
    gate = threading.Event()
    orig = srv._handlers["stats"]

    def gated(args, payload):
        gate.wait(timeout)
        return orig(args, payload)

    srv._handlers["stats"] = gated
    try:
        yield gate
    finally:
        gate.set()
        srv._handlers["stats"] = orig


@pytest.fixture(scope="module")
def tcp_server(tmp_path_factory):
    srv = start_server("tcp://127.0.0.1:*", tmp_path_factory.mktemp("tcp"))
    yield srv
    srv.stop(timeout=10)


@pytest.fixture(scope="module")
def ipc_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ipc")
    srv = start_server(f"ipc://{d}/kvs.sock", d)
    yield srv
    srv.stop(timeout=10)


@pytest.fixture
def make_client(request, layout, tmp_path):
    """``make_client(kind, namespace=None, **kw)``: a client with the shared capacities; closed at teardown."""
    made = []

    def make(kind: str, namespace: str | None = None, **kw):
        ns = namespace or f"{request.node.name[:40]}-{next(_ns_counter)}"
        if kind == "embedded":
            c = connect("embedded://", layout=layout, namespace=ns, block_tokens=BT,
                        disk_path=str(tmp_path / f"emb-{ns}"), **capacities(layout), **kw)
        else:
            srv = request.getfixturevalue("tcp_server" if kind.startswith("tcp") else "ipc_server")
            c = connect(srv.endpoint, layout=layout, namespace=ns, block_tokens=BT, timeout=10.0,
                        shm=kind.endswith("shm"), **kw)
            assert c.uses_shm == kind.endswith("shm")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(params=KINDS)
def client(request, make_client):
    return make_client(request.param)
