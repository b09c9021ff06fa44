"""``kvstore bench vllm``: time to first token inside real vLLM engines, our connector beside
vLLM's own paths, all measured in one run (needs vLLM: run it from the venv that has it,
e.g. ``.venv-vllm/bin/kvstore bench vllm --json``).

The request: a long prefix (``--prefix-tokens``, default 4096) that was served before, plus
``--new-tokens`` (64) new ones, with ``max_tokens=1``; each figure is the median over
``--repeats`` distinct prefixes. Model: a random-weight Llama written here (``--layers`` 8,
``--hidden`` 512, ``--kv-heads`` 8 of 64, bf16: 16 KiB of KV per token). Every engine is
its own process (``kvstore.bench._vllm_engine``) and they run one after another:

* ``cold``: nothing cached (a fresh prefix in an engine without a connector);
* ``in_engine``: the same engine serving the prefix again with a new suffix: vLLM's own
  prefix cache, the lower bound;
* ``example_same``: vLLM's ``ExampleConnector`` (per-layer safetensors files) reusing a
  prompt in the engine that saved it (its lookup matches whole prompts only, so this is
  the same prompt again, with vLLM's prefix cache off so the connector serves it);
  ``..._fresh_engine``: the same prompt from a fresh engine, and a prompt extending its
  prefix with new tokens; each as vLLM runs it by default (chunked prefill) and with the
  whole prompt in one step (``_unchunked``), and what it does is reported, crash included
  (not worked around); ``example_same`` below is the first that ran;
* ``ours_host`` / ``ours_disk`` / ``ours_redis``: our connector in a fresh engine, the
  prefix (saved by an earlier engine through the connector) in the sidecar's host tier,
  in a sidecar whose only tier is disk, and only in Redis (a sidecar that shares only the
  Redis with the one the bytes were written through); the saved bytes are copied from the
  host sidecar to the others with the client API;
* ``throughput``: a no-reuse workload (``--tp-prompts`` distinct prompts) with and without
  the connector (lookups that miss, saves of every prompt).

Ratios (``limit`` is the baseline of the same run): host against ``in_engine`` (target
<= 1.2) and against ``example_same`` (<= 0.1); disk and Redis against ``cold`` (<= 0.25);
throughput with the connector against without (>= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstore.bench.report import Report, machine_info

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix-tokens", type=int, default=None, help="cached prefix length (default 4096, --quick 1024)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens after the prefix")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32, help="vLLM block size (CPU: a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=None, help="prefixes per TTFT figure (default 3, --quick 2)")
    parser.add_argument("--tp-prompts", type=int, default=None, help="prompts of the throughput run (default 16)")
    parser.add_argument("--tp-tokens", type=int, default=512, help="tokens per throughput prompt")
    parser.add_argument("--redis-url", default=None, help="an existing Redis (default: start redis-server here)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}


class _Sidecar:
    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.sock = tmp / f"{name}.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--endpoint", self.endpoint,
                                     "--device-bytes", "0", *args], cwd=ROOT, env=_env(), stdout=self.log,
                                    stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"sidecar {name} did not start: {(tmp / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _engine(tmp: Path, name: str, spec: dict) -> tuple[list[dict], str, int]:
    """Run one engine to the end; its events, log tail and exit code."""
    from kvstore.bench._vllm_engine import parse_events

    path = tmp / f"engine-{name}.json"
    path.write_text(json.dumps(spec))
    print(f"  engine {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "kvstore.bench._vllm_engine", str(path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1800)
    (tmp / f"engine-{name}.log").write_text(done.stdout + done.stderr)
    return parse_events(done.stdout), done.stdout + done.stderr, done.returncode


def _root_cause(log: str) -> str | None:
    """The first worker/engine error line of an engine's log (what vLLM reports as the cause)."""
    import re

    m = re.search(r"Worker failed with error '([^\n]*)'", log) or re.search(r"\n[^\n]*ERROR[^\n]*?(\w+Error: [^\n]*)", log)
    return m.group(1)[:500] if m else None


def _phase(events: list[dict], name: str) -> dict:
    for e in events:
        if e.get("event") == "phase" and e.get("name") == name:
            return e
    return {"error": "the engine ended before this phase"}


def _best(events: list[dict]) -> dict:
    """The fastest of the throughput rounds ``tp0..tp2`` (a shared machine's noise only slows)."""
    rounds = [_phase(events, f"tp{i}") for i in range(3)]
    ok = [r for r in rounds if "error" not in r]
    return min(ok, key=lambda r: r["seconds"]) if ok else rounds[0]


def _ours(endpoint: str, namespace: str, **extra) -> dict:
    return {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.integrations.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"endpoint": endpoint, "namespace": namespace, **extra}}


def _example(path: str) -> dict:
    return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": path}}


def _copy_namespace(src: str, dst: str, layout, namespace: str, block_tokens: int, prompts: list[list[int]]) -> None:
    """Put the KV ``src`` holds for ``prompts`` into ``dst`` (the bytes the engine saved)."""
    from clients import connect

    with connect(src, layout=layout, namespace=namespace, block_tokens=block_tokens, timeout=60) as a, \
            connect(dst, layout=layout, namespace=namespace, block_tokens=block_tokens, timeout=60) as b:
        for p in prompts:
            n = a.lookup(p)
            b.put(p[:n], a.get(p[:n], device="cpu"))


