"""Machine measurements behind ``kvstore calibrate``: measure link bandwidths, latencies and compute rates into a cost profile.

Measures, on this machine:

* ``disk->host``: positioned reads (``os.preadv`` into a preallocated buffer) from a file in
  a temporary directory (``--dir``), after ``posix_fadvise(DONTNEED)`` so the page cache is
  not measured where the OS honours it; latency from 4 KiB reads, bandwidth from large ones;
* ``host->device``: pinned host -> CUDA copies when CUDA is present, else a host memcpy (the
  "device" is the CPU); ``disk->device`` only where a direct path exists (not measured
  here, so absent: disk payloads then cross disk->host->device);
* ``recompute``: the K/V projection GEMM ``T x hidden x 2*kvd`` plus RoPE at the layout's
  shapes, as an effective FLOP rate and a per-call latency (from a tiny call);
* ``prefill``: a square GEMM at the model width as the effective FLOP rate of a forward;
* ``remote->host`` (with ``--remote-url``): the shared Redis tier's batched read, latency
  from a one-value round trip, bandwidth from a pipelined batch of 256 KiB values.

Each measurement takes the median of several repetitions (robust to a noisy neighbour).
The profile is written as JSON to the user cache dir (``platformdirs.user_cache_dir
("kvstore")/cost_profile.json``) and reused unless ``--refresh``. ``--json`` prints one JSON
document on stdout; progress goes to stderr. Top-level imports stay light (torch is
imported inside the functions) so ``kvstore --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PROFILE_NAME = "cost_profile.json"


def default_profile_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvstore")) / PROFILE_NAME



def _median_time(fn: Callable[[], None], reps: int, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    fn()  # warm-up
    sync()
    samples = []
    for _ in range(reps):
        t0 = clock()
        fn()
        sync()
        samples.append(clock() - t0)
    return statistics.median(samples)


def _fit(small_bytes: int, small_s: float, big_bytes: int, big_s: float) -> tuple[float, float]:
    """(bandwidth, latency) of the line through two (size, time) points, clamped to be sane."""
    slope = (big_s - small_s) / max(big_bytes - small_bytes, 1)
    bandwidth = 1.0 / slope if slope > 0 else big_bytes / max(big_s, 1e-12)
    latency = max(0.0, small_s - small_bytes / bandwidth)
    return bandwidth, latency


def measure_disk(directory: Path | None, big: int, reps: int) -> tuple[float, float]:
    import numpy as np

    small = 4096
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "calibrate.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * max(1, big >> 20))
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(path)
        buf = np.empty(size, dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            def drop() -> None:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

            def read(n: int) -> Callable[[], None]:
                view = memoryview(buf)[:n]

                def go() -> None:
                    drop()
                    got = os.preadv(fd, [view], 0)
                    if got != n:
                        raise OSError(f"short read {got} of {n}")
                return go
            t_small = _median_time(read(small), reps * 3)
            t_big = _median_time(read(size), reps)
        finally:
            os.close(fd)
    return _fit(small, t_small, size, t_big)


def probe_device(device=None):
    """The device a measurement runs on: ``device`` when given (a store's own: a CPU store on
    a GPU host is measured on the CPU), else CUDA when present."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_sync(device) -> Callable[[], None]:
    """Wait for ``device``'s queued work, naming it (a bare ``torch.cuda.synchronize()``
    waits on the calling thread's current device, which may be another one)."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_host_to_device(big: int, reps: int, device=None) -> tuple[float, float, str]:
    """(bandwidth, latency, device kind) of host -> ``device`` copies: pinned host -> CUDA by
    DMA on a CUDA device, a host memcpy on the CPU (kind ``"cpu"``)."""
    import torch

    small = 4096
    dev = probe_device(device)
    if dev.type == "cuda":
        src = torch.empty(big, dtype=torch.uint8).pin_memory()
        dst = torch.empty(big, dtype=torch.uint8, device=dev)
        sync = device_sync(dev)
        kind = torch.cuda.get_device_name(dev)
    else:
        src = torch.empty(big, dtype=torch.uint8)
        dst = torch.empty(big, dtype=torch.uint8)
        src.fill_(1)
        sync = lambda: None  # noqa: E731
        kind = "cpu"
    from allocator.rowcopy import DEFAULT_COPIER as copier  # the data path's own copy primitive

    t_small = _median_time(lambda: copier.copy(dst[:small], src[:small]), reps * 3, sync)
    t_big = _median_time(lambda: copier.copy(dst, src), reps, sync)
    bw, lat = _fit(small, t_small, big, t_big)
    return bw, lat, kind


def measure_gemm(tokens: int, hidden: int, out: int, reps: int, rope: bool, device=None) -> tuple[float, float]:
    """(flops/s, per-call latency) of ``[tokens, hidden] @ [hidden, out]`` (+ RoPE on half)
    on ``device`` (default: CUDA when present)."""
    import torch

    dev = probe_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sync = device_sync(dev)
    w = torch.randn(out, hidden, device=dev, dtype=dtype)

    def call(t: int) -> Callable[[], None]:
        x = torch.randn(t, hidden, device=dev, dtype=dtype)
        cos = torch.randn(t, out // 2, device=dev, dtype=dtype)

        def go() -> None:
            y = torch.nn.functional.linear(x, w)
            if rope:
                k = y[:, : out // 2]
                half = k.shape[-1] // 2
                _ = k * cos + torch.cat((-k[:, half:], k[:, :half]), dim=-1) * cos
        return go
    t_small = _median_time(call(1), reps * 3, sync)
    t_big = _median_time(call(tokens), reps, sync)
    flops = 2.0 * tokens * hidden * out + (3.0 * tokens * out / 2 if rope else 0.0)
    return believable_rate(flops / max(t_big, 1e-12), dev, dtype), t_small


def peak_gemm_rate(device, dtype, n: int | None = None, reps: int = 3, inner: int | None = None) -> float:
    """FLOP/s of a square ``n x n x n`` GEMM in ``dtype``: the most this device does; no rate
    measured at a smaller shape may exceed it.

    CUDA: ``n = 8192`` and ``inner = 8`` GEMMs queued between two syncs (a 2048^3 GEMM with a
    sync after each measured launch and sync gaps as much as the math, and underestimated
    an H100 by 1.5-2x; every rate the planner believes is capped by this one). CPU: 256, one
    per sync (a CPU saturates early). O(inner * reps * n^3) FLOPs."""
    import torch

    from kvstore.restore.costmodel import MAX_FLOPS

    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 256)
    inner = inner or (8 if cuda else 1)
    sync = device_sync(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def burst() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=c)
    t = _median_time(burst, reps, sync)
    return min(2.0 * n ** 3 * inner / max(t, 1e-12), MAX_FLOPS)


def believable_rate(rate: float, device, dtype, peak: float | None = None) -> float:
    """``rate`` capped at what the device can do (``peak``, else measured now, and
    :data:`MAX_FLOPS`). Rates come from whole-call times (launch latency included), never
    from the difference of two tiny calls: on a GPU both are launch-bound and their
    difference is noise (the source of a 3.9 PFLOP/s "measurement" on an H200)."""
    from kvstore.restore.costmodel import MAX_FLOPS

    if peak is None:
        peak = peak_gemm_rate(device, dtype)
    return min(rate, peak, MAX_FLOPS)


def measure_remote(url: str, big: int, reps: int, block: int = 256 << 10) -> tuple[float, float]:
    """(bandwidth, latency) of the remote tier's read path: one batched GET round trip of a
    4 KiB value, then of ``big`` bytes in ``block``-sized values (pipelined, as the store
    reads them). Writes its own keys under ``kvs1:calibrate:`` and deletes them after."""
    from allocator.remote import RemoteBackend

    backend = RemoteBackend(url, deadline_s=30.0)
    backend.connect()
    try:
        small_key = [b"kvs1:calibrate:small"]
        keys = [b"kvs1:calibrate:%d" % i for i in range(max(1, big // block))]
        payload = os.urandom(block)
        if not all(backend.set_many(small_key + keys, [os.urandom(4096)] + [payload] * len(keys))):
            raise ConnectionError(f"could not write calibration values to {backend.address.describe()}")
        t_small = _median_time(lambda: backend.get_many(small_key), reps * 3)
        t_big = _median_time(lambda: backend.get_many(keys), reps)
        backend.delete_many(small_key + keys)
    finally:
        backend.close()
    return _fit(4096, t_small, len(keys) * block, t_big)


def measure_decode(device, reps: int, quick: bool) -> dict[str, float]:
    """Decode rate (raw bytes out per second) of every block codec that runs here, on
    ``device`` (where the store decodes: into the destination), from bf16 blocks of a
    typical shape (32 layers, 8 KV heads, head_dim 128, 16 tokens: 2 MiB raw), decoded into
    a strided view like a caller's KV. Median of ``reps``. O(codecs x batch bytes)."""
    import torch

    from allocator.codecs import codec_problem, make_codec

    shape = (8 if quick else 32, 2, 16, 8, 128)
    n = 4 if quick else 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).to(torch.bfloat16).to(device)
    sync = device_sync(device)
    rates: dict[str, float] = {}
    for name in ("lossless", "fp8", "int8", "int4"):
        if codec_problem(name):
            continue
        codec = make_codec(name, shape, torch.bfloat16)
        enc = torch.empty((n, codec.encoded_bytes), dtype=torch.uint8, device=device)
        codec.encode(x, enc)
        out = torch.empty_like(x)
        seconds = _median_time(lambda: codec.decode(enc, out), reps, sync)
        rates[name] = n * codec.raw_bytes / max(seconds, 1e-9)
    return rates


