"""``kvstore bench codecs``: one JSON document; every speed figure beside a memcpy or the raw
restore measured in the same run, and the ratios each codec gives."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_codecs_small_run_reports_every_figure_beside_its_limit(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvstore", "bench", "codecs", "--json", "--quick", "--total", "4",
                          "--repeats", "1", "--dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["suite"] == "codecs"
    results = {r["name"]: r for r in doc["results"]}
    for codec in ("none", "lossless", "fp8", "int8", "int4"):
        for what in ("encode", "decode"):
            r = results[f"{codec} {what}"]
            assert r["limit"] and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        for tier in ("host", "disk"):
            r = results[f"restore {tier} {codec}"]
            assert r["better"] == "lower" and r["limit"] == results[f"restore {tier} none"]["value"], r
    assert 1.8 < results["int8 ratio"]["value"] < 2.0 and 3.3 < results["int4 ratio"]["value"] < 3.6
    assert results["int8 decode"]["target"] == 0.5 and results["restore disk int8"]["target"] == 0.6
