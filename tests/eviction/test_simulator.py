"""Trace readers, the simulator's metrics, and the ``kvstore simulate`` command."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from eviction.simulator import simulate, simulate_many
from eviction.traces import read_csv, read_mooncake, read_oracle_general, read_trace

from .conftest import chat_requests, shared_trace


@pytest.fixture
def mooncake_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i, ids in enumerate(chat_requests(3)):
            f.write(json.dumps({"timestamp": i, "input_length": 512 * len(ids),
                                "output_length": 10, "hash_ids": ids}) + "\n")
    return path


def test_mooncake_reader_chains(mooncake_file):
    tr = read_mooncake(mooncake_file)
    reqs = chat_requests(3)
    assert tr.n_requests == len(reqs) and tr.n_accesses == sum(map(len, reqs))
    assert tr.starts[-1] == tr.n_accesses and tr.unit == "blocks" and tr.sizes is None
    for i, ids in enumerate(reqs):
        a = tr.starts[i]
        assert tr.keys[a:a + len(ids)] == ids
        assert tr.parents[a] is None and tr.parents[a + 1:a + len(ids)] == ids[:-1]


def test_oracle_and_csv_readers(tmp_path):
    recs = [(1, 10, 100, 2), (2, 11, 200, -1), (3, 10, 100, -1)]
    p = tmp_path / "t.oracleGeneral.bin"
    p.write_bytes(b"".join(struct.pack("<IQIq", *r) for r in recs))
    tr = read_oracle_general(p)
    assert tr.keys == [10, 11, 10] and tr.sizes == [100, 200, 100] and tr.unit == "bytes"
    assert tr.next_access() == [2, -1, -1]
    c = tmp_path / "t.csv"
    c.write_text("key,size\na,5\nb,7\na,5\n")
    tr = read_csv(c)
    assert tr.keys == ["a", "b", "a"] and tr.sizes == [5, 7, 5]
    c2 = tmp_path / "u.csv"
    c2.write_text("1\n2\n1\n")
    tr = read_trace(c2)
    assert tr.keys == [1, 2, 1] and tr.sizes is None and tr.unit == "blocks"


def test_prefix_metric_is_leading_run(mooncake_file):
    tr = read_mooncake(mooncake_file)
    for pol in ("lru", "kv", "belady"):
        block = simulate(tr, pol, 40, "block")
        prefix = simulate(tr, pol, 40, "prefix")
        assert prefix["accesses"] == block["accesses"] == tr.n_accesses
        assert prefix["hits"] + prefix["misses"] == tr.n_accesses
        # same request stream => same cache states; prefix only drops non-leading hits
        assert prefix["hits"] <= block["hits"]


def test_prefix_metric_hand_computed(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [[1, 2, 3], [1, 2, 3], [1, 9, 3]]  # 3rd: 1 hits, 9 misses, 3 hits but not leading
    p.write_text("".join(json.dumps({"hash_ids": r}) + "\n" for r in rows))
    tr = read_mooncake(p)
    assert simulate(tr, "lru", 10, "block")["hits"] == 5
    assert simulate(tr, "lru", 10, "prefix")["hits"] == 4


def test_belady_bounds_online_policies(mooncake_file):
    tr = read_mooncake(mooncake_file)
    res = simulate_many(tr, ["lru", "arc", "s3fifo", "kv", "belady"], [20, 80], "block", jobs=2)
    for cap in (20, 80):
        rows = {r["policy"]: r["hits"] for r in res if r["capacity"] == cap}
        assert all(rows["belady"] >= h for h in rows.values())


def test_parallel_equals_serial(mooncake_file):
    tr = read_mooncake(mooncake_file)
    a = simulate_many(tr, ["lru", "sieve", "kv"], [10, 50], "prefix", jobs=1)
    b = simulate_many(tr, ["lru", "sieve", "kv"], [10, 50], "prefix", jobs=2)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)


def test_cli_json_shape(mooncake_file, tmp_path):
    png = tmp_path / "p.png"
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "simulate", "--trace", str(mooncake_file),
         "--policies", "lru,kv,belady", "--capacities", "10,50", "--metric", "prefix",
         "--json", "--plot", str(png), "--jobs", "2"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # exactly one JSON document on stdout
    assert doc["metric"] == "prefix" and doc["unit"] == "blocks" and doc["trace"] == "chat.jsonl"
    assert len(doc["results"]) == 6
    for r in doc["results"]:
        assert set(r) == {"policy", "capacity", "accesses", "hits", "misses", "hit_ratio"}
        assert r["hits"] + r["misses"] == r["accesses"]
        assert abs(r["hit_ratio"] - r["hits"] / r["accesses"]) < 1e-12
    assert png.stat().st_size > 1000


def test_cli_rejects_unknown_policy(mooncake_file):
    out = subprocess.run([sys.executable, "-m", "kvstore", "simulate", "--trace", str(mooncake_file),
                          "--policies", "nope", "--capacities", "10"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown eviction policy" in out.stderr and out.stdout == ""


@pytest.mark.slow
def test_shared_mooncake_trace_reads():
    tr = read_mooncake(shared_trace("conversation_trace.jsonl"))
    assert tr.n_accesses == 288_500 and tr.n_requests == 12_031
    assert len(set(tr.keys)) == 182_790
