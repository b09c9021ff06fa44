"""What a hostile or careless client sends costs the sidecar bounded memory (RSS measured
around the call) and bounded loop time (measured as another client's latency); a sidecar
owns its endpoint and its shared-memory directory; nothing leaks when a namespace fails."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
import zmq

from kvstore import ModelLayout, StoreConfig
from kvstore.errors import ConfigError
from kvstore.sidecar.protocol import MAGIC, VERSION, pack, unpack
from kvstore.sidecar.server import ServerOptions, SidecarServer

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
BT = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


def _status_bytes(field: str) -> int:
    """One ``kB`` field of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def rss() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def dealer(ctx, endpoint):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def call(sock, op, args, payload=(), rid=1, timeout_ms=10_000):
    sock.send_multipart([MAGIC, pack({"v": VERSION, "id": rid, "op": op, "args": args, "deadline_ms": 0}),
                         *payload])
    assert sock.poll(timeout_ms), f"no answer to {op}"
    return unpack(sock.recv_multipart()[1])


def hello_args(ns, layout=LAYOUT, bt=BT):
    return {"ns": ns, "layout": layout.to_dict(), "block_tokens": bt}


class LatencyProbe:
    """A second client sending ``health`` in a loop; ``stop()`` returns its latencies."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.lat: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        while not self.lat:
            time.sleep(0.01)

    def _run(self) -> None:
        ctx = zmq.Context()
        s = dealer(ctx, self.endpoint)
        i = 0
        while not self._stop.is_set():
            i += 1
            t0 = time.perf_counter()
            s.send_multipart([MAGIC, pack({"v": VERSION, "id": i, "op": "health", "args": {}})])
            if not s.poll(30_000):
                self.lat.append(30.0)
                break
            s.recv_multipart()
            self.lat.append(time.perf_counter() - t0)
            time.sleep(0.002)
        s.close(0)
        ctx.destroy(0)

    def stop(self) -> list[float]:
        self._stop.set()
        self._t.join(60)
        return self.lat


@pytest.fixture
def server(tmp_path):
    bb = LAYOUT.kv_block_bytes(BT)
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=0, host_bytes=64 * bb, disk_bytes=0),
                        ServerOptions(workers=2, max_message_bytes=8 * MiB, shm_dir=str(tmp_path / "shm"))).start()
    yield srv
    srv.stop(timeout=10)


@pytest.fixture
def sock(server):
    ctx = zmq.Context()
    s = dealer(ctx, server.endpoint)
    yield s
    s.close(0)
    ctx.term()


# -- memory ------------------------------------------------------------------------------
def test_a_hello_with_tiny_blocks_is_refused_without_building_its_index(tmp_path, sock):
    """2-byte float8 blocks with block_tokens=1 in a 48 MiB tier: 25M slots; refused by the
    slot cap before any per-slot state exists."""
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=0, host_bytes=48 * MiB, disk_bytes=0),
                        ServerOptions(workers=1, shm_dir=str(tmp_path / "tiny"))).start()
    ctx = zmq.Context()
    try:
        s = dealer(ctx, srv.endpoint)
        tiny = ModelLayout(num_layers=1, num_kv_heads=1, head_dim=1, hidden_size=1, dtype=torch.float8_e4m3fn)
        before = rss()
        h = call(s, "hello", hello_args("tiny", tiny, 1))
        grown = rss() - before
        assert not h["ok"] and h["error"]["code"] == "capacity", h
        assert "block_tokens" in h["error"]["message"] and "slots" in h["error"]["message"]
        assert grown < 32 * MiB, f"the refused hello grew the server by {grown / MiB:.0f} MiB"
        assert srv.namespaces() == [] and os.listdir(tmp_path / "tiny") == [".kvstore-sidecar.lock"]
        assert call(s, "hello", hello_args("normal"))["ok"]  # a sane layout still gets in
        s.close(0)
    finally:
        ctx.destroy(0)
        srv.stop(timeout=10)


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_a_header_of_millions_of_empty_maps_is_refused_cheaply(server, sock, shape):
    """Under the 16 MiB header limit, ~16M empty maps decode to >1 GB of dicts; the bounded
    decoder stops early, and other clients do not wait for it."""
    flood = [{}] * (15 * MiB) if shape == "flat" else [[{}] * (1 << 20)] * 15
    header = pack({"v": VERSION, "id": 7, "op": "health", "args": {"junk": flood}})
    assert len(header) < 16 * MiB
    del flood
    probe = LatencyProbe(server.endpoint)
    can_peak = reset_peak()
    before = rss()
    t0 = time.perf_counter()
    sock.send_multipart([MAGIC, header])
    assert sock.poll(10_000)
    h = unpack(sock.recv_multipart()[1])
    took = time.perf_counter() - t0
    grown = (peak_rss() if can_peak else rss()) - before
    lat = probe.stop()
    assert not h["ok"] and h["error"]["code"] in ("too_large", "bad_frame"), h
    assert grown < 96 * MiB, f"decoding grew the server by {grown / MiB:.0f} MiB"
    assert took < 1.0 and max(lat) < 0.5, (took, max(lat))
    assert call(sock, "health", {})["ok"]


def test_unread_replies_are_bounded_by_the_send_high_water_mark(tmp_path):
    """A client that requests 1 MiB replies and never reads them: the server holds at most
    send_hwm of them (the rest are dropped), not one per request."""
    bb = LAYOUT.kv_block_bytes(BT)
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=0, host_bytes=(2 * MiB // bb + 8) * bb,
                                                         disk_bytes=0),
                        ServerOptions(workers=2, shm=False, send_hwm=4, max_inflight_per_client=1024)).start()
    ctx = zmq.Context()
    try:
        s = dealer(ctx, srv.endpoint)
        ntok = MiB // LAYOUT.kv_bytes_per_token
        kv = torch.randn(LAYOUT.kv_shape(ntok)).half()
        tokens = torch.arange(ntok, dtype=torch.int32).numpy().tobytes()
        assert call(s, "hello", hello_args("big"))["ok"]
        desc = {"dtype": "float16", "shape": list(kv.shape)}
        assert call(s, "put", {"ns": "big", "tokens": tokens, "kv": desc}, [kv.numpy().tobytes()])["result"] == ntok
        s.close(0)
        hog = subprocess.Popen([sys.executable, "-c", HOG, srv.endpoint, "200"], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
        try:
            before = rss()
            assert hog.stdout.readline().strip() == "sent"
            time.sleep(1.0)  # the server answers all 200; the hog reads none
            grown = rss() - before
            probe = LatencyProbe(srv.endpoint)
            lat = probe.stop()
        finally:
            hog.kill()
            hog.wait(10)
        assert grown < 48 * MiB, f"200 unread 1 MiB replies grew the server by {grown / MiB:.0f} MiB"
        assert lat and max(lat) < 1.0
    finally:
        ctx.destroy(0)
        srv.stop(timeout=10)


HOG = """
import sys, zmq
from kvstore.sidecar.protocol import MAGIC, VERSION, pack
import torch
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.RCVHWM, 1)
s.setsockopt(zmq.RCVBUF, 4096)
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
ntok = (1 << 20) // (2 * 2 * 2 * 8 * 2)
tokens = torch.arange(ntok, dtype=torch.int32).numpy().tobytes()
s.send_multipart([MAGIC, pack({"v": VERSION, "id": 0, "op": "hello", "args": {"ns": "big", "layout": {
    "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "hidden_size": 32, "dtype": "float16"}, "block_tokens": 4}})])
s.recv_multipart()
for i in range(int(sys.argv[2])):
    s.send_multipart([MAGIC, pack({"v": VERSION, "id": i + 1, "op": "get", "args": {"ns": "big", "tokens": tokens}})])
print("sent", flush=True)
sys.stdin.read() if False else __import__("time").sleep(60)
"""


def test_a_frame_far_over_the_limit_drops_the_peer_before_it_is_buffered(tmp_path):
    """ZeroMQ checks a frame's announced size first: a 256 MiB frame against an 8 MiB limit
    is never buffered; the sender's connection is dropped and the server serves on."""
    srv = SidecarServer("tcp://127.0.0.1:*", StoreConfig(device_bytes=0, host_bytes=MiB, disk_bytes=0),
                        ServerOptions(workers=1, shm=False, max_message_bytes=8 * MiB)).start()
    try:
        before = rss()
        big = subprocess.run([sys.executable, "-c", BIG, srv.endpoint], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert big.stdout.strip() == "no reply", big.stdout + big.stderr
        grown = rss() - before
        assert grown < 64 * MiB, f"a 256 MiB frame grew the server by {grown / MiB:.0f} MiB"
        ctx = zmq.Context()
        s = dealer(ctx, srv.endpoint)
        assert call(s, "health", {})["ok"]
        s.close(0)
        ctx.destroy(0)
    finally:
        srv.stop(timeout=10)


BIG = """
import sys, zmq
from kvstore.sidecar.protocol import MAGIC, VERSION, pack
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
s.send_multipart([MAGIC, pack({"v": VERSION, "id": 1, "op": "health", "args": {}}), bytearray(256 << 20)])
print("reply" if s.poll(3000) else "no reply", flush=True)
"""


# -- loop time ---------------------------------------------------------------------------
def test_long_lookups_are_hashed_off_the_loop_thread(server, sock):
    """Five pipelined lookups of 1M tokens (hashing ~65k blocks each) while another client
    sends health: its latency stays short, the lookups still get their answers."""
    assert call(sock, "hello", hello_args("long"))["ok"]
    tokens = torch.arange(1 << 20, dtype=torch.int32).numpy().tobytes()
    probe = LatencyProbe(server.endpoint)
    for i in range(5):
        sock.send_multipart([MAGIC, pack({"v": VERSION, "id": 100 + i, "op": "lookup",
                                          "args": {"ns": "long", "tokens": tokens}})])
    answers = []
    for _ in range(5):
        assert sock.poll(60_000)
        answers.append(unpack(sock.recv_multipart()[1]))
    lat = probe.stop()
    assert all(h["ok"] and h["result"] == 0 for h in answers), answers
    lat.sort()
    assert lat[int(0.9 * (len(lat) - 1))] < 0.1 and lat[-1] < 0.3, f"p90 {lat[int(0.9 * (len(lat) - 1))]:.3f} s, max {lat[-1]:.3f} s"


# -- input checks ------------------------------------------------------------------------
@pytest.mark.parametrize("desc", [
    {"dtype": "float16", "shape": [0, 2**64 - 1]},
    {"dtype": "float16", "shape": [0, 2**41]},
    {"dtype": 5, "shape": [4]},
    {"dtype": ["float16"], "shape": [4]},
])
def test_absurd_tensor_descriptors_are_invalid_arguments_not_internal_errors(sock, desc, caplog):
    assert call(sock, "hello", hello_args("shapes"))["ok"]
    tokens = torch.arange(8, dtype=torch.int32).numpy().tobytes()
    h = call(sock, "put", {"ns": "shapes", "tokens": tokens, "kv": desc}, [b""])
    assert not h["ok"] and h["error"]["code"] == "invalid_argument", h
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("dtype", [5, ["float16"], {"x": 1}, None])
def test_a_layout_with_a_non_string_dtype_is_an_invalid_argument(sock, dtype):
    layout = {**LAYOUT.to_dict(), "dtype": dtype}
    h = call(sock, "hello", {"ns": "bad-dtype", "layout": layout, "block_tokens": BT})
    assert not h["ok"] and h["error"]["code"] == "invalid_argument", h


# -- ownership of endpoint and shared memory ---------------------------------------------
def test_a_second_sidecar_on_the_same_ipc_path_is_refused_and_the_first_keeps_serving(tmp_path):
    endpoint = f"ipc://{tmp_path}/kvs.sock"
    first = SidecarServer(endpoint, StoreConfig(device_bytes=0, host_bytes=MiB, disk_bytes=0),
                          ServerOptions(workers=1, shm_dir=str(tmp_path / "a"))).start()
    try:
        second = SidecarServer(endpoint, StoreConfig(device_bytes=0, host_bytes=MiB, disk_bytes=0),
                               ServerOptions(workers=1, shm_dir=str(tmp_path / "b")))
        with pytest.raises(ConfigError, match="another sidecar.*already serves ipc://"):
            second.bind()
        ctx = zmq.Context()
        s = dealer(ctx, endpoint)
        assert call(s, "health", {})["ok"]
        s.close(0)
        ctx.destroy(0)
    finally:
        first.stop(timeout=10)
    again = SidecarServer(endpoint, StoreConfig(device_bytes=0, host_bytes=MiB, disk_bytes=0),
                          ServerOptions(workers=1, shm_dir=str(tmp_path / "a"))).start()  # free once stopped
    again.stop(timeout=10)


def test_a_second_sidecar_on_the_same_shm_dir_is_refused_and_deletes_nothing(tmp_path):
    """The arenas of a live sidecar are safe from another one, even one that cannot see its
    pid (another pid namespace): it is refused by the directory's lock, not by a pid check."""
    shm = tmp_path / "shm"
    cfg = StoreConfig(device_bytes=0, host_bytes=16 * LAYOUT.kv_block_bytes(BT), disk_bytes=0)
    first = SidecarServer("tcp://127.0.0.1:*", cfg, ServerOptions(workers=1, shm_dir=str(shm))).start()
    ctx = zmq.Context()
    try:
        s = dealer(ctx, first.endpoint)
        assert call(s, "hello", hello_args("live"))["ok"]
        arenas = sorted(p for p in os.listdir(shm) if p.endswith(".shm"))
        assert arenas
        # what a sidecar in another pid namespace looks like from here: a pid that does not exist
        foreign = shm / "kvstore-other-host-999999999-0123456789abcdef.shm"
        foreign.write_bytes(b"x")
        second = SidecarServer("tcp://127.0.0.1:*", cfg, ServerOptions(workers=1, shm_dir=str(shm)))
        with pytest.raises(ConfigError, match="already serves the shared-memory directory"):
            second.bind()
        assert sorted(p for p in os.listdir(shm) if p.endswith(".shm")) == sorted(arenas + [foreign.name])
        assert call(s, "health", {})["ok"]
        s.close(0)
    finally:
        ctx.destroy(0)
        first.stop(timeout=10)
    # once its owner is gone, the next sidecar on the directory sweeps what it left
    third = SidecarServer("tcp://127.0.0.1:*", cfg, ServerOptions(workers=1, shm_dir=str(shm))).start()
    try:
        assert [p for p in os.listdir(shm) if p.endswith(".shm")] == []
    finally:
        third.stop(timeout=10)


def test_namespaces_that_fail_to_open_leave_no_shared_memory(tmp_path):
    """Twenty hellos whose store cannot open (its disk slab is held by another process) cost
    no /dev/shm: the host arenas made before the failure are unlinked at once."""
    from allocator.disk import slab_file_bytes
    from kvstore.store import slab_filename

    bb = LAYOUT.kv_block_bytes(BT)
    disk = tmp_path / "disk"
    cfg = StoreConfig(device_bytes=0, host_bytes=256 * bb, disk_bytes=slab_file_bytes(8, bb), disk_path=str(disk))
    shm = tmp_path / "shm"
    srv = SidecarServer("tcp://127.0.0.1:*", cfg, ServerOptions(workers=1, shm_dir=str(shm))).start()
    ctx = zmq.Context()
    holder = None
    try:
        s = dealer(ctx, srv.endpoint)
        for i in range(20):
            ns = f"busy{i}"
            # another process holds this namespace's slab: the store fails after its host arena exists
            holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(disk / slab_filename(ns, "kv"))],
                                      stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "locked"
            h = call(s, "hello", hello_args(ns))
            holder.kill()
            holder.wait(10)
            assert not h["ok"] and h["error"]["code"] == "config" and "in use" in h["error"]["message"], h
            assert [p for p in os.listdir(shm) if p.endswith(".shm")] == [], i
        assert call(s, "hello", hello_args("fine"))["ok"]
        assert len([p for p in os.listdir(shm) if p.endswith(".shm")]) == 1
        s.close(0)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        ctx.destroy(0)
        srv.stop(timeout=10)
    assert [p for p in os.listdir(shm) if p.endswith(".shm")] == []  # and none after a stop


LOCKER = """
import fcntl, os, sys, time
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_disk_slabs_take_disk_as_blocks_are_written(tmp_path):
    """Six namespaces with a 256 MiB disk tier each do not take 1.5 GiB of disk at hello."""
    disk = tmp_path / "disk"
    cfg = StoreConfig(device_bytes=0, host_bytes=4 * LAYOUT.kv_block_bytes(BT), disk_bytes=256 * MiB,
                      disk_path=str(disk))
    srv = SidecarServer("tcp://127.0.0.1:*", cfg, ServerOptions(workers=1, shm_dir=str(tmp_path / "shm"))).start()
    ctx = zmq.Context()
    try:
        s = dealer(ctx, srv.endpoint)
        for i in range(6):
            assert call(s, "hello", hello_args(f"ns{i}"))["ok"]
        slabs = [disk / f for f in os.listdir(disk) if f.endswith(".slab")]
        assert len(slabs) == 6
        assert all(p.stat().st_size >= 256 * MiB - (1 << 20) for p in slabs)  # the cap is there...
        used = sum(p.stat().st_blocks * 512 for p in slabs)
        assert used < 16 * MiB, f"the slabs hold {used / MiB:.0f} MiB of disk before any block"  # ...not taken
        s.close(0)
    finally:
        ctx.destroy(0)
        srv.stop(timeout=10)


def test_the_default_shm_dir_is_the_sidecars_own_and_goes_with_it(tmp_path):
    cfg = StoreConfig(device_bytes=0, host_bytes=16 * LAYOUT.kv_block_bytes(BT), disk_bytes=0)
    srv = SidecarServer("tcp://127.0.0.1:*", cfg, ServerOptions(workers=1)).start()
    ctx = zmq.Context()
    try:
        s = dealer(ctx, srv.endpoint)
        assert call(s, "hello", hello_args("own"))["ok"]
        assert srv.shm_dir.startswith("/dev/shm/kvstore-sidecar-")
        assert any(p.endswith(".shm") for p in os.listdir(srv.shm_dir))
        s.close(0)
    finally:
        ctx.destroy(0)
        srv.stop(timeout=10)
    assert not os.path.exists(srv.shm_dir)
