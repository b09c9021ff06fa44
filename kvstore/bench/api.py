"""``kvstore bench api``: what an engine calls, end to end through ``KVStore``, beside the
limit of the same link measured in the same run.

For each block size (4 MiB and 64 KiB blocks of a fixed bf16 layout: 8 layers, 8 KV heads,
head_dim 128 -- 32 KiB per token) ``total`` bytes of KV (256 MiB; 32 MiB with ``--quick``)
are stored on one source tier -- ``device`` (CUDA when present, else CPU memory), ``host``
(pinned when CUDA is present) or ``disk`` (page cache dropped before every read) -- and
moved through the public API into each output device (``cpu``; also ``cuda`` when present):

* ``put``: ``store.put(tokens, kv)`` of new blocks (``kv`` on the output device);
* ``get_out``: ``store.get(tokens, out=buf)`` into a caller's buffer (what an engine does);
* ``get_new``: ``store.get(tokens)`` returning a new tensor (pays the first touch of fresh
  memory, as does its limit: a copy into a fresh tensor);
* ``load_into_xlayer`` / ``load_into_layers``: ``store.load_into(tokens, pool, ids)`` into a
  paged pool (cross-layer ``[blocks, L, 2, bt, H, D]`` / per-layer ``[2, blocks, bt, H, D]``)
  at scattered block ids, and ``..._vs_get`` = its time over ``get_out``'s (target <= 1.1);
* ``save_from_xlayer`` / ``save_from_layers``: ``store.save_from(tokens, pool, ids)``.

Limits (same bytes, same run, interleaved with ours): CPU memory -> CPU memory: one
``copy_`` into a warm buffer (``clone()`` for ``get_new``); CUDA: one device-to-device copy
(device tier -> cuda), one pinned host -> device copy (host tier -> cuda), one pageable
device -> host copy (put of cuda KV to a CPU tier); disk: one cold sequential ``preadv``
(get), one ``pwrite`` (put). ``ratio`` = limit time / our time, so 1.0 is the link's limit;
the target is 0.8 for CPU get/put, 0.8 (device tier) and 0.85 (host tier) into CUDA.

Then the per-operation cost at 10^3 vs 10^5 stored blocks (``put``/``lookup``/``get`` of 4
small blocks; target <= 1.3x) -- the store must not slow down as it fills.

One command runs it on a GPU machine with only PyTorch and CUDA (no network, no
transformers): ``python -m kvstore bench api --json > api.json``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import random
import statistics
import sys
import tempfile
import time
from typing import Callable

from kvstore.bench.report import Report, machine_info

MiB = 1 << 20
KiB = 1 << 10


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total-mib", type=int, default=None, help="KV bytes per scenario (default 256, quick 32)")
    parser.add_argument("--tiers", default="device,host,disk", help="source tiers to measure")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median; default 5)")
    parser.add_argument("--no-ops", action="store_true", help="skip the 10^3 vs 10^5 stored blocks figures")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _pair(ours: Callable[[], object], limit: Callable[[], object], repeats: int,
          before: Callable[[], object] | None = None) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``limit``, interleaved (same noise); ``before`` runs
    untimed before each (e.g. dropping the page cache, clearing the store)."""
    t_ours, t_lim = [], []
    for i in range(repeats + 1):
        for fn, acc in ((ours, t_ours), (limit, t_lim)):
            if before is not None:
                before()
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            if i:  # the first round warms up
                acc.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_lim)


def _add(report: Report, name: str, nbytes: int, ours_s: float, limit_s: float, target: float | None) -> None:
    gib = nbytes / (1 << 30)
    report.add(name, gib / ours_s, "GiB/s", limit=gib / limit_s, target=target)


