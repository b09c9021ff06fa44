"""``kvstore bench remote``, small: one JSON document with every figure beside its limit,
and the second process of the shared-prefix run finds every block the first one wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.redisserver import require_redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_remote_bench_small_run_reports_every_figure_beside_its_limit():
    require_redis()
    out = subprocess.run([sys.executable, "-m", "kvstore", "bench", "remote", "--json", "--blocks", "32",
                          "--sizes", "64KiB", "--repeats", "1", "--batch", "16", "--users", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)  # one JSON document, nothing else on stdout
    r = {x["name"]: x for x in doc["results"]}
    assert doc["suite"] == "remote"
    for name in ("put_gbps_64KiB", "get_gbps_64KiB", "lookup_us"):
        assert r[name]["value"] > 0 and r[name]["limit"] > 0 and r[name]["ratio"] > 0
    assert r["put_gbps_64KiB"]["target"] == 0.8
    assert r["shared_prefix_remote_hits"]["value"] == r["shared_prefix_remote_hits"]["limit"] == 8 + 4 * 2
    assert r["shared_prefix_recomputed_blocks"]["value"] == 4 * 2  # the new users' own blocks
