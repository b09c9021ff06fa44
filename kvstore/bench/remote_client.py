"""One engine of ``kvstore bench remote``'s shared-prefix run (``python -m kvstore.bench.remote_client``).

``--role first`` serves ``--users`` prompts (a 8-block system prefix shared by all plus a
4-block part of each user) and puts their KV, which reaches the remote tier. ``--role
second``, a separate process sharing only the Redis, serves those users and as many new
ones: it looks each prompt up, reads the cached prefix (local or remote), checks it is the
first process's bytes, and "recomputes" (puts) the rest. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvstore import KVStore, StoreConfig
from kvstore.bench.remote import BT, KiB, layout_for

PREFIX_BLOCKS, USER_BLOCKS = 8, 4


def prompt(user: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and KV of ``user``'s prompt; the prefix's KV is the same for every user."""
    layout = layout_for(64 * KiB)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 50_000, (PREFIX_BLOCKS * BT,), generator=g)
    prefix_kv = torch.randn(layout.kv_shape(PREFIX_BLOCKS * BT), generator=g).to(layout.dtype)
    g = torch.Generator().manual_seed(1000 + user)
    own = torch.randint(0, 50_000, (USER_BLOCKS * BT,), generator=g)
    own_kv = torch.randn(layout.kv_shape(USER_BLOCKS * BT), generator=g).to(layout.dtype)
    return torch.cat([prefix, own]), torch.cat([prefix_kv, own_kv], dim=2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--role", choices=("first", "second"), required=True)
    p.add_argument("--users", type=int, default=8)
    args = p.parse_args()
    layout = layout_for(64 * KiB)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=256 << 20, device="cpu",
                      namespace="bench-shared-prefix", remote_url=args.url, remote_deadline_s=5.0)
    with KVStore(cfg) as store:
        if args.role == "first":
            for u in range(args.users):
                store.put(*prompt(u))
            store.flush_remote(60)
            print(json.dumps({"written": store.stats()["remote"]["written_blocks"]}))
            return
        found = recomputed = 0
        get_s: list[float] = []
        for u in range(2 * args.users):
            tokens, kv = prompt(u)
            n = store.lookup(tokens)
            if n:
                t0 = time.perf_counter()
                got = store.get(tokens[:n])
                get_s.append(time.perf_counter() - t0)
                if not torch.equal(got.view(torch.int16), kv[:, :, :n].view(torch.int16)):
                    raise SystemExit(f"user {u}: cached bytes differ from the first process's")
            found += n // BT
            recomputed += (len(tokens) - n) // BT
            store.put(tokens, kv)  # the engine prefilled the rest
        available = PREFIX_BLOCKS + USER_BLOCKS * args.users  # what only the first process had computed
        print(json.dumps({"remote_hits": store.stats()["remote"]["hit_blocks"], "available": available,
                          "found": found, "recomputed": recomputed,
                          "remote_get_ms": statistics.median(get_s) * 1e3 if get_s else 0.0}))


if __name__ == "__main__":
    main()
