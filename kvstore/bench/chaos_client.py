"""The client side of ``kvstore bench chaos`` (``python -m kvstore.bench.chaos_client``).

``storm``: one client process putting unique 2-block prompts through a sidecar that is
SIGKILLed and restarted under it. A put counts as *acknowledged* only when it returned the
full length; its prompt number is then appended (O_APPEND, one write) to the client's log
before the next put starts, so the log never claims more than the sidecar acknowledged.
Errors (sidecar gone, timeouts) are retried with the same prompt.

``verify``: reads every log and ``get``s each acknowledged prompt from the restarted
sidecar: exact bytes -> recovered, a miss -> lost, other bytes -> corrupt. It also asks a
second tenant for the same prompts (every hit there is a cross-tenant leak). Prints JSON.

KV of prompt ``p`` of client ``c`` is a pure function of ``(seed, c, p)``, so the verifier
regenerates it instead of storing it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from clients import connect
from kvstore.errors import BlockNotFoundError, KVStoreError
from kvstore.layout import ModelLayout

BT = 4
BLOCKS_PER_PUT = 2
LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, dtype=torch.float16)


def prompt(client: int, p: int) -> list[int]:
    base = (client + 1) * 10_000_000 + p * BT * BLOCKS_PER_PUT
    return list(range(base, base + BT * BLOCKS_PER_PUT))


def prompt_kv(seed: int, client: int, p: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(((seed * 1_000_003 + client) * 1_000_003 + p) % (1 << 62))
    return torch.randn(LAYOUT.kv_shape(BT * BLOCKS_PER_PUT), generator=g).to(LAYOUT.dtype)


def _connect(endpoint: str, namespace: str, deadline: float):
    """A client, retrying while the sidecar is down (bounded by ``deadline``)."""
    while True:
        try:
            return connect(endpoint, layout=LAYOUT, namespace=namespace, block_tokens=BT, timeout=2.0,
                           connect_timeout=1.0, retries=0)
        except (KVStoreError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def storm(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.max_seconds
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    c = None
    p = acked = errors = 0
    try:
        while p < args.max_puts and time.monotonic() < deadline and not os.path.exists(args.stop):
            try:
                if c is None:
                    c = _connect(args.endpoint, args.namespace, deadline)
                n = c.put(prompt(args.client, p), prompt_kv(args.seed, args.client, p))
            except (KVStoreError, OSError, TimeoutError):
                errors += 1
                if c is not None:
                    c.close()
                    c = None
                time.sleep(0.02)
                continue
            if n == BT * BLOCKS_PER_PUT:
                os.write(fd, f"{p}\n".encode())  # acknowledged: recorded before the next put
                acked += 1
                p += 1
    finally:
        os.close(fd)
        if c is not None:
            c.close()
    print(json.dumps({"client": args.client, "acked": acked, "errors": errors}), flush=True)
    return 0


def verify(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + 60
    out = {"prompts_acknowledged": 0, "blocks_acknowledged": 0, "blocks_recovered": 0, "lost": 0, "corrupt": 0,
           "cross_tenant_hits": 0, "cross_tenant_probes": 0}
    main = _connect(args.endpoint, args.namespace, deadline)
    other = _connect(args.endpoint, args.namespace + "-other-tenant", deadline)
    try:
        for client, log in enumerate(args.logs):
            with open(log) as f:
                acked = [int(line) for line in f if line.strip()]
            for p in acked:
                toks = prompt(client, p)
                out["prompts_acknowledged"] += 1
                out["blocks_acknowledged"] += BLOCKS_PER_PUT
                try:
                    got = main.get(toks, device="cpu")
                except BlockNotFoundError:
                    n = main.lookup(toks)
                    out["lost"] += BLOCKS_PER_PUT - n // BT
                    out["blocks_recovered"] += n // BT
                    continue
                if torch.equal(got, prompt_kv(args.seed, client, p)):
                    out["blocks_recovered"] += BLOCKS_PER_PUT
                else:
                    out["corrupt"] += BLOCKS_PER_PUT
                if p % 8 == 0:  # the other tenant asks for the same prompt
                    out["cross_tenant_probes"] += 1
                    out["cross_tenant_hits"] += other.lookup(toks) > 0
        out["stats"] = {k: v for k, v in main.stats().items() if isinstance(v, (int, float))}
    finally:
        main.close()
        other.close()
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvstore.bench.chaos_client")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("storm")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--namespace", default="chaos")
    s.add_argument("--client", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log", required=True)
    s.add_argument("--stop", required=True, help="stop when this file exists")
    s.add_argument("--max-puts", type=int, default=1000)
    s.add_argument("--max-seconds", type=float, default=600)
    v = sub.add_parser("verify")
    v.add_argument("--endpoint", required=True)
    v.add_argument("--namespace", default="chaos")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("logs", nargs="+")
    args = ap.parse_args(argv)
    return storm(args) if args.cmd == "storm" else verify(args)


if __name__ == "__main__":
    sys.exit(main())
