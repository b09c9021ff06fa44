"""``kvstore demo --sidecar``: two engine processes share one cache through a sidecar.

The sidecar runs in this process (a background thread, on an ``ipc://`` socket in a
temporary directory); two engine processes (``python -m kvstore.cli.demo_engine``, launched as
programs: ``kvstore`` never imports ``clients``) each prefill the same system prompt. The
first stores its KV; the second finds the whole prompt cached and reads it back through
shared memory instead of prefilling. Everything is cleaned up on the way out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def _engine(endpoint: str, role: str, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kvstore.cli.demo_engine", "--endpoint", endpoint, "--role", role,
                           "--tokens", str(tokens)], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"engine ({role}) failed with code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sidecar_demo(tokens: int = 512) -> int:
    """Run the demo, print a short report on stdout; 0 when the second engine hit the whole
    prompt with bytes equal to its own prefill."""
    from kvstore.config import MiB, StoreConfig
    from kvstore.sidecar.server import ServerOptions, SidecarServer

    with tempfile.TemporaryDirectory(prefix="kvstore-sidecar-demo-") as tmp:
        server = SidecarServer(f"ipc://{tmp}/sidecar.sock",
                               StoreConfig(device_bytes=64 * MiB, host_bytes=128 * MiB, disk_bytes=0, device="cpu"),
                               ServerOptions(workers=2, lease_timeout_s=10.0))
        server.start()
        try:
            a = _engine(server.endpoint, "put", tokens)
            b = _engine(server.endpoint, "hit", tokens)
            stats = server.namespaces()[0].store.stats()
        finally:
            server.stop()
    ok = b["hit_tokens"] == a["stored_tokens"] > 0 and b["bytes_equal"]
    print(f"sidecar demo on {server.endpoint}")
    print(f"  engine A: prefilled {a['prompt_tokens']} tokens in {a['prefill_ms']:.1f} ms, "
          f"stored {a['stored_tokens']} tokens of KV in {a['put_ms']:.1f} ms "
          f"({'shared memory' if a['shared_memory'] else 'zmq frames'})")
    print(f"  engine B: cache hit on {b['hit_tokens']} of {b['prompt_tokens']} tokens, read "
          f"{b['kv_bytes'] / MiB:.1f} MiB in {b['get_ms']:.1f} ms "
          f"({'shared memory' if b['shared_memory'] else 'zmq frames'}); bytes equal to its own prefill: "
          f"{b['bytes_equal']}")
    print(f"  sidecar: {stats['blocks']} blocks cached, {stats['hits']} block hits, {stats['misses']} misses")
    print("  result: " + ("OK, two processes shared one cache" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_sidecar_demo())
