"""Cost model: how long links and the compute unit take, measured and refined online.

A ``CostProfile`` is plain, immutable data (JSON round-trip) describing one machine:

* per link (``"disk->host"``, ``"host->device"``, optionally ``"disk->device"`` for direct
  storage-to-accelerator reads): ``seconds(n) = latency_s + n / bandwidth_Bps`` per
  transfer op (the store moves one block slot per op, so latency is paid per block);
  optionally ``"remote->host"``, the shared Redis tier, where one op is a whole batch
  (one pipelined round trip per shard), so latency is paid once per read;
* ``recompute``: the K/V projection GEMM (+ RoPE) at the shapes recompute uses,
  ``tokens x hidden x 2*kv_heads*head_dim`` per layer, as an effective FLOP rate plus a
  fixed per-call latency; ``recompute_s(layout, T)`` turns it into seconds;
* ``prefill``: recompute-from-tokens (a full forward over the suffix), as an effective FLOP
  rate plus latency; ``prefill_s(layout, T)`` uses ``prefill_flops_per_token(layout)``.

On a CPU-only machine the "device" is the CPU: host->device is a memcpy and compute runs on
the same cores. ``shared_compute=True`` (set by calibration on a CPU) tells the planner so:
host->device copies and recompute then share one resource instead of overlapping.

``CostModel`` wraps a profile and refines it from observed transfers and recomputes with an
exponentially weighted moving average (EWMA) of the observed bandwidth (or FLOP rate), so a
profile measured on an idle machine drifts towards what the store actually sees under load.
It holds its own state (no globals); each update is O(1).
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field, replace

from kvstore.layout import ModelLayout

LINKS = ("disk->host", "host->device", "disk->device", "remote->host")
TIERS = ("device", "host", "disk")
PROFILE_VERSION = 1
#: no single accelerator today sustains more dense FLOP/s than this (an H200 peaks near 1e15
#: in bf16): a measured or observed rate above it is a timing artefact, never believed
MAX_FLOPS = 4e15


@dataclass(frozen=True)
class LinkCost:
    """One link: ``seconds(n) = latency_s + n / bandwidth_Bps`` per transfer op."""

    bandwidth_Bps: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.bandwidth_Bps > 0 and math.isfinite(self.bandwidth_Bps)):
            raise ValueError(f"bandwidth_Bps must be positive and finite, got {self.bandwidth_Bps!r}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s!r}")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class ComputeCost:
    """A compute kernel family: ``seconds(flops) = latency_s + flops / flops_per_s`` per call."""

    flops_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.flops_per_s > 0 and math.isfinite(self.flops_per_s)):
            raise ValueError(f"flops_per_s must be positive and finite, got {self.flops_per_s!r}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s!r}")

    def seconds(self, flops: float) -> float:
        return self.latency_s + flops / self.flops_per_s


def recompute_flops(layout: ModelLayout, tokens: int) -> float:
    """FLOPs of recomputing ``tokens`` tokens' K/V on every layer: the GEMM plus RoPE.

    GEMM: ``2 * T * hidden * 2*kvd`` per layer; RoPE on K: ~3 flops per element.
    """
    kvd = layout.num_kv_heads * layout.head_dim
    return float(layout.num_layers * tokens * (2 * layout.hidden_size * 2 * kvd + 3 * kvd))


def prefill_flops_per_token(layout: ModelLayout, mlp_ratio: float = 4.0) -> float:
    """Estimated forward FLOPs per token of a decoder with this layout (no lm_head).

    Per layer: Q and O projections ``2 * 2 * h^2``, K/V ``2 * h * 2*kvd``, a gated or plain
    MLP of width ``mlp_ratio * h`` (``2 * 2 * h * mlp_ratio * h``). The attention-score term
    grows with context and is left out (a lower estimate, so prefill is never overpriced).
    """
    h = layout.hidden_size
    kvd = layout.num_kv_heads * layout.head_dim
    per_layer = 4 * h * h + 4 * h * kvd + 4 * h * mlp_ratio * h
    return float(layout.num_layers * per_layer)


@dataclass(frozen=True)
class CostProfile:
    """Measured costs of one machine (see module doc). Immutable; ``CostModel`` refines copies."""

    links: dict[str, LinkCost]
    recompute: ComputeCost
    prefill: ComputeCost
    device: str = "cpu"
    meta: dict = field(default_factory=dict)
    #: host->device copies and recompute run on the same cores (a CPU-only machine)
    shared_compute: bool = False

    def __post_init__(self) -> None:
        for name in self.links:
            if name not in LINKS:
                raise ValueError(f"unknown link {name!r}; links are {LINKS}")
        for required in ("disk->host", "host->device"):
            if required not in self.links:
                raise ValueError(f"profile lacks link {required!r}")

    def link(self, name: str) -> LinkCost | None:
        return self.links.get(name)

    def recompute_s(self, layout: ModelLayout, tokens: int) -> float:
        return self.recompute.seconds(recompute_flops(layout, tokens))

    def prefill_s(self, layout: ModelLayout, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.prefill.seconds(prefill_flops_per_token(layout) * tokens)

    def to_dict(self) -> dict:
        return {"version": PROFILE_VERSION, "device": self.device,
                "links": {k: asdict(v) for k, v in self.links.items()},
                "recompute": asdict(self.recompute), "prefill": asdict(self.prefill),
                "shared_compute": self.shared_compute, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> "CostProfile":
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"cost profile version {d.get('version')!r} != {PROFILE_VERSION}")
        return cls(links={k: LinkCost(**v) for k, v in d["links"].items()},
                   recompute=ComputeCost(**d["recompute"]), prefill=ComputeCost(**d["prefill"]),
                   device=d.get("device", "cpu"), meta=dict(d.get("meta", {})),
                   shared_compute=bool(d.get("shared_compute", False)))


#: decode rate (raw bytes out per second) assumed for a codec no calibration measured: the
#: slowest CPU figure of ``kvstore bench codecs`` on a shared 2-core box, so a codec is never
#: assumed cheaper to decode than it is
DEFAULT_DECODE_BPS = 2e8


def decode_rate(profile: CostProfile, codec: str) -> float | None:
    """The calibrated decode rate of ``codec`` (raw bytes/s) in ``profile``, or None.
    ``kvstore calibrate`` keeps them in ``meta["decode_Bps"]``. O(1)."""
    rate = (profile.meta.get("decode_Bps") or {}).get(codec)
    return float(rate) if isinstance(rate, (int, float)) and rate > 0 else None


def default_profile() -> CostProfile:
    """Order-of-magnitude defaults for a machine never calibrated (NVMe, PCIe 4, one GPU)."""
    return CostProfile(
        links={"disk->host": LinkCost(3e9, 50e-6), "host->device": LinkCost(20e9, 10e-6)},
        recompute=ComputeCost(100e12, 20e-6), prefill=ComputeCost(50e12, 1e-3),
        device="default", meta={"source": "built-in defaults"})


class CostModel:
    """A profile refined online by EWMA of observed rates (thread-safe, O(1) per update).

    ``alpha`` weights a new observation; an observation's rate is computed after taking the
    current latency estimate off the measured time, so tiny transfers (latency-dominated)
    do not drag the bandwidth down. Observations shorter than the latency are ignored.
    """

    def __init__(self, profile: CostProfile, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._profile = profile
        self._alpha = alpha
        self._lock = threading.Lock()
        self.observations = 0

    @property
    def profile(self) -> CostProfile:
        """The current snapshot (immutable; hand it to the planner)."""
        return self._profile

    def _ewma(self, old: float, new: float) -> float:
        return (1.0 - self._alpha) * old + self._alpha * new

    def observe_transfer(self, link: str, nbytes: int, seconds: float) -> None:
        """Fold one observed transfer of ``nbytes`` over ``link`` taking ``seconds`` in."""
        with self._lock:
            cur = self._profile.links.get(link)
            if cur is None:
                raise KeyError(f"profile has no link {link!r}")
            busy = seconds - cur.latency_s
            if nbytes <= 0 or busy <= 0 or not math.isfinite(seconds):
                return
            new = replace(cur, bandwidth_Bps=self._ewma(cur.bandwidth_Bps, nbytes / busy))
            self._profile = replace(self._profile, links={**self._profile.links, link: new})
            self.observations += 1

    def observe_recompute(self, layout: ModelLayout, tokens: int, seconds: float) -> None:
        """Fold one observed recompute of ``tokens`` tokens (all layers) in."""
        with self._lock:
            cur = self._profile.recompute
            busy = seconds - cur.latency_s
            if tokens <= 0 or busy <= 0 or not math.isfinite(seconds):
                return
            rate = min(recompute_flops(layout, tokens) / busy, MAX_FLOPS)
            self._profile = replace(self._profile, recompute=replace(cur, flops_per_s=self._ewma(cur.flops_per_s, rate)))
            self.observations += 1
