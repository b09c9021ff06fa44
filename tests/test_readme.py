"""Every code example in README.md runs, so the README cannot rot.

The two set-up commands at the top are what ``.ci/run`` runs; every other fenced block is
run here as a user would run it, with two substitutions so tests never touch shared paths:
``/var/tmp/kvstore`` becomes a temporary directory and ``ipc:///tmp/kvstore.sock`` an ipc
socket inside it. Python blocks run each in a fresh namespace (they are self-contained);
the ``toml`` block is the ``store.toml`` that the ``kvstore serve`` line reads; the bash
lines that start ``kvstore`` run as subprocesses (``serve`` in the background until the
block's other lines and the Python examples that talk to it are done).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(README.read_text()) if tag == lang]


def _substitute(text: str, tmp: Path) -> str:
    return (text.replace("ipc:///tmp/kvstore.sock", f"ipc://{tmp}/kvstore.sock")
            .replace("/var/tmp/kvstore", str(tmp / "disk"))
            .replace("../shared/", f"{SHARED}/"))


def _command_lines(block: str) -> list[str]:
    """The block's commands: comments and ``[optional]`` placeholders dropped, continuations joined."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\s\[[^\]]*\]", "", line)
        if line:
            lines.append(line)
    return lines


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _kvstore(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "kvstore", *argv]


def test_readme_opens_with_the_two_setup_commands():
    first = blocks("bash")[0]
    lines = _command_lines(first)
    assert len(lines) == 2
    assert lines[0].startswith("python3.11 -m venv") and lines[0].endswith("kvstore demo")
    assert lines[1].startswith("python3.11 -m venv") and "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")  # quieter, same command
    assert lines[1] in ci, ".ci/run must call the README's test command"


#: the "Use with vLLM" example needs vLLM (its own venv): tests/integrations/test_vllm.py runs it there
VLLM_EXAMPLES = [b for b in blocks("python") if "from vllm" in b]
STANDALONE = [b for b in blocks("python")
              if "ipc:///tmp/kvstore.sock" not in b and b not in VLLM_EXAMPLES]  # the rest need the sidecar


