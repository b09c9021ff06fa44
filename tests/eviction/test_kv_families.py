"""``kv`` against the best classic policy on every trace family (issue 15).

Each case runs ``kv`` and the nine classic policies with the prefix metric on one trace at
one capacity (a fraction of the trace's distinct blocks) and asserts that ``kv`` is not
behind the best of them. Traces:

* shipped slices of the three shared Mooncake-format traces (always run; ``slices.py``
  says how they were cut): conversation and synthetic as request windows, agentic as a
  session sample with 4096-token blocks;
* a second slice of each, cut from ``../shared/traces`` (skipped when it is absent);
* the four generated families of ``eviction.kv_tracegen``: eight seeded traces each, and
  ``kv`` is compared with the best classic policy *on the family's mean* over them. A family
  is a distribution, not one draw: on a single trace the best of nine policies picked after
  the fact is ahead by noise alone (per trace, ``kv`` is behind that hindsight pick at 33
  of the 128 trace x capacity pairs, by 0.01 to 1 percentage point of hit ratio), while a
  user deploys one policy for the whole family.

Cases where ``kv`` is known to be behind are strict xfails naming the gap (see the issue
note): they fail the suite the day ``kv`` catches up, so the list stays true.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from eviction.kv_tracegen import PRESETS, generate, write
from eviction.registry import CLASSIC
from eviction.simulator import simulate
from eviction.traces import read_mooncake

from .conftest import shared_trace
from .slices import SLICES, shipped, slice_requests, write_jsonl

CLASSICS = tuple(n for n in CLASSIC if n != "belady")
FRACTIONS = (0.02, 0.05, 0.1, 0.2)
GEN_SEEDS = tuple(range(1, 9))
GEN_SECONDS = 600.0

_LATE = ("a switch late in a short trace: the race is won by another expert only after the "
         "followed one has shaped the cache")
#: (trace, fraction) -> why kv is behind there (strict xfails; see the issue note)
KNOWN_GAPS: dict[tuple[str, float], str] = {
    ("synthetic-shipped", 0.1): "cold window: LIRS ahead of every expert (kv-lirs 0.0287 vs 0.0325)",
    ("conversation-shared", 0.2): _LATE,
    ("gen-agent", 0.2): _LATE + " (mean of 8 seeds 0.8972 vs LRU 0.8984)",
    ("gen-mixed", 0.2): _LATE + " (mean of 8 seeds 0.2410 vs ARC 0.2432)",
}


def _cases(name: str) -> list:
    out = []
    for f in FRACTIONS:
        why = KNOWN_GAPS.get((name, f))
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        out.append(pytest.param(f, marks=marks, id=f"{f:g}"))
    return out


def _hit_ratios(tr, frac: float) -> tuple[int, dict[str, float]]:
    """The capacity for ``frac`` of the trace's distinct blocks, and the prefix hit ratio
    of ``kv`` and of every classic policy there."""
    cap = max(8, int(tr.working_set()[0] * frac))
    return cap, {p: simulate(tr, p, cap, "prefix")["hit_ratio"] for p in ("kv",) + CLASSICS}


def _assert_not_behind(path, frac: float, label: str) -> None:
    cap, ratios = _hit_ratios(read_mooncake(path), frac)
    kv = ratios.pop("kv")
    best = max(ratios, key=ratios.get)
    assert kv >= ratios[best], \
        f"{label} cap={cap}: kv {kv:.4f} behind {best} {ratios[best]:.4f}"


def _slice_cases(kind: str) -> list:
    out = []
    for name in sorted(SLICES):
        for p in _cases(f"{name}-{kind}"):
            out.append(pytest.param(name, *p.values, marks=p.marks, id=f"{name}-{p.id}"))
    return out


@pytest.mark.parametrize(("name", "frac"), _slice_cases("shipped"))
def test_kv_not_behind_on_shipped_slices(tmp_path, name, frac):
    _assert_not_behind(shipped(name, tmp_path), frac, f"{name} (shipped slice)")


@pytest.mark.parametrize("name", sorted(SLICES))
def test_shipped_slices_match_the_shared_traces(tmp_path, name):
    """The shipped slices are what ``slices.py`` cuts from the shared traces."""
    file, spec, _ = SLICES[name]
    with open(shared_trace(file), encoding="utf-8") as f:
        want = slice_requests(f, **spec)
    got = read_mooncake(shipped(name, tmp_path))
    assert [got.keys[a:b] for a, b in zip(got.starts, got.starts[1:])] == want


@pytest.mark.parametrize(("name", "frac"), _slice_cases("shared"))
def test_kv_not_behind_on_shared_trace_slices(tmp_path, name, frac):
    file, _, spec = SLICES[name]
    with open(shared_trace(file), encoding="utf-8") as f:
        reqs = slice_requests(f, **spec)
    _assert_not_behind(write_jsonl(tmp_path / f"{name}.jsonl", reqs), frac, f"{name} (shared slice)")


def _gen_cases() -> list:
    out = []
    for fam in sorted(PRESETS):
        for p in _cases(f"gen-{fam}"):
            out.append(pytest.param(fam, *p.values, marks=p.marks, id=f"{fam}-{p.id}"))
    return out


@pytest.fixture(scope="module")
def family_traces(tmp_path_factory):
    """The generated traces of each family, one per seed, written once per module."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, list] = {}

    def get(family: str) -> list:
        if family not in cache:
            cache[family] = []
            for seed in GEN_SEEDS:
                path = root / f"{family}-{seed}.jsonl"
                write(str(path), generate(replace(PRESETS[family], duration_s=GEN_SECONDS), seed))
                cache[family].append(read_mooncake(path))
        return cache[family]
    return get


@pytest.mark.parametrize(("family", "frac"), _gen_cases())
def test_kv_not_behind_on_generated_families(family_traces, family, frac):
    traces = family_traces(family)
    runs = [_hit_ratios(tr, frac)[1] for tr in traces]
    mean = {p: sum(r[p] for r in runs) / len(runs) for p in runs[0]}
    kv = mean.pop("kv")
    best = max(mean, key=mean.get)
    assert kv >= mean[best], (f"generated {family} (seeds {GEN_SEEDS[0]}..{GEN_SEEDS[-1]}), "
                              f"{frac:g} of the working set: kv mean {kv:.4f} behind {best} "
                              f"mean {mean[best]:.4f}")
