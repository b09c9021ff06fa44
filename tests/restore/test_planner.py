"""Planner: optimal against brute force over every assignment, valid schedules, KVPR and GQA cases."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost
from kvstore.layout import ModelLayout
from kvstore.restore.planner import BlockForms, Plan, plan_restore, simulate

TIERS = ("device", "host", "disk")
MHA = ModelLayout(num_layers=4, num_kv_heads=8, head_dim=64, hidden_size=512, dtype=torch.float16)
GQA = ModelLayout(num_layers=4, num_kv_heads=2, head_dim=64, hidden_size=1024, dtype=torch.float16)


def _random_profile(rng: random.Random, direct: bool, shared: bool = False) -> CostProfile:
    def lu(lo: float, hi: float) -> float:
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    links = {"disk->host": LinkCost(lu(5e7, 5e9), lu(1e-7, 1e-4)),
             "host->device": LinkCost(lu(5e7, 5e9), lu(1e-7, 1e-5))}
    if direct:
        links["disk->device"] = LinkCost(lu(5e7, 5e9), lu(1e-7, 1e-4))
    return CostProfile(links=links, recompute=ComputeCost(lu(1e9, 1e13), lu(1e-7, 1e-5) if rng.random() < .5 else 0.0),
                       prefill=ComputeCost(lu(1e9, 1e13), lu(1e-6, 1e-3)), shared_compute=shared)


def _random_blocks(rng: random.Random, n: int) -> list[BlockForms]:
    out = []
    for _ in range(n):
        kind = rng.random()
        kv = rng.choice(TIERS) if kind < 0.8 else None
        act = rng.choice(TIERS) if kind > 0.4 or kv is None else None
        out.append(BlockForms(kv=kv, act=act))
    return out


def _all_assignments(blocks: list[BlockForms]):
    n = len(blocks)
    for m in range(n + 1):
        options = [[a for a, t in (("kv", b.kv), ("recompute", b.act)) if t is not None] for b in blocks[:m]]
        for combo in itertools.product(*options):
            yield list(combo) + ["prefill"] * (n - m)


def _check_schedule(plan: Plan, blocks: list[BlockForms], profile: CostProfile) -> None:
    """The schedule is feasible: one op at a time per resource, chains in order, prefill last."""
    eps = 1e-12
    by_res: dict[str, list] = {}
    for op in plan.schedule:
        assert op.end_s > op.start_s - eps
        by_res.setdefault(op.resource, []).append(op)
    for ops in by_res.values():
        ops.sort(key=lambda o: o.start_s)
        for a, b in zip(ops, ops[1:]):
            assert b.start_s >= a.end_s - eps, (a, b)
    direct = profile.link("disk->device") is not None
    for step in plan.steps:
        ops = sorted((o for o in plan.schedule if o.block == step.block and o.payload != "prefill"),
                     key=lambda o: o.start_s)
        if step.action == "prefill":
            assert not ops
            continue
        route = {"device": [], "host": ["host->device"],
                 "disk": ["disk->device"] if direct else ["disk->host", "host->device"]}[step.tier]
        expect = route + (["compute"] if step.action == "recompute" else [])
        assert [o.resource for o in ops] == expect, (step, ops)
        for a, b in zip(ops, ops[1:]):
            assert b.start_s >= a.end_s - eps
    restore_end = max((o.end_s for o in plan.schedule if o.payload != "prefill"), default=0.0)
    assert restore_end == pytest.approx(plan.restore_s, rel=1e-12, abs=1e-15)
    for o in plan.schedule:
        if o.payload == "prefill":
            assert o.start_s >= restore_end - eps
            assert o.end_s == pytest.approx(plan.predicted_s, rel=1e-12)


@pytest.mark.parametrize("case", range(60))
def test_planner_matches_brute_force(case: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    n = rng.randint(0, 6)
    blocks = _random_blocks(rng, n)
    layout = rng.choice([MHA, GQA])
    block_tokens = rng.choice([4, 16, 64])
    profile = _random_profile(rng, direct=rng.random() < 0.3)
    plan = plan_restore(blocks, layout, block_tokens, profile)
    msg = f"seed={seed} blocks={blocks} profile={profile}"
    assert plan.exact, msg
    results = [(simulate(blocks, a, layout, block_tokens, profile), a) for a in _all_assignments(blocks)]
    best_t = min(t for (t, _), _ in results)
    assert plan.predicted_s == pytest.approx(best_t, rel=1e-9, abs=1e-15), msg
    # The planner's own steps, re-simulated, give what it predicted.
    actions = [s.action for s in plan.steps]
    assert simulate(blocks, actions, layout, block_tokens, profile)[0] == pytest.approx(plan.predicted_s, rel=1e-12)
    # Lower bound: below every assignment's makespan, and equal to the min of their bounds.
    assert plan.lower_bound_s <= best_t * (1 + 1e-12), msg
    assert plan.lower_bound_s == pytest.approx(min(lb for (_, lb), _ in results), rel=1e-9), msg
    _check_schedule(plan, blocks, profile)


def test_bounded_search_is_valid_and_close(seed) -> None:
    rng = random.Random(seed)
    for _ in range(8):
        blocks = _random_blocks(rng, 7)
        profile = _random_profile(rng, direct=False)
        exact = plan_restore(blocks, MHA, 16, profile)
        bounded = plan_restore(blocks, MHA, 16, profile, max_evals=1)
        assert exact.exact, f"seed={seed}"
        # A block on disk leaves assignments to search one by one: one evaluation cannot be
        # exact. With nothing on disk the planner may solve them all in closed form at once,
        # and an exact answer must then be the optimum.
        if any("disk" in (b.kv, b.act) for b in blocks):
            assert not bounded.exact, f"seed={seed}"
        if bounded.exact:
            assert bounded.predicted_s == pytest.approx(exact.predicted_s, rel=1e-12), f"seed={seed}"
        actions = [s.action for s in bounded.steps]
        assert simulate(blocks, actions, MHA, 16, profile)[0] == pytest.approx(bounded.predicted_s, rel=1e-12)
        assert bounded.predicted_s >= exact.predicted_s * (1 - 1e-12), f"seed={seed}"
        assert bounded.predicted_s <= exact.predicted_s * 1.25, f"seed={seed}"
        assert bounded.lower_bound_s <= exact.predicted_s * (1 + 1e-12), f"seed={seed}"
        _check_schedule(bounded, blocks, profile)


def _kvpr_profile(link_bw: float, gemm_flops: float) -> CostProfile:
    return CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(link_bw)},
                       recompute=ComputeCost(gemm_flops), prefill=ComputeCost(1e6, 1.0))  # prefill: never worth it


def _kvpr_makespan(c: int, n: int, a: float, k: float, r: float) -> float:
    """Two resources (one link, compute): c act blocks first, then n-c KV blocks."""
    link_end = c * a + (n - c) * k
    comp_end = 0.0
    for j in range(1, c + 1):
        comp_end = max(comp_end, j * a) + r
    return max(link_end, comp_end)


@pytest.mark.parametrize("gemm_flops", [2e10, 1e11, 1e12, 1e14])
def test_kvpr_split_point_is_the_two_resource_special_case(gemm_flops: float) -> None:
    n, bt = 40, 16
    profile = _kvpr_profile(1e9, gemm_flops)
    blocks = [BlockForms(kv="host", act="host")] * n
    plan = plan_restore(blocks, MHA, bt, profile)
    k = MHA.kv_block_bytes(bt) / 1e9
    a = MHA.act_block_bytes(bt) / 1e9
    r = profile.recompute_s(MHA, bt)
    times = [_kvpr_makespan(c, n, a, k, r) for c in range(n + 1)]
    assert plan.predicted_s == pytest.approx(min(times), rel=1e-9)
    c = plan.count("recompute")
    assert times[c] == pytest.approx(min(times), rel=1e-9)
    # Recomputed blocks are the first ones (KVPR recomputes the leading tokens).
    assert all(s.action == "recompute" for s in plan.steps[:c])
    if gemm_flops >= 1e12:  # fast compute: the split helps, and approaches the all-act bound
        assert c > 0 and plan.predicted_s < times[0] * 0.8
    if gemm_flops <= 2e10:  # slow compute: just transfer
        assert c <= 2


def test_gqa_layout_chooses_transfer_by_itself() -> None:
    assert GQA.act_block_bytes(16) > GQA.kv_block_bytes(16)
    profile = _kvpr_profile(1e9, 1e15)  # even with nearly free compute
    for tier in ("host", "disk"):
        blocks = [BlockForms(kv=tier, act=tier)] * 12
        plan = plan_restore(blocks, GQA, 16, profile)
        assert plan.count("kv") == 12, plan.steps
    # ...but activations already on the device beat KV on disk, GQA or not.
    plan = plan_restore([BlockForms(kv="disk", act="device")] * 4, GQA, 16, profile)
    assert plan.count("recompute") == 4


def test_slow_links_leave_a_suffix_for_prefill() -> None:
    profile = CostProfile(links={"disk->host": LinkCost(1e6, 1e-3), "host->device": LinkCost(1e9)},
                          recompute=ComputeCost(1e12), prefill=ComputeCost(1e12))
    blocks = [BlockForms(kv="host")] * 2 + [BlockForms(kv="disk")] * 4
    plan = plan_restore(blocks, MHA, 16, profile)
    assert [s.action for s in plan.steps] == ["kv", "kv"] + ["prefill"] * 4
    assert plan.prefill_tokens == 64


def test_device_resident_kv_is_free() -> None:
    plan = plan_restore([BlockForms(kv="device", act="device")] * 3, MHA, 16, _kvpr_profile(1e9, 1e12))
    assert plan.predicted_s == 0.0 and plan.count("kv") == 3 and plan.schedule == ()


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        BlockForms()
    with pytest.raises(ValueError):
        BlockForms(kv="ssd")
    blocks = [BlockForms(kv="host"), BlockForms(act="host")]
    prof = _kvpr_profile(1e9, 1e12)
    with pytest.raises(ValueError, match="suffix"):
        simulate(blocks, ["prefill", "recompute"], MHA, 16, prof)
    with pytest.raises(ValueError, match="no such form"):
        simulate(blocks, ["recompute", "recompute"], MHA, 16, prof)
    with pytest.raises(ValueError):
        plan_restore(blocks, MHA, 0, prof)


def test_fast_evaluator_agrees_with_list_schedule() -> None:
    """The search's O(n) group evaluator equals the op-level list schedule it stands for."""
    from kvstore.restore.planner import _Costs, _fast_restore, _group_counts, _schedule

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(300):
        n = rng.randint(0, 14)
        blocks = _random_blocks(rng, n)
        costs = _Costs.of(rng.choice([MHA, GQA]), 16, _random_profile(rng, rng.random() < 0.3))
        m = rng.randint(0, n)
        actions = [rng.choice([a for a, t in (("kv", b.kv), ("recompute", b.act)) if t is not None])
                   for b in blocks[:m]] + ["prefill"] * (n - m)
        end, _, loads = _schedule(blocks, actions, costs)
        fast_end, fast_loads = _fast_restore(_group_counts(blocks, actions), costs)
        assert fast_end == pytest.approx(end, rel=1e-12, abs=1e-18), f"seed={seed}"
        assert fast_loads == pytest.approx(loads, rel=1e-12), f"seed={seed}"


