"""A stand-in inference engine for ``kvstore demo --sidecar``: ``python -m kvstore.cli.demo_engine``.

It "prefills" a prompt with a fixed random projection of token embeddings (deterministic,
so a second process can check bytes), and either stores the prompt's KV in the sidecar
(``--role put``) or looks the prompt up and reads the cached KV back (``--role hit``).
Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clients import connect
from kvstore.layout import ModelLayout

LAYOUT = ModelLayout(num_layers=8, num_kv_heads=4, head_dim=64, hidden_size=256, dtype=torch.float16)
BLOCK_TOKENS = 16


def prompt_tokens(n: int) -> list[int]:
    """A shared system prompt: the same ``n`` token ids in every process."""
    g = torch.Generator().manual_seed(42)
    return torch.randint(0, 32000, (n,), generator=g).tolist()


def prefill(tokens: list[int]) -> torch.Tensor:
    """KV ``[layers, 2, T, kv_heads, head_dim]``: embeddings times fixed projections. O(T·L·H·D·E)."""
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(32000, 64, generator=g)
    proj = torch.randn(64, LAYOUT.num_layers * 2 * LAYOUT.num_kv_heads * LAYOUT.head_dim, generator=g) / 8
    x = emb[torch.tensor(tokens)]
    kv = (x @ proj).view(len(tokens), LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return kv.permute(1, 2, 0, 3, 4).contiguous().to(LAYOUT.dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--role", choices=("put", "hit"), required=True)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--namespace", default="demo-model")
    args = p.parse_args(argv)
    tokens = prompt_tokens(args.tokens)
    out: dict = {"role": args.role, "prompt_tokens": len(tokens)}
    with connect(args.endpoint, layout=LAYOUT, namespace=args.namespace, block_tokens=BLOCK_TOKENS,
                 timeout=30, device="cpu") as c:
        out["shared_memory"] = c.uses_shm
        t0 = time.perf_counter()
        kv = prefill(tokens)
        out["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        if args.role == "put":
            before = c.lookup(tokens)
            out["cached_before"] = before
            t0 = time.perf_counter()
            out["stored_tokens"] = c.put(tokens, kv)
            out["put_ms"] = (time.perf_counter() - t0) * 1e3
        else:
            t0 = time.perf_counter()
            hit = c.lookup(tokens)
            got = c.get(tokens[:hit]) if hit else None
            out["get_ms"] = (time.perf_counter() - t0) * 1e3
            out["hit_tokens"] = hit
            out["bytes_equal"] = bool(got is not None and torch.equal(got, kv[:, :, :hit]))
            out["kv_bytes"] = hit * LAYOUT.kv_bytes_per_token
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
