"""Shared fixtures: small layouts and a seeded RNG whose seed is reported on failure."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from kvstore import ModelLayout


@pytest.fixture
def layout() -> ModelLayout:
    return ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)


@pytest.fixture
def seed(request) -> int:
    """A seed from KVSTORE_TEST_SEED or fixed per test (crc32 of its name: ``hash()`` of a str
    changes per process); printed when the test fails."""
    value = int(os.environ.get("KVSTORE_TEST_SEED", "0")) or (zlib.crc32(request.node.name.encode()) & 0xFFFF) + 1
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"rerun with KVSTORE_TEST_SEED={value}"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(seed) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def device() -> torch.device:
    """Where results are compared: CUDA when present, else the CPU. Tests that move data
    through the store use it so the same assertions run on both (comparisons on one device)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="module")
def redis_server_proc():
    """A real ``redis-server`` on a free loopback port, one per test module (tests/redisserver.py)."""
    from tests.redisserver import RedisServer, require_redis

    require_redis()
    s = RedisServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def redis_cluster_procs():
    """A real 3-master Redis Cluster on loopback, one per test module."""
    from tests.redisserver import RedisClusterProcs, require_redis

    require_redis()
    c = RedisClusterProcs(3)
    yield c
    c.stop()