def test_large_prefix_is_planned_quickly() -> None:
    import time

    rng = random.Random(7)
    blocks = [BlockForms(kv="host", act="host")] * 300 + [BlockForms(kv="disk", act="disk")] * 300
    profile = _random_profile(rng, direct=False)
    t0 = time.perf_counter()
    plan = plan_restore(blocks, MHA, 16, profile)
    assert time.perf_counter() - t0 < 10.0
    assert not plan.exact and plan.lower_bound_s <= plan.predicted_s
    everything_kv = simulate(blocks, ["kv"] * 600, MHA, 16, profile)[0]
    assert plan.predicted_s <= everything_kv * (1 + 1e-12)


def test_shared_cores_make_recompute_pay_its_cpu_time_too() -> None:
    """On a CPU-only machine copies and recompute share the cores: a split that overlaps them
    on separate resources must not be predicted to overlap; the planner recomputes fewer
    blocks, and its prediction is at least the summed CPU work."""
    n, bt = 40, 16
    separate = _kvpr_profile(1e9, 1e12)
    shared = CostProfile(links=separate.links, recompute=separate.recompute, prefill=separate.prefill,
                         shared_compute=True)
    blocks = [BlockForms(kv="host", act="host")] * n
    p_sep, p_shared = plan_restore(blocks, MHA, bt, separate), plan_restore(blocks, MHA, bt, shared)
    assert p_sep.count("recompute") > 0
    assert p_shared.count("recompute") < p_sep.count("recompute")
    k = MHA.kv_block_bytes(bt) / 1e9
    assert p_shared.predicted_s == pytest.approx(n * k, rel=1e-9)  # only transfer remains worth it
    # with KV on a slow disk and activations in host memory, recompute still pays on shared cores
    slow_disk = CostProfile(links={"disk->host": LinkCost(1e8), "host->device": LinkCost(1e10)},
                            recompute=ComputeCost(1e12), prefill=ComputeCost(1e6, 1.0), shared_compute=True)
    plan = plan_restore([BlockForms(kv="disk", act="host")] * n, MHA, bt, slow_disk)
    assert plan.count("recompute") > 0
    cpu = sum(op.end_s - op.start_s for op in plan.schedule)
    assert plan.predicted_s == pytest.approx(cpu, rel=1e-9)  # nothing overlaps on shared cores


