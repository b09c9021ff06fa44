"""Which cost profile a store plans with: the calibrated one, else a quick measurement.

``kvstore calibrate`` writes a full profile to the user cache dir; a store that needs to
plan (it holds activations and was given a recompute adapter) uses it when present. Without
one, the built-in ``default_profile()`` describes a GPU box and would make a CPU-only
machine recompute far too much, so the store measures the few figures the planner needs in
about a tenth of a second: a host memcpy (host->device on CPU; a pinned copy on CUDA), a
cold read of a small file, and the recompute GEMM at the layout's own shapes and dtype (CPU
fp16 GEMMs are several times slower than bf16 or fp32, so a generic rate would mislead).
The online refinement in :class:`~kvstore.restore.costmodel.CostModel` then corrects what a quick
measurement gets wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
import time

import torch

from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost, recompute_flops
from kvstore.layout import ModelLayout

log = logging.getLogger(__name__)


def measure_recompute(layout: ModelLayout, tokens: int, device: torch.device, reps: int = 3,
                      peak: float | None = None) -> tuple[float, float]:
    """(flops/s, per-call latency) of the K/V GEMM at the layout's shapes, dtype and device:
    the rate from the whole call at ``tokens`` tokens (never from the difference of two
    launch-bound calls), capped at the device's square-GEMM ``peak``."""
    kvd = layout.num_kv_heads * layout.head_dim
    w = torch.randn(2 * kvd, layout.hidden_size, device=device).to(layout.dtype)
    from kvstore.restore.calibrate import device_sync

    sync = device_sync(device)

    def timed(t: int) -> float:
        x = torch.randn(t, layout.hidden_size, device=device).to(layout.dtype)
        torch.nn.functional.linear(x, w)
        sync()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            sync()
            best = min(best, time.perf_counter() - t0)
        return best
    from kvstore.restore.calibrate import believable_rate

    small, big = timed(1), timed(tokens)
    per_layer = recompute_flops(layout, tokens) / layout.num_layers
    return believable_rate(per_layer / max(big, 1e-12), device, layout.dtype, peak), small * layout.num_layers


def quick_profile(layout: ModelLayout, device: torch.device | None = None, tokens: int = 256) -> CostProfile:
    """A coarse profile measured now (about 0.1-0.3 s); see the module doc."""
    from kvstore.restore import calibrate

    device = calibrate.probe_device(device)
    if device.type == "cuda":
        tokens = max(tokens, 4096)  # a restore's chunk; a GPU is launch-bound below that
    d_bw, d_lat = calibrate.measure_disk(None, 8 << 20, 3)
    h_bw, h_lat, kind = calibrate.measure_host_to_device(16 << 20, 3, device)
    peak = calibrate.peak_gemm_rate(device, layout.dtype)
    r_rate, r_lat = measure_recompute(layout, tokens, device, peak=peak)
    # A forward is mostly larger GEMMs than the K/V one: at least the same rate (already capped
    # at the square-GEMM peak: a prefill believed faster than the chip skips every restore).
    p_rate = r_rate
    return CostProfile(links={"disk->host": LinkCost(d_bw, d_lat), "host->device": LinkCost(h_bw, h_lat)},
                       recompute=ComputeCost(r_rate, r_lat), prefill=ComputeCost(p_rate, 1e-3), device=kind,
                       shared_compute=(kind == "cpu"),
                       meta={"source": "quick measurement", "measured_at": time.time()})


def store_profile(layout: ModelLayout, device: torch.device | None = None, path: Path | None = None
                  ) -> CostProfile:
    """The calibrated profile at ``path`` (default: the user cache dir) if readable and
    measured on the same kind of device as ``device`` (a CPU store on a GPU host must not
    plan with the GPU's rates, nor a CUDA store with a CPU's), else :func:`quick_profile`."""
    from kvstore.restore import calibrate

    device = calibrate.probe_device(device)
    path = path or calibrate.default_profile_path()
    if path.exists():
        try:
            profile = CostProfile.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable cost profile %s: %s", path, exc)
        else:
            if (profile.device == "cpu") == (device.type == "cpu"):
                return profile
            log.info("cost profile %s was measured on %s, not this store's %s: measuring now",
                     path, profile.device, device)
    return quick_profile(layout, device)
