"""``kvstore bench restore``: transfer vs recompute vs the planner's mix, beside the machine limits.

For an MHA and a GQA layout (random-weight Llama models built from configs, bf16 -- the
dtype this kind of CPU multiplies fastest; fp16 GEMMs on CPU are ~8x slower) a prefix of
``tokens`` tokens (8192; 2048 with ``--quick``) is stored with both forms (KV and
activations, ``activations = "beside"``) on one tier -- all on disk (cold page cache: the
slabs' pages are dropped before every run) or all on host -- and restored three ways by the
store's executor:

* ``transfer``: every block's KV read and copied into the ``[L, 2, T, H, D]`` output;
* ``recompute``: every block's activations read, K/V recomputed (one GEMM per layer per run);
* ``plan``: the planner's per-block mix (``plan_restore(..., allow_prefill=False)``).

The cost profile is measured in the same run from the machine limits below (memcpy
bandwidth, cold-read bandwidth, bare GEMM rate at the recompute shape), then refined online
by one warm-up restore of each pure strategy and two plan-restore-replan rounds (the
executor feeds observed chunk times into the ``CostModel``, contention included), and only
then is the measured plan made. Each figure is the
median of ``repeats`` runs, strategies interleaved so all see the same machine noise.

Limits (same bytes, same run): ``transfer`` vs a raw cold ``preadv`` of the KV bytes (disk)
or one ``copy_`` of them (host); ``recompute`` vs the bare GEMMs of the same shape plus (on
disk) nothing else -- the read overlaps; ``plan`` vs the better pure strategy measured
(target <= 1.05), and vs transfer where the model predicts a gain (target <= 1.0).
``plan_prediction_error`` = |predicted - measured| / measured (target <= 0.15).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time

from kvstore.bench.report import Report, machine_info, median_time

MiB = 1 << 20


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model(layers: int, hidden: int, heads: int, kv_heads: int, dtype):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   intermediate_size=64, max_position_embeddings=1 << 16)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().to(dtype)


def _limits(workdir: Path, kv, layout, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds for the raw work: memcpy of the KV bytes, a cold read of them, the bare GEMMs."""
    import torch

    flat = kv.reshape(-1).view(torch.uint8)
    dst = torch.empty_like(flat)
    t_copy = median_time(lambda: dst.copy_(flat), repeats)
    path = workdir / "raw.bin"
    with open(path, "wb") as f:
        f.write(flat.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    buf = dst.numpy()

    def cold_read() -> None:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.preadv(fd, [memoryview(buf)], 0)
    try:
        t_read = median_time(cold_read, repeats)
    finally:
        os.close(fd)
        path.unlink()
    kvd = layout.num_kv_heads * layout.head_dim
    x = torch.randn(tokens, layout.hidden_size).to(layout.dtype)
    w = torch.randn(2 * kvd, layout.hidden_size).to(layout.dtype)
    torch.nn.functional.linear(x, w)

    def gemms() -> None:
        for _ in range(layout.num_layers):
            torch.nn.functional.linear(x, w)
    t_gemm = median_time(gemms, repeats)
    return {"memcpy_s": t_copy, "cold_read_s": t_read, "gemm_s": t_gemm}


def _scenario(report: Report, workdir: Path, name: str, dims: dict, tier: str, tokens: int, bt: int,
              repeats: int) -> None:
    import torch

    from allocator.disk import slab_file_bytes
    from kvstore import KVStore, StoreConfig
    from kvstore.restore.costmodel import ComputeCost, CostModel, CostProfile, LinkCost, recompute_flops
    from kvstore.restore.executor import Executor, Source
    from kvstore.models import HFAdapter
    from kvstore.restore.planner import BlockForms, Step, plan_restore, simulate

    adapter = HFAdapter(_model(**dims))
    lay = adapter.layout
    nb = tokens // bt
    g = torch.Generator().manual_seed(1)
    act = torch.randn(lay.act_shape(tokens), generator=g).to(lay.dtype)
    kv = adapter.recompute_kv(act)  # the stored KV is what the model computes from these activations
    kvb, actb = lay.kv_block_bytes(bt), lay.act_block_bytes(bt)
    lim = _limits(workdir, kv, lay, tokens, repeats)
    kv_bytes, act_bytes = kv.numel() * kv.element_size(), act.numel() * act.element_size()
    flops = recompute_flops(lay, tokens)
    profile = CostProfile(links={"disk->host": LinkCost(kv_bytes / lim["cold_read_s"]),
                                 "host->device": LinkCost(kv_bytes / lim["memcpy_s"])},
                          recompute=ComputeCost(flops / lim["gemm_s"]), prefill=ComputeCost(flops / lim["gemm_s"]),
                          device="cpu", shared_compute=True, meta={"source": "bench limits"})
    cm = CostModel(profile, alpha=0.3)
    if tier == "disk":
        need_kv, need_act = slab_file_bytes(nb, kvb), slab_file_bytes(nb, actb)
        sizes = dict(device_bytes=0, host_bytes=0)
    else:
        need_kv, need_act = nb * kvb, nb * actb
        sizes = dict(device_bytes=0, disk_bytes=0)
    total = int((need_kv + need_act) * 1.02)
    share = need_act * 1.01 / total
    sizes[f"{tier}_bytes"] = total
    cfg = StoreConfig(layout=lay, block_tokens=bt, **sizes, disk_path=str(workdir / name) if tier == "disk" else None,
                      act_share=share, activations="beside", promote_on_hit=False, namespace=name)
    label = f"{name}/{tier}"
    with KVStore(cfg, adapter=adapter, cost_model=cm) as store:
        assert store.put(list(range(tokens)), kv, activations=act) == tokens
        keys = store._keys(list(range(tokens)))[1]
        kv_src, act_src = [], []
        for k in keys:
            e, a = store._tiers.index[k], store._acts.index[k]
            kv_src.append(Source(tier, store._tiers.tiers[e.tier].arena, e.slot))
            act_src.append(Source(tier, store._acts.tiers[a.tier].arena, a.slot))
        assert all(s.tier == tier for s in kv_src)
        slabs = [m.tiers[-1].arena for m in (store._tiers, store._acts)]
        ex = Executor(lay, bt, cost_model=cm)
        out = torch.empty(lay.kv_shape(tokens), dtype=lay.dtype)

        def run(steps) -> float:
            if tier == "disk":
                for slab in slabs:
                    slab.drop_page_cache()
            t0 = time.perf_counter()
            ex.run(steps, kv_src, act_src, out, adapter)
            return time.perf_counter() - t0

        pure = {"transfer": [Step(i, "kv", tier) for i in range(nb)],
                "recompute": [Step(i, "recompute", tier) for i in range(nb)]}
        for strat, steps in pure.items():  # warm-up: also refines the cost model online
            run(steps)
            ok = torch.equal(out, kv) if strat == "transfer" else _rel(out, kv) < 1e-2
            if not ok:
                raise AssertionError(f"{label}: {strat} restored wrong KV")
        forms = [BlockForms(kv=tier, act=tier)] * nb
        # Online loop as a store runs it: plan, restore (observations refine the model,
        # including the contention of a mixed restore), plan again.
        for _ in range(2):
            plan = plan_restore(forms, lay, bt, cm.profile, allow_prefill=False)
            run(list(plan.steps))
            if _rel(out, kv) >= 1e-2:
                raise AssertionError(f"{label}: plan restored wrong KV")
        t0 = time.perf_counter()
        plan = plan_restore(forms, lay, bt, cm.profile, allow_prefill=False)
        plan_time = time.perf_counter() - t0
        prof = cm.profile  # the snapshot the plan was made with
        pred = {s: simulate(forms, [st.action for st in steps], lay, bt, prof)[0] for s, steps in pure.items()}
        times: dict[str, list[float]] = {"transfer": [], "recompute": [], "plan": []}
        order = list(times)
        for r in range(repeats):  # rotate the order: no strategy always runs after the GEMM-heavy one
            for strat in order[r % 3:] + order[:r % 3]:
                times[strat].append(run(list(plan.steps) if strat == "plan" else pure[strat]))
        med = {s: statistics.median(v) for s, v in times.items()}
    read_limit = lim["cold_read_s"] if tier == "disk" else lim["memcpy_s"]
    best_pure = min(med["transfer"], med["recompute"])
    report.add(f"{label}/transfer_s", med["transfer"], "s", limit=read_limit, better="lower")
    report.add(f"{label}/transfer_predicted_s", pred["transfer"], "s", better="lower")
    report.add(f"{label}/recompute_s", med["recompute"], "s", limit=lim["gemm_s"], better="lower")
    report.add(f"{label}/recompute_predicted_s", pred["recompute"], "s", better="lower")
    report.add(f"{label}/plan_s", med["plan"], "s", limit=best_pure, target=1.05, better="lower")
    report.add(f"{label}/plan_predicted_s", plan.predicted_s, "s", better="lower")
    report.add(f"{label}/plan_lower_bound_s", plan.lower_bound_s, "s", better="lower")
    err = abs(plan.predicted_s - med["plan"]) / med["plan"]
    report.add(f"{label}/plan_prediction_error", err, "fraction", target=0.15, better="lower", ratio=err)
    report.add(f"{label}/plan_recompute_blocks", plan.count("recompute"), f"of {nb} blocks", better="higher")
    gain_predicted = plan.predicted_s < pred["transfer"] * 0.99
    report.add(f"{label}/plan_vs_transfer", med["plan"] / med["transfer"], "x",
               target=1.0 if gain_predicted else None, better="lower", ratio=med["plan"] / med["transfer"])
    report.add(f"{label}/plan_planning_s", plan_time, "s", better="lower")
    report.machine.setdefault("scenarios", {})[label] = {
        "layout": lay.to_dict(), "tokens": tokens, "block_tokens": bt, "kv_bytes": kv_bytes,
        "act_bytes": act_bytes, "limits_s": lim, "profile_after_warmup": prof.to_dict(),
        "cost_model_observations": cm.observations, "plan_exact": plan.exact}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(args: argparse.Namespace) -> Report:
    import torch

    quick = getattr(args, "quick", False)
    report = Report("restore", machine_info())
    tokens = 2048 if quick else 8192
    bt = 64 if quick else 128
    layers = 4 if quick else 8
    layouts = {
        "mha": dict(layers=layers, hidden=512, heads=8, kv_heads=8, dtype=torch.bfloat16),
        "gqa": dict(layers=layers, hidden=1024, heads=16, kv_heads=2, dtype=torch.bfloat16),
    }
    repeats = 3 if quick else 5
    report.machine.update(tokens=tokens, block_tokens=bt, repeats=repeats, torch_threads=torch.get_num_threads())
    base = getattr(args, "dir", None)
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-restore-", dir=base) as d:
        for name, dims in layouts.items():
            for tier in ("disk", "host"):
                _log(f"restore bench: {name} on {tier} ({tokens} tokens)")
                _scenario(report, Path(d), name, dims, tier, tokens, bt, repeats)
    return report