@pytest.mark.parametrize("case", range(20))
def test_planner_matches_brute_force_on_shared_cores(case: int) -> None:
    rng = random.Random(10_000 + case)
    n = rng.randint(1, 6)
    blocks = _random_blocks(rng, n)
    profile = _random_profile(rng, direct=False, shared=True)
    bt = rng.choice([4, 16])
    plan = plan_restore(blocks, MHA, bt, profile)
    best = min(simulate(blocks, acts, MHA, bt, profile)[0] for acts in _all_assignments(blocks))
    assert plan.predicted_s == pytest.approx(best, rel=1e-9), f"case {case}"


def test_memory_grid_matches_brute_force() -> None:
    """Restores with nothing on disk take the closed-form grid search: it must find the
    brute-force optimum over every (restored prefix, recompute count)."""
    from kvstore.restore.planner import _actions_for, simulate

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.randint(1, 12)
        choices = [BlockForms(kv="host", act="host")] * 4 + [BlockForms(kv="host", act=None),
                                                             BlockForms(kv=None, act="host"),
                                                             BlockForms(kv="device", act=None)]
        blocks = [rng.choice(choices) for _ in range(n)]
        prof = _random_profile(rng, direct=False, shared=rng.random() < 0.3)
        lay = rng.choice([MHA, GQA])
        allow = rng.random() < 0.7
        plan = plan_restore(blocks, lay, 16, prof, allow_prefill=allow)
        best = float("inf")
        for m in (range(n + 1) if allow else [n]):
            size = sum(1 for b in blocks[:m] if b.kv == "host" and b.act == "host")
            for c in range(size + 1):
                best = min(best, simulate(blocks, _actions_for(blocks, m, {("host", "host"): c} if size else {}),
                                          lay, 16, prof)[0])
        assert plan.exact and plan.predicted_s == pytest.approx(best, rel=1e-9), f"seed={seed}"
        assert plan.lower_bound_s <= plan.predicted_s * (1 + 1e-9), f"seed={seed}"
