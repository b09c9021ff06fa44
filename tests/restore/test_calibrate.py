"""``kvstore calibrate``: measures a sane profile, caches it, reuses it, refreshes on demand."""

from __future__ import annotations

import json

import pytest

from kvstore.restore import calibrate
from kvstore.cli import main
from kvstore.restore.costmodel import CostProfile


def test_calibrate_measures_caches_and_refreshes(tmp_path, capsys) -> None:
    path = tmp_path / "profile.json"
    argv = ["calibrate", "--quick", "--json", "--profile", str(path), "--dir", str(tmp_path)]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout
    assert doc["measured"] is True and doc["path"] == str(path)
    profile = CostProfile.from_dict(json.loads(path.read_text()))
    for link in ("disk->host", "host->device"):
        assert 1e6 < profile.links[link].bandwidth_Bps < 1e13
    assert 1e6 < profile.recompute.flops_per_s < 1e16
    assert 1e6 < profile.prefill.flops_per_s < 1e16
    # decode rates of the block codecs (issue 24), as the planner reads them
    from kvstore.restore.costmodel import decode_rate
    for codec in ("lossless", "fp8", "int8", "int4"):
        assert 1e6 < decode_rate(profile, codec) < 1e13, codec

    assert main(argv) == 0  # reused, not re-measured
    again = json.loads(capsys.readouterr().out)
    assert again["measured"] is False and again["links"] == doc["links"]

    assert main(argv + ["--refresh"]) == 0
    assert json.loads(capsys.readouterr().out)["measured"] is True


def test_unreadable_profile_is_remeasured(tmp_path, capsys) -> None:
    path = tmp_path / "profile.json"
    path.write_text('{"version": 0}')
    assert main(["calibrate", "--quick", "--json", "--profile", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["measured"] is True
    CostProfile.from_dict(json.loads(path.read_text()))


def test_default_path_is_in_user_cache_dir() -> None:
    platformdirs = pytest.importorskip("platformdirs")
    assert calibrate.default_profile_path().parent == __import__("pathlib").Path(platformdirs.user_cache_dir("kvstore"))


def test_fit_recovers_line() -> None:
    bw, lat = calibrate._fit(4096, 1e-5 + 4096 / 2e9, 1 << 26, 1e-5 + (1 << 26) / 2e9)
    assert bw == pytest.approx(2e9) and lat == pytest.approx(1e-5)


def test_rates_are_never_above_what_the_device_does(layout) -> None:
    """A rate from launch-bound calls (or a too-short observation) is capped, never believed."""
    import torch

    from kvstore.restore.costmodel import MAX_FLOPS, ComputeCost, CostModel, CostProfile, LinkCost
    from kvstore.restore.profiles import measure_recompute

    cpu = torch.device("cpu")
    assert calibrate.believable_rate(1e30, cpu, torch.float32, peak=5e9) == 5e9
    assert calibrate.believable_rate(1e30, cpu, torch.float32, peak=1e30) == MAX_FLOPS
    rate, _ = measure_recompute(layout, 64, cpu, peak=1e6)
    assert rate <= 1e6
    peak = calibrate.peak_gemm_rate(cpu, torch.float32, n=128)
    assert 1e6 < peak <= MAX_FLOPS
    cm = CostModel(CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e9)},
                               recompute=ComputeCost(1e9, 1e-3), prefill=ComputeCost(1e9)))
    for _ in range(50):
        cm.observe_recompute(layout, 4096, 1e-3 + 1e-15)  # busy time ~0: an absurd rate
    assert cm.profile.recompute.flops_per_s <= MAX_FLOPS
