"""``kvstore demo``: the whole job on embedded defaults, readable in one screen.

A small Llama-architecture decoder with random weights (built from a config: nothing is
downloaded) serves a batch of chats: three system prompts shared by several users, each
user talking for a few turns so every request repeats its history. Before each prefill the
engine asks the store for the cached prefix, restores it, prefills only the rest, and puts
the new blocks back. The tiers are deliberately tiny so blocks are demoted to disk and
promoted back. For every request the demo also runs the uncached prefill and checks that
greedy generation from the restored cache produces exactly the same tokens.
"""

from __future__ import annotations

import argparse
import random
import sys
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=6, help="concurrent chats (default 6)")
    parser.add_argument("--turns", type=int, default=3, help="turns per chat (default 3)")
    parser.add_argument("--gen", type=int, default=8, help="tokens generated per turn (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sidecar", action="store_true",
                        help="instead: two engine processes share one cache through a sidecar")


def run(args: argparse.Namespace) -> int:
    if args.sidecar:
        try:
            from kvstore.cli.sidecar_demo import run_sidecar_demo
        except ImportError as exc:
            print(f"the sidecar demo is not available in this build: {exc}", file=sys.stderr)
            return 1
        return run_sidecar_demo()
    return Demo(users=args.users, turns=args.turns, gen_tokens=args.gen, seed=args.seed).run()