def run(args: argparse.Namespace) -> Report:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("kvstore bench vllm needs vLLM in this Python (e.g. .venv-vllm/bin/kvstore bench vllm; "
                         "README: Use with vLLM)")

    from kvstore import ModelLayout
    from kvstore.bench._vllm_engine import make_model

    prefix_len = args.prefix_tokens or (1024 if args.quick else 4096)
    repeats = args.repeats or (2 if args.quick else 3)
    tp_prompts = args.tp_prompts or (8 if args.quick else 16)
    heads = args.kv_heads
    head_dim = args.hidden // heads
    layout = ModelLayout(num_layers=args.layers, num_kv_heads=heads, head_dim=head_dim, hidden_size=args.hidden,
                         dtype=torch.bfloat16)
    bs = args.block_size
    max_len = (prefix_len + 2 * args.new_tokens + bs) // bs * bs + bs
    max_len = max(max_len, args.tp_tokens + 64)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvstore-bench-vllm-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = make_model(tmp / "model", layers=args.layers, hidden=args.hidden, heads=heads, kv_heads=heads,
                       max_positions=max(8192, max_len))
    rng = random.Random(0)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 1000) for _ in range(n)]

    base = {"model": model, "block_size": bs, "max_model_len": max_len, "dtype": "bfloat16"}
    kv_bytes = layout.kv_bytes_per_token * prefix_len
    report = Report("vllm", machine={**machine_info(), "model": {**layout.to_dict(), "vocab": 1024},
                                     "prefix_tokens": prefix_len, "new_tokens": args.new_tokens,
                                     "prefix_kv_MiB": kv_bytes / MiB, "repeats": repeats, "block_size": bs,
                                     "note": "2-core machine shared with other jobs; engines run one at a time"})
    notes: dict = {}
    # one set of prefixes per case, so every TTFT is that prefix's first visit to that engine
    prefixes = {case: [toks(prefix_len) for _ in range(repeats)] for case in ("cold", "host", "disk", "redis")}
    first = lambda pre: [p + toks(args.new_tokens) for p in pre]  # noqa: E731
    # three rounds of distinct prompts each (no reuse anywhere); the best round counts
    tp_work = [[toks(args.tp_tokens) for _ in range(tp_prompts)] for _ in range(3)]
    tp_work2 = [[toks(args.tp_tokens) for _ in range(tp_prompts)] for _ in range(3)]
    redis = None
    sides: list[_Sidecar] = []
    try:
        if args.redis_url:
            redis_url = args.redis_url
        else:
            from kvstore.bench.remote import _Servers

            redis = _Servers(0)
            redis_url = redis.url
        # 1. cold and in-engine prefix cache (+ throughput without the connector)
        cold_req, warm_req = first(prefixes["cold"]), first(prefixes["cold"])
        ev, tail, _ = _engine(tmp, "baseline", {**base, "phases": [
            {"name": "warmup", "ttft": [toks(64)]},
            {"name": "cold", "ttft": cold_req},
            {"name": "in_engine", "ttft": warm_req},
            *[{"name": f"tp{i}", "generate": tp_work[i], "max_tokens": 16} for i in range(3)]]})
        cold, warm = _phase(ev, "cold"), _phase(ev, "in_engine")
        tp0 = _best(ev)
        for what, ph in (("cold", cold), ("in_engine", warm), ("tp", tp0)):
            if "error" in ph:
                raise SystemExit(f"baseline engine failed in {what}: {ph['error']}\n{tail[-3000:]}")
        cold_s, warm_s = statistics.median(cold["ttft_s"]), statistics.median(warm["ttft_s"])
        report.add("ttft_cold_s", cold_s, "s", better="lower")
        report.add("ttft_in_engine_s", warm_s, "s", limit=cold_s, better="lower")
        # 2. vLLM's ExampleConnector, as it comes (vLLM's default chunked prefill) and with the whole
        #    prompt in one step: the same prompt again in the engine that saved it (prefix cache
        #    off, so the connector serves it), then in a fresh engine, then a fresh engine extending
        #    the saved prefix with new tokens
        example_s = None
        ex_req = first([toks(prefix_len)])
        extend = [ex_req[0][:prefix_len] + toks(args.new_tokens)]
        for variant, chunk in (("", {}), ("_unchunked", {"max_num_batched_tokens": max_len})):
            ex_dir = tmp / f"example{variant}"
            ex_dir.mkdir()
            ex_spec = {**base, **chunk, "connector": _example(str(ex_dir)), "prefix_caching": False,
                       "llm_kwargs": {"disable_hybrid_kv_cache_manager": True}}
            runs = {"same": [{"name": "warmup", "ttft": [toks(64)]}, {"name": "save", "ttft": ex_req},
                             {"name": "again", "ttft": ex_req}],
                    "fresh": [{"name": "again", "ttft": ex_req, "stop_on_error": False},
                              {"name": "extend", "ttft": extend, "stop_on_error": False}]}
            for where, phases in runs.items():
                ev, log, rc = _engine(tmp, f"example-{where}{variant}", {**ex_spec, "phases": phases})
                for ph_name in ("again", "extend") if where == "fresh" else ("again",):
                    ph = _phase(ev, ph_name)
                    label = f"example_connector{variant}_{where}_engine" + ("_extend" if ph_name == "extend" else "")
                    if "error" in ph or rc != 0 and not ph.get("ttft_s"):
                        notes[label] = _root_cause(log) or ph.get("error", f"exit {rc}")
                        report.add(f"{label}_ok", 0, "bool")
                        continue
                    v = statistics.median(ph["ttft_s"])
                    report.add(f"ttft_{label}_s", v, "s", limit=cold_s, better="lower")
                    notes[f"{label}_cached_tokens"] = ph["cached"]
                    if where == "same" and example_s is None:
                        example_s = v
        # 3. ours: a writer engine fills the sidecars, fresh engines read
        # room for every byte the writer saves (the TTFT prefixes and the throughput rounds), so
        # nothing the readers want is evicted
        room = 2 * (3 * repeats * kv_bytes + 3 * tp_prompts * args.tp_tokens * layout.kv_bytes_per_token)
        host = _Sidecar(tmp, "host", "--host-bytes", str(max(512 * MiB, room)))
        sides.append(host)
        ns = "bench-vllm"
        saved = {case: first(prefixes[case]) for case in ("host", "disk", "redis")}
        ev, tail, _ = _engine(tmp, "ours-writer", {**base, "connector": _ours(host.endpoint, ns), "phases": [
            {"name": "warmup", "ttft": [toks(64)]},
            {"name": "save", "generate": saved["host"] + saved["disk"] + saved["redis"], "max_tokens": 1},
            *[{"name": f"tp{i}", "generate": tp_work2[i], "max_tokens": 16} for i in range(3)]]})
        tp1 = _best(ev)
        if "error" in tp1:
            raise SystemExit(f"the writer engine failed: {tp1['error']}\n{tail[-3000:]}")
        disk = _Sidecar(tmp, "disk", "--host-bytes", "0", "--disk-bytes", str(max(512 * MiB, 4 * repeats * kv_bytes)),
                        "--disk-path", str(tmp / "disk"))
        sides.append(disk)
        bt = bs
        _copy_namespace(host.endpoint, disk.endpoint, layout, ns, bt, saved["disk"])
        # Redis: the engine's saved bytes go through a sidecar writing through to Redis; a second
        # sidecar, sharing only the Redis, serves the reader
        writer = _Sidecar(tmp, "redis-writer", "--host-bytes", str(max(512 * MiB, 4 * repeats * kv_bytes)),
                          "--remote-url", redis_url, "--remote-write", "through")
        sides.append(writer)
        _copy_namespace(host.endpoint, writer.endpoint, layout, ns, bt, saved["redis"])
        writer.stop()
        reader = _Sidecar(tmp, "redis-reader", "--host-bytes", str(max(512 * MiB, 4 * repeats * kv_bytes)),
                          "--remote-url", redis_url)
        sides.append(reader)
        results = {}
        for case, side in (("host", host), ("disk", disk), ("redis", reader)):
            read = [p[:prefix_len] + toks(args.new_tokens) for p in saved[case]]
            ev, tail, _ = _engine(tmp, f"ours-{case}", {**base, "connector": _ours(side.endpoint, ns), "phases": [
                {"name": "warmup", "ttft": [toks(64)]}, {"name": "read", "ttft": read}]})
            ph = _phase(ev, "read")
            if "error" in ph:
                notes[f"ours_{case}"] = ph["error"][-500:]
                continue
            results[case] = ph
            if min(ph["cached"]) < prefix_len // bs * bs:
                notes[f"ours_{case}_cached"] = ph["cached"]
        if "host" in results:
            v = statistics.median(results["host"]["ttft_s"])
            report.add("ttft_ours_host_vs_in_engine", v, "s", limit=warm_s, target=1.2, better="lower")
            if example_s is not None:
                report.add("ttft_ours_host_vs_example_connector", v, "s", limit=example_s, target=0.1, better="lower")
        for case in ("disk", "redis"):
            if case in results:
                report.add(f"ttft_ours_{case}_vs_cold", statistics.median(results[case]["ttft_s"]), "s", limit=cold_s,
                           target=0.25, better="lower")
        n_tp = sum(len(p) + 16 for p in tp_work[0])
        tps0, tps1 = n_tp / tp0["seconds"], n_tp / tp1["seconds"]
        report.add("throughput_no_reuse_with_connector", tps1, "tok/s", limit=tps0, target=0.95, better="higher")
    finally:
        for s in sides:
            s.stop()
        if redis is not None:
            redis.stop()
    report.machine["notes"] = notes
    for k, v in notes.items():
        print(f"  note {k}: {v}", file=sys.stderr)
    return report
