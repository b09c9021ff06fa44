"""Shared helpers for the eviction tests: trace location and small generated traces."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from eviction.traces import traces_dir


def shared_trace(name: str) -> Path:
    """Path of a big shared trace, or skip the test cleanly when it is absent."""
    p = traces_dir() / name
    if not p.exists():
        pytest.skip(f"shared trace {name} not found in {traces_dir()} (set KVSTORE_TRACES)")
    return p


def zipf_trace(seed: int, n: int = 6000, n_obj: int = 800, alpha: float = 1.0,
               sized: bool = False) -> tuple[list[int], list[int]]:
    """A Zipf stream with occasional one-time scans; per-object fixed sizes if ``sized``."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(n_obj)]
    ids = rng.choices(range(1, n_obj + 1), weights=weights, k=n)
    out: list[int] = []
    for i in ids:
        out.append(i)
        if rng.random() < 0.003:
            base = rng.randrange(10**6, 2 * 10**6)
            out.extend(range(base, base + rng.randrange(5, 40)))
    size_of: dict[int, int] = {}
    sizes = [size_of.setdefault(i, rng.choice((1, 2, 3, 5, 8, 13)) if sized else 1) for i in out]
    return out, sizes


def chat_requests(seed: int, n_conv: int = 60, n_req: int = 400, sys_prompts: int = 3) -> list[list[int]]:
    """Mooncake-like requests: chained block ids; conversations extend their previous turn
    (whose partial last block is superseded), some share a system-prompt prefix."""
    rng = random.Random(seed)
    next_id = [1]

    def fresh(k: int) -> list[int]:
        ids = list(range(next_id[0], next_id[0] + k))
        next_id[0] += k
        return ids

    systems = [fresh(rng.randrange(2, 6)) for _ in range(sys_prompts)]
    convs: list[list[int]] = []
    reqs: list[list[int]] = []
    for _ in range(n_req):
        if convs and rng.random() < 0.6:
            c = rng.randrange(len(convs))
            prev = convs[c]
            full = prev[:-1] + fresh(rng.randrange(1, 5))
            convs[c] = full
        else:
            full = list(rng.choice(systems)) + fresh(rng.randrange(1, 8))
            convs.append(full)
            if len(convs) > n_conv:
                convs.pop(0)
        reqs.append(full)
    return reqs


@pytest.fixture
def seed_note(request):
    """Print the seed of a failing stress test (pytest shows captured output on failure)."""
    def note(seed: int) -> None:
        print(f"[{request.node.name}] seed={seed} (rerun with EVICTION_SEED={seed})")
    return note


def seeds(default: int = 3) -> list[int]:
    env = os.environ.get("EVICTION_SEED")
    return [int(env)] if env else list(range(default))