@pytest.mark.parametrize("index", range(len(STANDALONE)))
def test_python_example_runs(index, tmp_path, monkeypatch):
    code = STANDALONE[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(_substitute(code, tmp_path), f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_every_kvstore_command_line_parses():
    from kvstore.cli.main import build_parser

    parser = build_parser()
    seen = 0
    for block in blocks("bash")[1:]:
        for line in _command_lines(block):
            argv = shlex.split(line)
            if argv[0] != "kvstore":
                continue
            seen += 1
            try:
                parser.parse_args(argv[1:])
            except SystemExit as exc:  # argparse reports a bad flag this way
                pytest.fail(f"README command does not parse: {line!r} ({exc})")
    assert seen >= 4


def _serve(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(_kvstore(argv[1:]), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"kvstore serve exited early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("kvstore serve did not bind in time")
        time.sleep(0.1)


def test_sidecar_section_runs_end_to_end(tmp_path):
    """store.toml, ``kvstore serve``, ``kvstore stats``, then the Python client example."""
    (toml,) = [b for b in blocks("toml") if "remote_url" not in b]
    (tmp_path / "store.toml").write_text(_substitute(toml, tmp_path))
    sidecar_block = next(b for b in blocks("bash") if "kvstore serve" in b)
    lines = [shlex.split(_substitute(line, tmp_path)) for line in _command_lines(sidecar_block)]
    serve = next(a for a in lines if a[:2] == ["kvstore", "serve"])
    serve = [str(tmp_path / a) if a == "store.toml" else a for a in serve]
    proc = _serve(serve, tmp_path)
    try:
        _wait_for_socket(tmp_path / "kvstore.sock", proc)
        for argv in lines:
            if argv[:2] == ["kvstore", "serve"]:
                continue
            done = subprocess.run(_kvstore(argv[1:]), cwd=tmp_path, env=_env(), capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, f"{argv}: {done.stderr[-2000:]}"
            if argv[:2] == ["kvstore", "demo"]:
                assert "OK, two processes shared one cache" in done.stdout
        clients = [b for b in blocks("python") if "ipc:///tmp/kvstore.sock" in b and b not in VLLM_EXAMPLES]
        assert clients
        for code in clients:
            exec(compile(_substitute(code, tmp_path), "README.md sidecar example", "exec"), {"__name__": "__readme__"})
        stats = subprocess.run(_kvstore(["stats", "--endpoint", f"ipc://{tmp_path}/kvstore.sock", "--json"]),
                               env=_env(), capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0 and "model-a" in stats.stdout, stats.stderr[-2000:]
    finally:
        _stop(proc)


def test_simulate_example_runs(tmp_path):
    trace = SHARED / "traces" / "conversation_trace.jsonl"
    if not trace.exists():
        pytest.skip(f"the shared traces are not beside this checkout ({trace})")
    block = next(b for b in blocks("bash") if "kvstore simulate" in b)
    (line,) = [line for line in _command_lines(block) if line.startswith("kvstore simulate")]
    argv = shlex.split(_substitute(line, tmp_path))
    done = subprocess.run(_kvstore([*argv[1:], "--json"]), cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    doc = json.loads(done.stdout)
    assert {r["policy"] for r in doc["results"]} >= {"lru", "kv", "belady"}
    for r in doc["results"]:
        assert r["hits"] + r["misses"] == r["accesses"] > 0


def test_fleet_section_runs_against_a_real_cluster(tmp_path):
    """The remote tier's store.toml and commands, with the example's seed nodes
    (10.0.0.x, never contacted) replaced by a 3-master Redis Cluster on loopback, the
    host tier scaled down (``--host-bytes``) and the sidecar on an ipc socket. The
    ``export`` line is a placeholder (this cluster has no password); ``kvstore bench
    remote`` runs in tests/bench/test_remote_bench.py."""
    from tests.redisserver import RedisClusterProcs, require_redis

    require_redis()
    cluster = RedisClusterProcs(3)
    try:
        seeds = ",".join(n.addr for n in cluster.nodes)

        def sub(text: str) -> str:
            return re.sub(r"10\.0\.0\.1\d:6379(,10\.0\.0\.1\d:6379)*",
                          lambda m: seeds if "," in m.group(0) else cluster.nodes[0].addr, _substitute(text, tmp_path))

        (toml,) = [b for b in blocks("toml") if "remote_url" in b]
        (tmp_path / "store.toml").write_text(sub(toml))
        block = next(b for b in blocks("bash") if "--remote-url" in b)
        lines = [shlex.split(sub(line)) for line in _command_lines(block) if line.startswith("kvstore")]
        assert {tuple(a[:2]) for a in lines} >= {("kvstore", "serve"), ("kvstore", "calibrate"), ("kvstore", "bench")}
        sock = tmp_path / "fleet.sock"
        for argv in lines:
            if argv[:2] == ["kvstore", "serve"]:
                argv = [str(tmp_path / a) if a == "store.toml" else a for a in argv]
                proc = _serve([*argv, "--endpoint", f"ipc://{sock}", "--host-bytes", "16777216",
                               "--device-bytes", "0"], tmp_path)
                try:
                    _wait_for_socket(sock, proc)
                    _a_fleet_shares_a_prefix(f"ipc://{sock}", seeds)
                finally:
                    _stop(proc)
            elif argv[:2] == ["kvstore", "calibrate"]:
                done = subprocess.run(_kvstore([*argv[1:], "--quick", "--json", "--profile", str(tmp_path / "p.json")]),
                                      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, done.stderr[-2000:]
                import json

                assert "remote->host" in json.loads(done.stdout)["links"]
    finally:
        cluster.stop()


def _a_fleet_shares_a_prefix(endpoint: str, seeds: str) -> None:
    """A client of the sidecar puts; a store elsewhere that shares only the cluster finds it."""
    import torch

    from clients import connect
    from kvstore import KVStore, ModelLayout, StoreConfig

    layout = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, dtype=torch.float16)
    tokens = list(range(64))
    kv = torch.randn(layout.kv_shape(64), dtype=torch.float16)
    with connect(endpoint, layout=layout, namespace="fleet", block_tokens=16) as c:
        assert c.put(tokens, kv) == 64
    with KVStore(StoreConfig(layout=layout, block_tokens=16, host_bytes=1 << 20, namespace="fleet",
                             remote_url=f"redis+cluster://{seeds}")) as other:
        assert other.lookup(tokens) == 64
        assert torch.equal(other.get(tokens).cpu(), kv)
