"""Cost model: link/compute arithmetic, JSON round trip, EWMA refinement from observations."""

from __future__ import annotations

import random

import pytest
import torch

from kvstore.restore.costmodel import (ComputeCost, CostModel, CostProfile, LinkCost, default_profile,
                               prefill_flops_per_token, recompute_flops)
from kvstore.layout import ModelLayout

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=64, dtype=torch.float16)


def _profile() -> CostProfile:
    return CostProfile(links={"disk->host": LinkCost(1e9, 1e-4), "host->device": LinkCost(1e10, 1e-5)},
                       recompute=ComputeCost(1e12, 1e-5), prefill=ComputeCost(1e11, 1e-3))


def test_link_and_compute_seconds() -> None:
    p = _profile()
    assert p.links["disk->host"].seconds(10**9) == pytest.approx(1.0 + 1e-4)
    assert recompute_flops(LAYOUT, 10) == 2 * 10 * (2 * 64 * 32 + 3 * 16)
    assert p.recompute_s(LAYOUT, 10) == pytest.approx(1e-5 + recompute_flops(LAYOUT, 10) / 1e12)
    assert p.prefill_s(LAYOUT, 0) == 0.0
    assert p.prefill_s(LAYOUT, 5) == pytest.approx(1e-3 + 5 * prefill_flops_per_token(LAYOUT) / 1e11)
    # prefill of a token costs more than recomputing its K/V (it includes that projection)
    assert prefill_flops_per_token(LAYOUT) > recompute_flops(LAYOUT, 1)


def test_json_round_trip_and_validation() -> None:
    p = _profile()
    assert CostProfile.from_dict(p.to_dict()) == p
    assert CostProfile.from_dict(default_profile().to_dict()) == default_profile()
    with pytest.raises(ValueError):
        CostProfile.from_dict({**p.to_dict(), "version": 99})
    with pytest.raises(ValueError):
        LinkCost(0.0)
    with pytest.raises(ValueError):
        ComputeCost(1e9, -1.0)
    with pytest.raises(ValueError):
        CostProfile(links={"host->device": LinkCost(1e9)}, recompute=ComputeCost(1.0), prefill=ComputeCost(1.0))
    with pytest.raises(ValueError):
        CostProfile(links={**p.links, "pcie": LinkCost(1e9)}, recompute=ComputeCost(1.0), prefill=ComputeCost(1.0))


def test_ewma_converges_to_observed_bandwidth() -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    model = CostModel(_profile(), alpha=0.3)
    before = model.profile
    true_bw, lat = 2.5e9, 1e-5
    for _ in range(60):
        n = rng.randint(1 << 16, 1 << 24)
        model.observe_transfer("host->device", n, lat + n / true_bw * rng.uniform(0.98, 1.02))
    assert model.profile.links["host->device"].bandwidth_Bps == pytest.approx(true_bw, rel=0.03), f"seed={seed}"
    assert before.links["host->device"].bandwidth_Bps == 1e10  # snapshots are immutable
    assert model.profile.links["disk->host"] == before.links["disk->host"]
    assert model.observations == 60


def test_ewma_recompute_and_ignored_observations() -> None:
    model = CostModel(_profile(), alpha=1.0)
    flops = recompute_flops(LAYOUT, 100)
    model.observe_recompute(LAYOUT, 100, 1e-5 + flops / 2e11)
    assert model.profile.recompute.flops_per_s == pytest.approx(2e11)
    snapshot = model.profile
    model.observe_transfer("host->device", 1000, 1e-6)  # shorter than the latency: ignored
    model.observe_recompute(LAYOUT, 0, 1.0)
    assert model.profile == snapshot
    with pytest.raises(KeyError):
        model.observe_transfer("disk->device", 10, 1.0)
    with pytest.raises(ValueError):
        CostModel(_profile(), alpha=0.0)
