"""``kvstore bench tiers``: tier-to-tier block moves beside the raw machine limits, and the
store's per-operation cost at 10^3 vs 10^5 stored blocks.

Moves: ``total`` bytes of blocks (default 256 MiB) go device -> host -> disk and back
(disk reads cold: the page cache is dropped first) through :func:`allocator.transfer`, the
batched path the tier manager uses. Source slots are a random permutation (victims are
scattered), destinations are fresh (consecutive) slots, as in a demotion. Limits measured
in the same run on the same bytes: one large tensor copy (``dst.copy_(src)``; with CUDA, one
pinned device<->host copy for the device tier's moves), one
sequential ``pwrite`` + ``fdatasync`` of a plain file, one cold sequential ``preadv`` of it.
Each figure is the median of ``repeats`` runs, ours and the limit interleaved so both see
the same machine noise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import random
import statistics
import tempfile
import time

from kvstore.bench.report import Report, machine_info, median_time

MiB = 1 << 20
KiB = 1 << 10


def _moves(report: Report, workdir: Path, total: int, block_sizes: list[int], repeats: int) -> None:
    import numpy as np
    import torch

    from allocator import DiskArena, MemoryArena, transfer

    gib = total / (1 << 30)
    raw_src = torch.randint(0, 256, (total,), dtype=torch.uint8)
    raw_dst = torch.empty_like(raw_src)
    raw_path = workdir / "raw.bin"
    fd = os.open(raw_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, total)
    raw_np, raw_out = raw_src.numpy(), raw_dst.numpy()

    def raw_copy() -> None:
        raw_dst.copy_(raw_src)

    def raw_write() -> None:
        os.pwrite(fd, memoryview(raw_np), 0)
        os.fdatasync(fd)

    def raw_cold_read() -> None:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.preadv(fd, [memoryview(raw_out)], 0)

    for bs in block_sizes:
        n = total // bs
        rng = random.Random(bs)
        device = MemoryArena(n, bs)  # the device tier: CUDA when present, else CPU memory
        host = MemoryArena(n, bs, device="cpu", pin=True)
        disk = DiskArena(workdir / f"slab-{bs}", n, bs, fsync="never")
        device.data.copy_(torch.randint(0, 256, (n, bs), dtype=torch.uint8))
        reference = device.data.clone()
        fresh = list(range(n))
        scattered = fresh[:]
        rng.shuffle(scattered)
        label = f"{bs // KiB}KiB"

        def d2h() -> None:
            transfer(device, scattered, host, fresh)

        def h2disk() -> None:
            transfer(host, fresh, disk, scattered)
            disk.sync()

        def disk2h() -> None:
            disk.drop_page_cache()
            transfer(disk, scattered, host, fresh)

        def h2d() -> None:
            transfer(host, fresh, device, scattered)

        d2h_limit = h2d_limit = raw_copy
        if device.device.type == "cuda":  # the PCIe link: one pinned copy each way, not a CPU memcpy
            pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            on_dev = torch.empty(total, dtype=torch.uint8, device=device.device)

            def d2h_limit() -> None:
                pinned.copy_(on_dev)

            def h2d_limit() -> None:
                on_dev.copy_(pinned)
                torch.cuda.synchronize()
        pairs = [("device_to_host", d2h, d2h_limit), ("host_to_disk", h2disk, raw_write),
                 ("disk_to_host_cold", disk2h, raw_cold_read), ("host_to_device", h2d, h2d_limit)]
        for name, ours, limit in pairs:
            ours()  # warm-up (first touch of fresh pages)
            limit()
            t_ours, t_limit = [], []
            for _ in range(repeats):
                t_ours.append(median_time(ours, 1))
                t_limit.append(median_time(limit, 1))
            target = 0.9 if bs >= 256 * KiB else None
            report.add(f"{name}@{label}", gib / statistics.median(t_ours), "GiB/s",
                       limit=gib / statistics.median(t_limit), target=target)
        if not torch.equal(device.data.cpu(), reference.cpu()):
            raise AssertionError(f"round trip device->host->disk->host->device changed bytes at {label}")
        disk.close()
        os.unlink(disk.path)
        del device, host
    os.close(fd)
    os.unlink(raw_path)
    del np


def _ops(report: Report, sizes: list[int], ops: int) -> None:
    import torch

    from kvstore import KVStore, ModelLayout, StoreConfig

    layout = ModelLayout(num_layers=2, num_kv_heads=1, head_dim=32, hidden_size=64, dtype=torch.float16)
    bt, per_prompt = 16, 4
    block = layout.kv_block_bytes(bt)
    kv = torch.randn(layout.kv_shape(bt * per_prompt)).half()
    per_op: dict[str, dict[int, float]] = {"put": {}, "lookup": {}, "get": {}}
    for stored in sizes:
        cfg = StoreConfig(layout=layout, block_tokens=bt, device_bytes=0,
                          host_bytes=(stored + 2 * ops * per_prompt + 64) * block)
        with KVStore(cfg) as store:
            fill = torch.randn(layout.kv_shape(bt * 100)).half()
            for i in range(stored // 100):
                store.put(list(range(i * 10**6, i * 10**6 + bt * 100)), fill)
            assert store.stats()["blocks"] >= stored - 100
            prompts = [list(range(10**9 + i * 1000, 10**9 + i * 1000 + bt * per_prompt)) for i in range(ops)]
            t0 = time.perf_counter()
            for p in prompts:
                store.put(p, kv)
            per_op["put"][stored] = (time.perf_counter() - t0) / (ops * per_prompt)
            t0 = time.perf_counter()
            for p in prompts:
                store.lookup(p)
            per_op["lookup"][stored] = (time.perf_counter() - t0) / (ops * per_prompt)
            t0 = time.perf_counter()
            for p in prompts:
                store.get(p)
            per_op["get"][stored] = (time.perf_counter() - t0) / (ops * per_prompt)
    small, large = sizes
    for op, by_size in per_op.items():
        for stored, t in by_size.items():
            report.add(f"{op}_blocks_per_s@{stored}_stored", 1 / t, "blocks/s")
        report.add(f"{op}_cost_{large}_vs_{small}_stored", by_size[large] / by_size[small], "x",
                   target=1.3, better="lower", ratio=by_size[large] / by_size[small])


def run(args: argparse.Namespace) -> Report:
    quick = getattr(args, "quick", False)
    report = Report("tiers", machine_info())
    total = (32 if quick else 256) * MiB
    block_sizes = [64 * KiB, 1 * MiB] if quick else [16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
    report.machine.update(total_bytes=total, block_sizes=block_sizes)
    base = getattr(args, "dir", None)
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-", dir=base) as d:
        _moves(report, Path(d), total, block_sizes, repeats=1 if quick else 3)
    _ops(report, [1000, 10000] if quick else [1000, 100000], ops=200 if quick else 1000)
    return report