def _scenario(report: Report, workdir: Path, tier: str, block_bytes: int, total: int, out_dev, repeats: int) -> None:
    import torch

    from kvstore import KVStore, ModelLayout, StoreConfig

    layout = ModelLayout(num_layers=8, num_kv_heads=8, head_dim=128, hidden_size=1024, dtype=torch.bfloat16)
    bt = block_bytes // layout.kv_bytes_per_token
    nb = total // block_bytes
    T = nb * bt
    cuda = out_dev.type == "cuda"
    cap = 2 * nb * block_bytes + (64 << 20)
    sizes = {"device_bytes": 0, "host_bytes": 0, "disk_bytes": 0}
    sizes[f"{tier}_bytes"] = cap
    cfg = StoreConfig(layout=layout, block_tokens=bt, namespace=f"bench-{tier}", disk_path=str(workdir / tier),
                      promote_on_hit=False, **sizes)
    label = f"{tier}->{out_dev.type}@{block_bytes // KiB}KiB"
    gen = torch.Generator().manual_seed(block_bytes)
    kv = torch.randn(layout.kv_shape(T), generator=gen).to(layout.dtype).to(out_dev)
    tokens = list(range(T))
    flat = kv.reshape(-1).view(torch.uint8)
    warm = torch.empty_like(flat)
    with KVStore(cfg) as store:
        disk_arena = store.tier_arenas()[0][1] if tier == "disk" else None
        drop = (lambda: disk_arena.drop_page_cache()) if disk_arena is not None else None
        raw_fd, raw_buf = None, None
        if tier == "disk":
            raw_path = workdir / "raw.bin"
            raw_fd = os.open(raw_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            host = flat.cpu()
            os.pwrite(raw_fd, memoryview(host.numpy()), 0)
            os.fsync(raw_fd)
            raw_buf = torch.empty_like(host)

            def cold_read() -> None:
                os.posix_fadvise(raw_fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.preadv(raw_fd, [memoryview(raw_buf.numpy())], 0)
                if cuda:
                    warm.copy_(raw_buf)

            def raw_write() -> None:
                os.pwrite(raw_fd, memoryview(flat.cpu().numpy()), 0)
        tier_dev = store.tier_arenas()[0][1].device if tier != "disk" else torch.device("cpu")
        # the link's limit for a move between the tier's memory and out_dev
        if tier == "disk":
            get_limit, put_limit = cold_read, raw_write
        elif tier_dev.type == "cpu" and not cuda:
            get_limit = put_limit = (lambda: warm.copy_(flat))
        else:
            src_side = torch.empty(flat.shape, dtype=torch.uint8, device=tier_dev,
                                   pin_memory=tier_dev.type == "cpu")
            src_side.copy_(flat)
            get_limit = lambda: warm.copy_(src_side, non_blocking=True)  # noqa: E731 -- tier -> out_dev
            put_limit = lambda: src_side.copy_(flat, non_blocking=True)  # noqa: E731 -- out_dev -> tier
        # put (new blocks each time: the store is cleared, untimed, before each)
        ours, lim = _pair(lambda: store.put(tokens, kv), put_limit, repeats, before=store.clear)
        _add(report, f"put/{label}", total, ours, lim, 0.8 if tier != "disk" else None)
        store.put(tokens, kv)
        assert store.lookup(tokens) == T
        out = torch.empty_like(kv)
        t_get, lim = _pair(lambda: store.get(tokens, out=out), get_limit, repeats, before=drop)
        target = None if tier == "disk" else (0.8 if not cuda or tier == "device" else 0.85)
        _add(report, f"get_out/{label}", total, t_get, lim, target)
        if not torch.equal(out, kv):
            raise AssertionError(f"{label}: get returned other bytes")
        if tier != "disk" and not cuda:
            ours, lim = _pair(lambda: store.get(tokens), lambda: flat.clone(), repeats, before=drop)
            _add(report, f"get_new/{label}", total, ours, lim, 0.8)
        # paged pools: twice the blocks, scattered ids
        ids = random.Random(block_bytes).sample(range(2 * nb), nb)
        xpool = torch.zeros((2 * nb, *store._block_shape), dtype=layout.dtype, device=out_dev)
        lpool = [torch.zeros((2, 2 * nb, bt, layout.num_kv_heads, layout.head_dim), dtype=layout.dtype,
                             device=out_dev) for _ in range(layout.num_layers)]
        idx = torch.as_tensor(ids, device=out_dev)
        for name, pool in (("xlayer", xpool), ("layers", lpool)):
            t_load, lim = _pair(lambda: store.load_into(tokens, pool, ids), get_limit, repeats, before=drop)
            _add(report, f"load_into_{name}/{label}", total, t_load, lim, None)
            report.add(f"load_into_{name}_vs_get/{label}", t_load / t_get, "x", target=1.1, better="lower",
                       ratio=t_load / t_get)
            if name == "xlayer":
                got = pool.index_select(0, idx)
            else:
                got = torch.stack([p.index_select(1, idx) for p in pool])  # [L, 2, nb, bt, H, D]
                got = got.permute(2, 0, 1, 3, 4, 5)
            want = kv.view(layout.num_layers, 2, nb, bt, layout.num_kv_heads, layout.head_dim).permute(2, 0, 1, 3, 4, 5)
            if not torch.equal(got, want):
                raise AssertionError(f"{label}: load_into({name}) put other bytes in the pool")
            ours, lim = _pair(lambda: store.save_from(tokens, pool, ids), put_limit, repeats, before=store.clear)
            _add(report, f"save_from_{name}/{label}", total, ours, lim, None)
            store.put(tokens, kv)
        if raw_fd is not None:
            os.close(raw_fd)
            os.unlink(workdir / "raw.bin")


def run(args: argparse.Namespace) -> Report:
    import torch

    quick = getattr(args, "quick", False)
    total = (getattr(args, "total_mib", None) or (32 if quick else 256)) * MiB
    repeats = getattr(args, "repeats", None) or (2 if quick else 5)
    tiers = [t for t in getattr(args, "tiers", "device,host,disk").split(",") if t]
    report = Report("api", machine_info())
    outs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report.machine.update(total_bytes=total, threads=torch.get_num_threads())
    base = getattr(args, "dir", None)
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-api-", dir=base) as d:
        for block_bytes in (4 * MiB, 64 * KiB):
            for tier in tiers:
                for dev in outs:
                    _log(f"api: {tier} -> {dev.type}, {block_bytes // KiB} KiB blocks")
                    sub = Path(d) / f"{tier}-{block_bytes}"
                    sub.mkdir()
                    _scenario(report, sub, tier, block_bytes, total, dev, repeats)
    if not getattr(args, "no_ops", False):
        from kvstore.bench.tiers import _ops

        _ops(report, [1000, 10000] if quick else [1000, 100000], ops=200 if quick else 1000)
    return report
