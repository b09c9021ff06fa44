"""The ``kvstore`` command as a user runs it: the demo end to end and the bench JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvstore.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "simulate"):
        assert command in out


def test_demo_hits_demotes_to_disk_and_generates_identically(capsys):
    pytest.importorskip("transformers")
    rc = main(["demo", "--users", "3", "--turns", "2", "--gen", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "identical in 6/6 requests" in out
    disk_line = next(line for line in out.splitlines() if line.startswith("disk "))
    used = int(disk_line.split()[1].split("/")[0])
    assert used > 0, "nothing reached the disk tier"
    hits_line = next(line for line in out.splitlines() if line.startswith("prefix hits:"))
    assert int(hits_line.split()[2]) > 0


def test_bench_tiers_json_is_one_document_in_the_design_shape(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvstore", "bench", "tiers", "--quick", "--json",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["suite"] == "tiers" and isinstance(doc["machine"], dict)
    names = {r["name"] for r in doc["results"]}
    assert {"device_to_host@64KiB", "disk_to_host_cold@1024KiB", "lookup_cost_10000_vs_1000_stored"} <= names
    for r in doc["results"]:
        assert set(r) == {"name", "value", "unit", "limit", "ratio", "target", "better"}
        assert r["value"] > 0
        if r["limit"] is not None:
            assert r["ratio"] == pytest.approx(r["value"] / r["limit"])