class _Model:
    """The few model calls the demo needs. The cache keyword (``cache`` or ``past_key_values``),
    the cache's layout and the conversions to and from the store's layout all come from the
    model adapter's detection, so the demo runs on every transformers release in the range
    ``pyproject.toml`` declares."""

    def __init__(self, seed: int) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from kvstore.models import HFAdapter

        self.torch = torch
        self.config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(self.config).eval()
        self.adapter = HFAdapter(self.model)
        self.device = torch.device("cpu")

    def to(self, device) -> "_Model":
        """Run the model where the store keeps its device tier (its ``get`` returns KV there);
        the adapter is rebuilt so its weights live there too."""
        self.device = self.torch.device(device)
        self.model.to(self.device)
        self.adapter = type(self.adapter)(self.model)
        return self

    def new_cache(self):
        return self.adapter.new_cache()

    def wait(self) -> None:
        """Wait for the model's queued kernels (on CUDA a forward returns once they are
        launched: a timer stopped then would count launches, not the prefill)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def forward(self, ids: list[int], cache):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device), use_cache=True,
                             **{self.adapter.cache_keyword: cache})
        return out.logits[0, -1], self.adapter.output_cache(out)

    def cache_to_kv(self, cache, tokens: int):
        """The model's cache -> ``[layers, 2, T, kv_heads, head_dim]`` (the store's layout)."""
        return self.adapter.from_cache(cache, 0, tokens)

    def kv_to_cache(self, kv):
        return self.adapter.to_cache(kv)

    def generate(self, logits, cache, n: int) -> list[int]:
        out = []
        for _ in range(n):
            tok = int(logits.argmax())
            out.append(tok)
            logits, cache = self.forward([tok], cache)
        return out


class Demo:
    def __init__(self, users: int = 6, turns: int = 3, gen_tokens: int = 8, seed: int = 0) -> None:
        self.users, self.turns, self.gen_tokens, self.seed = users, turns, gen_tokens, seed

    def run(self) -> int:
        import torch

        from kvstore import KVStore, StoreConfig

        t_start = time.perf_counter()
        m = _Model(self.seed)
        c = m.config
        layout = m.adapter.layout
        bt = 16
        block = layout.kv_block_bytes(bt)
        config = StoreConfig(layout=layout, block_tokens=bt, device_bytes=32 * block, host_bytes=32 * block,
                             disk_bytes=512 * block, policy="lru", namespace="demo-llama")
        rng = random.Random(self.seed)
        systems = [[rng.randrange(c.vocab_size) for _ in range(rng.randrange(150, 260))] for _ in range(3)]
        chats = [(u % 3, list(systems[u % 3])) for u in range(self.users)]
        print(f"model: Llama, {c.num_hidden_layers} layers, {c.num_attention_heads} heads "
              f"({c.num_key_value_heads} KV heads), hidden {c.hidden_size}, random weights, fp32, "
              f"on {'cuda' if torch.cuda.is_available() else 'cpu'} (the store's device)")
        print(f"store: {bt}-token blocks of {block // 1024} KiB; tiers device {config.device_bytes // block}, "
              f"host {config.host_bytes // block}, disk {config.disk_bytes // block} blocks (temp dir)")
        print(f"workload: {self.users} chats x {self.turns} turns over {len(systems)} shared system prompts\n")
        totals = dict(requests=0, prompt_tokens=0, cached_tokens=0, t_full=0.0, t_cached=0.0, same=0)
        with KVStore(config) as store:
            m.to(store.device)  # the store hands back KV on its device: the model runs there
            print(f"{'req':>3} {'chat':>4} {'turn':>4} {'prompt':>6} {'cached':>6} {'full ms':>8} "
                  f"{'cached ms':>9}  same tokens")
            for turn in range(self.turns):
                for u, (_, history) in enumerate(chats):
                    history += [rng.randrange(c.vocab_size) for _ in range(rng.randrange(20, 60))]
                    prompt = list(history)
                    # the uncached reference
                    m.wait()
                    t0 = time.perf_counter()
                    logits_ref, cache_ref = m.forward(prompt, m.new_cache())
                    m.wait()
                    t_full = time.perf_counter() - t0
                    ref_tokens = m.generate(logits_ref, cache_ref, self.gen_tokens)
                    # with the store: restore the cached prefix, prefill only the rest
                    m.wait()
                    t0 = time.perf_counter()
                    hit = min(store.lookup(prompt), (len(prompt) - 1) // bt * bt)  # keep >= 1 token to prefill
                    cache = m.kv_to_cache(store.get(prompt[:hit], device=m.device)) if hit else m.new_cache()
                    logits, cache = m.forward(prompt[hit:], cache)
                    m.wait()
                    t_cached = time.perf_counter() - t0
                    kv = m.cache_to_kv(cache, len(prompt))
                    tokens = m.generate(logits, cache, self.gen_tokens)
                    store.put(prompt, kv)
                    same = tokens == ref_tokens
                    history += tokens
                    totals["requests"] += 1
                    totals["prompt_tokens"] += len(prompt)
                    totals["cached_tokens"] += hit
                    totals["t_full"] += t_full
                    totals["t_cached"] += t_cached
                    totals["same"] += same
                    print(f"{totals['requests']:>3} {u:>4} {turn:>4} {len(prompt):>6} {hit:>6} {t_full * 1e3:>8.1f} "
                          f"{t_cached * 1e3:>9.1f}  {'yes' if same else 'NO'}")
            st = store.stats()
        self._report(st, totals, time.perf_counter() - t_start)
        return 0 if totals["same"] == totals["requests"] else 1

    @staticmethod
    def _report(st: dict, t: dict, elapsed: float) -> None:
        print("\ntier     used/capacity blocks  hits  demoted in  promoted in  dropped")
        for name, tier in st["tiers"].items():
            print(f"{name:<8} {tier['used_blocks']:>6}/{tier['capacity_blocks']:<14} {tier['hits']:>5} "
                  f"{tier['demotions_in']:>11} {tier['promotions_in']:>12} {tier['drops']:>8}")
        saved = t["t_full"] - t["t_cached"]
        print(f"\nprefix hits: {t['cached_tokens']} of {t['prompt_tokens']} prompt tokens "
              f"({t['cached_tokens'] / max(1, t['prompt_tokens']):.0%}) restored from the store")
        print(f"prefill time: {t['t_full'] * 1e3:.0f} ms uncached vs {t['t_cached'] * 1e3:.0f} ms with the store "
              f"(restore included): {saved * 1e3:.0f} ms saved ({saved / max(t['t_full'], 1e-9):.0%})")
        print(f"evictions {st['evictions']}, demotions {st['demotions']}, promotions {st['promotions']}, "
              f"dropped {st['dropped']}, corrupt reads {st['corrupt_blocks']}")
        verdict = "identical" if t["same"] == t["requests"] else "DIFFERENT"
        print(f"generation from restored KV vs no cache: {verdict} in {t['same']}/{t['requests']} requests")
        print(f"done in {elapsed:.1f} s; temporary slab file removed")
