"""Profiles are measured on the store's own device (issue 26 item 8): a CPU store on a GPU
host gets a CPU profile; syncs name the device; the peak-GEMM probe keeps an H100 busy."""

from __future__ import annotations

import json

import pytest
import torch

from kvstore.restore import calibrate
from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost
from kvstore.restore.profiles import quick_profile, store_profile


def _gpu_profile() -> CostProfile:
    return CostProfile(links={"disk->host": LinkCost(3e9, 1e-4), "host->device": LinkCost(5e10, 1e-5)},
                       recompute=ComputeCost(5e14, 1e-5), prefill=ComputeCost(5e14, 1e-3), device="NVIDIA H100")


def test_a_cpu_store_on_a_gpu_host_is_measured_on_the_cpu(layout, monkeypatch):
    """A GPU host (simulated: CUDA reported present; any CUDA call would fail on this CPU
    build): quick_profile for a CPU store measures host memcpy and CPU GEMMs, kind "cpu"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    prof = quick_profile(layout, torch.device("cpu"), tokens=32)
    assert prof.device == "cpu" and prof.shared_compute
    assert prof.recompute.flops_per_s < 1e13  # a CPU's rate, not a GPU's


def test_a_gpu_calibrated_profile_is_not_used_by_a_cpu_store(layout, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_gpu_profile().to_dict()))
    prof = store_profile(layout, torch.device("cpu"), path)
    assert prof.device == "cpu" and prof.meta.get("source") == "quick measurement"
    cpu_saved = tmp_path / "cpu.json"
    cpu_saved.write_text(json.dumps(prof.to_dict()))
    again = store_profile(layout, torch.device("cpu"), cpu_saved)
    assert again.to_dict() == prof.to_dict()  # the matching calibrated profile is used as is


def test_syncs_name_their_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(a or k))
    calibrate.device_sync(torch.device("cuda:3"))()
    assert calls == [(torch.device("cuda:3"),)]
    calibrate.device_sync(torch.device("cpu"))()  # a no-op, no CUDA call


@pytest.mark.cuda
def test_cuda_peak_probe_is_not_below_the_old_probe():
    """On a GPU: the new probe (8192^3, 8 per sync, the layout's half dtype) reads at least
    the old 2048^3-with-a-sync-per-GEMM figure, and an H100/H200 at least 400 TFLOP/s."""
    dev = torch.device("cuda")
    new = calibrate.peak_gemm_rate(dev, torch.bfloat16)
    old = calibrate.peak_gemm_rate(dev, torch.bfloat16, n=2048, inner=1)
    assert new >= 0.95 * old, (new, old)
    name = torch.cuda.get_device_name(dev)
    if "H100" in name or "H200" in name:
        assert new >= 4e14, (name, new)


@pytest.mark.cuda
def test_cuda_store_profile_of_a_cpu_store_on_this_gpu_host(layout):
    prof = quick_profile(layout, torch.device("cpu"), tokens=32)
    assert prof.device == "cpu"
    gpu = quick_profile(layout, torch.device("cuda"))
    assert gpu.device != "cpu" and not gpu.shared_compute
