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

Restore (``restore_{mha,gqa}``): ``store.load`` of a prefix kept as KV and activations on
the host tier (64 MiB of KV on a CPU, 8192 tokens on a GPU), recomputed by a K/V-projection
adapter (no model library), beside the raw copy of all its KV, the bare GEMMs, and the best
transfer/recompute split computed from those (target <= 1.15x; MHA on CUDA <= 0.6x the raw
KV copy); also the plan's prediction error (target <= 0.2) and how many blocks it recomputed.

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
    parser.add_argument("--no-restore", action="store_true", help="skip the restore (load) figures")


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
    from kvstore.layout import as_block_rows

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
        disk_arena = store.port.tier_arenas()[0][1] if tier == "disk" else None
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
        tier_dev = store.port.tier_arenas()[0][1].device if tier != "disk" else torch.device("cpu")
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
                got = as_block_rows(got.flatten(2, 3), bt, nb)
            want = as_block_rows(kv, bt, nb)
            if not torch.equal(got, want):
                raise AssertionError(f"{label}: load_into({name}) put other bytes in the pool")
            ours, lim = _pair(lambda: store.save_from(tokens, pool, ids), put_limit, repeats, before=store.clear)
            _add(report, f"save_from_{name}/{label}", total, ours, lim, None)
            store.put(tokens, kv)
        if raw_fd is not None:
            os.close(raw_fd)
            os.unlink(workdir / "raw.bin")


class _Projection:
    """A recompute adapter with only the K/V GEMMs (``K, V = X W_k, X W_v`` per layer): what a
    restore computes, with no model library. Satisfies ``kvstore.restore.executor.Recomputer``."""

    def __init__(self, layout, device) -> None:
        import torch

        self.layout, self.device = layout, device
        kvd = layout.num_kv_heads * layout.head_dim
        g = torch.Generator().manual_seed(0)
        self.w = (torch.randn(layout.num_layers, 2 * kvd, layout.hidden_size, generator=g)
                  * layout.hidden_size ** -0.5).to(layout.dtype).to(device)

    def recompute_kv(self, act, start_pos: int = 0, layers=None, out=None):
        import torch

        lay = self.layout
        a, b = layers if layers is not None else (0, lay.num_layers)
        offset = 0 if act.shape[0] == lay.num_layers else a
        T = act.shape[1]
        if out is None:
            out = torch.empty((b - a, 2, T, lay.num_kv_heads, lay.head_dim), dtype=lay.dtype, device=self.device)
        for layer in range(a, b):
            y = torch.nn.functional.linear(act[layer - offset].to(self.device), self.w[layer])
            out[layer - a].copy_(y.view(T, 2, lay.num_kv_heads, lay.head_dim).transpose(0, 1))
        return out


def _restore(report: Report, workdir: Path, name: str, kv_heads: int, tokens: int, out_dev, repeats: int) -> None:
    """``store.load`` of a prefix kept as KV and activations on the host tier, into ``out_dev``,
    beside: the raw copy of all its KV, the bare GEMMs of recomputing all of it, and the best
    transfer/recompute split computed from those (on CUDA copies and GEMMs overlap: the best
    fraction ``f`` recomputed solves ``(1 - f) t_kv + f t_act = f t_gemm``; on a CPU they share
    the cores, so the best is the cheaper pure strategy)."""
    import torch

    from kvstore import KVStore, ModelLayout, StoreConfig
    from kvstore.restore.costmodel import ComputeCost, CostModel, CostProfile, LinkCost, recompute_flops

    lay = ModelLayout(num_layers=8, num_kv_heads=kv_heads, head_dim=128, hidden_size=1024, dtype=torch.bfloat16)
    bt = 64
    cuda = out_dev.type == "cuda"
    proj = _Projection(lay, out_dev)
    g = torch.Generator().manual_seed(1)
    act = torch.randn(lay.act_shape(tokens), generator=g).to(lay.dtype)
    kv = proj.recompute_kv(act.to(out_dev))
    kv_bytes, act_bytes = kv.numel() * kv.element_size(), act.numel() * act.element_size()
    # limits, same run
    host_kv = torch.ones(kv_bytes, dtype=torch.uint8).pin_memory() if cuda else torch.ones(kv_bytes, dtype=torch.uint8)
    host_act = torch.ones(act_bytes, dtype=torch.uint8).pin_memory() if cuda else torch.ones(act_bytes, dtype=torch.uint8)
    dst_kv = torch.empty(kv_bytes, dtype=torch.uint8, device=out_dev)
    dst_act = torch.empty(act_bytes, dtype=torch.uint8, device=out_dev)
    x = act.to(out_dev)
    kv_scratch = torch.empty_like(kv)

    def kv_copy() -> None:
        dst_kv.copy_(host_kv, non_blocking=True)
    t_act, t_gemm = _pair(lambda: dst_act.copy_(host_act, non_blocking=True),
                          lambda: proj.recompute_kv(x, out=kv_scratch), repeats)
    t_kv = _pair(kv_copy, kv_copy, repeats)[0]
    if cuda:
        f = t_kv / max(t_kv - t_act + t_gemm, 1e-12)
        best = min(t_kv, f * t_gemm)
    else:
        best = min(t_kv, t_act + t_gemm)
    flops = recompute_flops(lay, tokens)
    profile = CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(kv_bytes / t_kv)},
                          recompute=ComputeCost(flops / t_gemm), prefill=ComputeCost(flops / t_gemm),
                          device=str(out_dev), shared_compute=not cuda, meta={"source": "bench api limits"})
    nb = tokens // bt
    need = nb * (lay.kv_block_bytes(bt) + lay.act_block_bytes(bt))
    cfg = StoreConfig(layout=lay, block_tokens=bt, device_bytes=0, host_bytes=int(need * 1.05), disk_bytes=0,
                      act_share=nb * lay.act_block_bytes(bt) * 1.02 / (need * 1.05), activations="beside",
                      promote_on_hit=False, namespace=f"restore-{name}")
    label = f"restore_{name}/host->{out_dev.type}"
    ids = list(range(tokens))
    with KVStore(cfg, adapter=proj, cost_model=CostModel(profile, alpha=0.3)) as store:
        assert store.put(ids, kv.cpu(), activations=act) == tokens
        buf = torch.empty_like(kv)  # the engine's buffer for the prompt; load fills its restored prefix
        store.load(ids, out=buf)  # warm-up; refines the cost model online
        t_load, t_kv = _pair(lambda: store.load(ids, out=buf), kv_copy, repeats)  # interleaved
        if cuda:
            f = t_kv / max(t_kv - t_act + t_gemm, 1e-12)
            best = min(t_kv, f * t_gemm)
        else:
            best = min(t_kv, t_act + t_gemm)
        res = store.load(ids, out=buf)
        out, plan = res.kv, res.plan
    m = res.tokens_restored  # the planner may leave a suffix to the engine's prefill
    err = ((out[:, :, :m].double() - kv[:, :, :m].double()).norm() / kv[:, :, :m].double().norm()).item() if m else 0.0
    if err > 2e-2:
        raise AssertionError(f"{label}: restored KV off by {err:.3g} (relative)")
    report.add(f"{label}/tokens_restored", m, f"of {tokens} tokens")
    report.add(f"{label}/load_vs_best_split", t_load / best, "x", target=1.15, better="lower", ratio=t_load / best)
    report.add(f"{label}/load_vs_raw_kv_copy", t_load / t_kv, "x", better="lower", ratio=t_load / t_kv,
               target=0.6 if cuda and kv_heads * 128 == lay.hidden_size else None)
    report.add(f"{label}/load_s", t_load, "s", limit=best, better="lower")
    report.add(f"{label}/recompute_blocks", plan.count("recompute") if plan else 0, f"of {nb} blocks")
    if plan is not None:
        e = abs(plan.predicted_s - t_load) / t_load
        report.add(f"{label}/prediction_error", e, "fraction", target=0.2, better="lower", ratio=e)
    report.machine.setdefault("restore", {})[label] = {
        "tokens": tokens, "kv_bytes": kv_bytes, "act_bytes": act_bytes, "best_split_s": best,
        "limits_s": {"kv_copy": t_kv, "act_copy": t_act, "gemm": t_gemm}}