def measure(args: argparse.Namespace):
    """Run every measurement and return a ``CostProfile``."""
    from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost

    quick = bool(args.quick)
    reps = 3 if quick else 7
    big = (8 if quick else 128) << 20
    log.info("measuring disk->host")
    d_bw, d_lat = measure_disk(args.dir, big, reps)
    device = probe_device(getattr(args, "device", None))
    log.info("measuring host->device")
    h_bw, h_lat, kind = measure_host_to_device(big, reps, device)
    # The GEMMs are measured at the shapes the planner plans for: a GPU far from saturated by
    # tiny shapes would report a rate 100x off. Only a CPU (saturated early) gets smaller ones.
    import torch

    small = quick and device.type != "cuda"
    tokens = min(args.tokens, 256) if small else args.tokens
    hidden = min(args.hidden, 1024) if small else args.hidden
    kvd = min(args.kv_dim, 512) if small else args.kv_dim
    log.info("measuring recompute GEMM")
    r_rate, r_lat = measure_gemm(tokens, hidden, 2 * kvd, reps, rope=True, device=device)
    log.info("measuring prefill GEMM")
    p_rate, p_lat = measure_gemm(tokens, hidden, hidden, reps, rope=False, device=device)
    links = {"disk->host": LinkCost(d_bw, d_lat), "host->device": LinkCost(h_bw, h_lat)}
    if getattr(args, "remote_url", None):
        log.info("measuring remote->host")
        links["remote->host"] = LinkCost(*measure_remote(args.remote_url, big, reps))
    log.info("measuring codec decode rates")
    decode = measure_decode(device, reps, quick)
    return CostProfile(
        links=links,
        recompute=ComputeCost(r_rate, r_lat), prefill=ComputeCost(p_rate, p_lat), device=kind,
        shared_compute=(kind == "cpu"), meta={"measured_at": time.time(), "quick": quick, "shapes": {"tokens": tokens, "hidden": hidden,
                                                                      "kv_dim": kvd},
                                                                      "decode_Bps": decode})


def load_or_measure(path: Path, refresh: bool, args: argparse.Namespace):
    """The saved profile at ``path`` unless missing, unreadable or ``refresh``; else measure and save."""
    from kvstore.restore.costmodel import CostProfile

    if not refresh and path.exists():
        try:
            return CostProfile.from_dict(json.loads(path.read_text())), False
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable profile %s: %s", path, exc)
    profile = measure(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=2))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a profile
    return profile, True
