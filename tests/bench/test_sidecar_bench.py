"""``kvstore bench sidecar``: every figure beside the limit measured in the same run, the
parts a data-path figure is made of, and ``--cpus`` pinning every process of the run."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from allocator.checksum import usable_cpus
from kvstore.bench.sidecar import parse_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_AFFINITY = hasattr(os, "sched_getaffinity")


@pytest.mark.parametrize("text,cores", [("0", {0}), ("0,0", {0}), ("0-0", {0})])
def test_cpus_parse_as_taskset_lists(text, cores):
    assert parse_cpus(text) == cores


@pytest.mark.parametrize("text", ["", "a", "1-", "0,,1", "-1", "0,1-0", "100000"])
def test_cpus_that_are_not_a_list_of_usable_cores_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--cpus"):
        parse_cpus(text)


@pytest.mark.skipif(not HAS_AFFINITY, reason="no CPU affinity API on this OS")
def test_usable_cpus_follows_the_affinity_mask_not_the_machine():
    code = ("import os; from allocator.checksum import usable_cpus; os.sched_setaffinity(0, {0}); "
            "print(usable_cpus(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pinned, machine = map(int, out.stdout.split())
    assert pinned == 1 and machine >= 1
    assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not HAS_AFFINITY, reason="no CPU affinity API on this OS")
def test_bench_sidecar_quick_on_one_core_reports_every_figure_beside_its_limit():
    out = subprocess.run([sys.executable, "-m", "kvstore", "bench", "sidecar", "--json", "--quick", "--cpus", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    machine = doc["machine"]
    # every process of the run, and the client's copy threads, on the one core asked for
    assert machine["cores_of"] == {"sidecar": [0], "echo": [0], "driver": [0]}
    assert machine["usable_cpus"] == 1 and machine["copy_threads"] == 1
    results = {r["name"]: r for r in doc["results"]}
    for name in ("lookup_p50_us", "health_rt_us", "copy_hash_gbps", "hash_cache_gbps", "shm_get_gbps",
                 "shm_put_gbps", "shm_load_into_gbps", "shm_save_from_gbps", "tcp_get_gbps", "tcp_put_gbps"):
        r = results[name]
        assert r["value"] > 0 and r["limit"] > 0 and math.isfinite(r["ratio"]), r
    assert results["lookup_p50_us"]["target"] == 1.3 and results["shm_put_gbps"]["target"] == 0.8
    assert results["health_rt_us"]["better"] == "lower" and results["health_rt_us"]["target"] is None