def _ops(report: Report, sizes: list[int], ops: int, rounds: int) -> None:
    """Per-block cost of put/lookup/get(out) of 4-block prompts at ``sizes`` stored blocks.
    Both stores exist at once and their rounds alternate, so machine noise hits both alike;
    the figure is the median round's per-block time, and the ratio large/small (<= 1.3)."""
    import torch

    from kvstore import KVStore, ModelLayout, StoreConfig

    layout = ModelLayout(num_layers=2, num_kv_heads=1, head_dim=32, hidden_size=64, dtype=torch.float16)
    bt, per = 16, 4
    block = layout.kv_block_bytes(bt)
    kv = torch.randn(layout.kv_shape(bt * per)).half()
    out = torch.empty_like(kv)
    stores = {}
    for stored in sizes:
        cfg = StoreConfig(layout=layout, block_tokens=bt, device_bytes=0,
                          host_bytes=(stored + rounds * ops * per + 256) * block, namespace=f"ops{stored}")
        store = KVStore(cfg)
        fill = torch.randn(layout.kv_shape(bt * 100)).half()
        for i in range(stored // 100):
            store.put(list(range(i * 10**6, i * 10**6 + bt * 100)), fill)
        stores[stored] = store
    times: dict[str, dict[int, list[float]]] = {op: {n: [] for n in sizes} for op in ("put", "lookup", "get")}
    try:
        for r in range(rounds):
            for stored, store in (stores.items() if r % 2 == 0 else reversed(stores.items())):
                base = 10**9 + r * ops * 1000
                prompts = [list(range(base + i * 1000, base + i * 1000 + bt * per)) for i in range(ops)]
                for op, fn in (("put", lambda p: store.put(p, kv)), ("lookup", store.lookup),
                               ("get", lambda p: store.get(p, out=out))):
                    t0 = time.perf_counter()
                    for p in prompts:
                        fn(p)
                    times[op][stored].append((time.perf_counter() - t0) / (ops * per))
    finally:
        for store in stores.values():
            store.close()
    small, large = sizes
    for op, by_size in times.items():
        med = {n: statistics.median(v) for n, v in by_size.items()}
        for n, t in med.items():
            report.add(f"{op}_blocks_per_s@{n}_stored", 1 / t, "blocks/s")
        report.add(f"{op}_cost_{large}_vs_{small}_stored", med[large] / med[small], "x", target=1.3,
                   better="lower", ratio=med[large] / med[small])


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
    if not getattr(args, "no_restore", False):
        for dev in outs:
            for name, kv_heads in (("mha", 8), ("gqa", 2)):
                # 64 MiB of KV on a CPU (bigger than a last-level cache: the limit copy must not
                # run from cache), 256 MiB on a GPU
                tokens = (8192 if dev.type == "cuda" else 2048 * 8 // kv_heads) // (4 if quick else 1)
                _log(f"api: restore {name} -> {dev.type}, {tokens} tokens")
                _restore(report, Path(base or tempfile.gettempdir()), name, kv_heads, tokens, dev, repeats)
    if not getattr(args, "no_ops", False):
        _ops(report, [1000, 10000] if quick else [1000, 100000], ops=100 if quick else 500, rounds=5)
    return report
