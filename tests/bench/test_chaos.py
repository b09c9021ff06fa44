"""``kvstore bench chaos --quick``: SIGKILL the persisted sidecar during a put storm and
check every acknowledged block comes back (the full run is the bench, 20+ kills)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_chaos_quick_loses_and_corrupts_nothing(tmp_path, seed):
    env = {**os.environ, "KVSTORE_CHAOS_SEED": str(seed)}
    out = subprocess.run([sys.executable, "-m", "kvstore", "bench", "chaos", "--quick", "--json", "--dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)  # one JSON document, nothing else on stdout
    r = {x["name"]: x["value"] for x in doc["results"]}
    assert doc["suite"] == "chaos" and doc["machine"]["seed"] == seed
    assert r["kills_survived"] >= 4
    assert r["blocks_acknowledged"] > 0
    assert r["acknowledged_but_lost"] == 0 and r["corrupt_reads"] == 0, r
    assert r["blocks_recovered"] == r["blocks_acknowledged"]
    assert r["fuzzed_inputs"] > 0 and r["fuzzed_inputs_answered"] == r["fuzzed_inputs"]
    assert r["unauthorised_refused"] >= 1 and doc["machine"]["unauthorised_answered"] == 0
    assert r["cross_tenant_hits"] == 0 and doc["machine"]["cross_tenant_probes"] > 0
