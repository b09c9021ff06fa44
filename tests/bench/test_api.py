"""``kvstore bench api``: one JSON document whose every data-path figure sits beside a limit
measured in the same run (and the bench's own byte checks pass: it raises on other bytes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_api_small_run_reports_every_figure_beside_its_limit(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvstore", "bench", "api", "--json", "--quick", "--total-mib", "8",
                          "--repeats", "1", "--no-ops", "--dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)  # one JSON document, nothing else on stdout
    assert doc["suite"] == "api"
    results = {r["name"]: r for r in doc["results"]}
    for tier in ("device", "host", "disk"):
        for op in ("put", "get_out", "load_into_xlayer", "load_into_layers", "save_from_xlayer", "save_from_layers"):
            for size in ("4096KiB", "64KiB"):
                r = results[f"{op}/{tier}->cpu@{size}"]
                assert r["limit"] and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    assert results["get_out/host->cpu@4096KiB"]["target"] == 0.8
    for name in ("mha", "gqa"):
        r = results[f"restore_{name}/host->cpu/load_vs_best_split"]
        assert r["ratio"] > 0 and r["target"] == 1.15
    assert results["restore_gqa/host->cpu/recompute_blocks"]["value"] == 0  # GQA: transfer only
