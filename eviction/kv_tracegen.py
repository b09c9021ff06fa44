"""Seeded generator of Mooncake-format KV-block traces (for guarding the ``kv`` policy
against overfitting to the two public traces).

A trace is a time-ordered list of requests ``{"timestamp", "input_length",
"output_length", "hash_ids"}``; ``hash_ids`` are chained prefix-block ids (equal ids mean
equal prefixes, 512 tokens a block). Workload ingredients, mixed per preset:

* **chat sessions**: a session starts (Poisson) under one of several shared system prompts
  (Zipf popularity) or none; each turn re-sends the previous prompt minus its partial last
  block, plus the reply and the new user message; a session continues with a probability
  that grows with its turn count, after a log-normal think time;
* **agent loops**: long shared tool/system prompt, short think time, many turns;
* **RAG**: a shared prompt, then a document from a Zipf-popular corpus, then a one-off
  question;
* **one-off documents**: long prompts never seen again (scan-like pollution).

Usage: ``python -m eviction.kv_tracegen PRESET SEED OUT.jsonl`` (presets: ``PRESETS``).
Generation is O(total blocks).
"""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
from dataclasses import dataclass


@dataclass
class Mix:
    duration_s: float = 3600.0
    session_rate: float = 2.0        # new chat/agent sessions per second
    sys_prompts: int = 5             # shared system prompts (Zipf popularity)
    sys_zipf: float = 1.0
    sys_len: tuple = (2, 8)          # blocks
    no_sys_frac: float = 0.2         # sessions without a shared system prompt
    first_len: tuple = (1, 20)       # first user message, blocks (log-uniform)
    turn_len: tuple = (1, 6)         # blocks added per turn
    p_cont: tuple = (0.3, 0.08, 0.8)  # p1, gain per turn, max
    think_median_s: float = 60.0
    think_sigma: float = 1.0
    rag_rate: float = 0.0            # RAG requests per second
    corpus: int = 2000
    corpus_zipf: float = 0.9
    doc_len: tuple = (4, 40)
    oneoff_rate: float = 0.0         # one-off long documents per second
    oneoff_len: tuple = (40, 250)


PRESETS: dict[str, Mix] = {
    "chat": Mix(),
    "agent": Mix(session_rate=0.6, sys_prompts=3, sys_len=(10, 30), no_sys_frac=0.0,
                 first_len=(1, 4), turn_len=(1, 4), p_cont=(0.7, 0.02, 0.92),
                 think_median_s=8.0, think_sigma=0.8),
    "rag": Mix(session_rate=0.8, rag_rate=2.0, sys_prompts=2, corpus=1500),
    "mixed": Mix(session_rate=1.5, sys_prompts=20, sys_zipf=1.2, think_median_s=120.0,
                 think_sigma=1.3, rag_rate=0.5, oneoff_rate=0.15,
                 p_cont=(0.2, 0.1, 0.85)),
}


def _loguni(rng: random.Random, lo_hi: tuple) -> int:
    lo, hi = lo_hi
    return max(1, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def _zipf_index(rng: random.Random, cum: list[float]) -> int:
    import bisect
    return bisect.bisect_left(cum, rng.random() * cum[-1])


def generate(mix: Mix, seed: int) -> list[dict]:
    rng = random.Random(seed)
    nid = [0]

    def fresh(n: int) -> list[int]:
        out = list(range(nid[0], nid[0] + n))
        nid[0] += n
        return out

    sys_blocks = [fresh(_loguni(rng, mix.sys_len)) for _ in range(mix.sys_prompts)]
    sys_cum = list(_cum(mix.sys_prompts, mix.sys_zipf))
    docs = [None] * mix.corpus  # lazily created document blocks (under each sys prompt)
    doc_cum = list(_cum(mix.corpus, mix.corpus_zipf))
    events: list = []  # (time, seq, kind, state)
    seq = 0

    def push(t: float, kind: str, state) -> None:
        nonlocal seq
        if t < mix.duration_s:
            heapq.heappush(events, (t, seq, kind, state))
            seq += 1

    for rate, kind in ((mix.session_rate, "new"), (mix.rag_rate, "rag"),
                       (mix.oneoff_rate, "oneoff")):
        if rate > 0:
            push(rng.expovariate(rate), kind, None)
    out: list[dict] = []
    while events:
        t, _, kind, state = heapq.heappop(events)
        if kind == "new":
            push(t + rng.expovariate(mix.session_rate), "new", None)
            prefix = [] if rng.random() < mix.no_sys_frac else \
                list(sys_blocks[_zipf_index(rng, sys_cum)])
            ids = prefix + fresh(_loguni(rng, mix.first_len))
            state = [ids, 1]
        elif kind == "turn":
            ids, turn = state
            ids = ids[:-1] + fresh(_loguni(rng, mix.turn_len) + 1)
            state = [ids, turn + 1]
        elif kind == "rag":
            push(t + rng.expovariate(mix.rag_rate), "rag", None)
            d = _zipf_index(rng, doc_cum)
            if docs[d] is None:
                docs[d] = list(sys_blocks[d % len(sys_blocks)]) + fresh(_loguni(rng, mix.doc_len))
            ids = docs[d] + fresh(rng.randint(1, 2))
        else:  # oneoff
            push(t + rng.expovariate(mix.oneoff_rate), "oneoff", None)
            ids = fresh(_loguni(rng, mix.oneoff_len))
        out.append({"timestamp": int(t * 1000), "input_length": 512 * len(ids),
                    "output_length": 256, "hash_ids": ids})
        if kind in ("new", "turn"):
            p1, gain, pmax = mix.p_cont
            if rng.random() < min(pmax, p1 + gain * (state[1] - 1)):
                think = mix.think_median_s * math.exp(rng.gauss(0, mix.think_sigma))
                push(t + think, "turn", state)
    return out


def _cum(n: int, s: float):
    acc = 0.0
    for i in range(n):
        acc += 1.0 / (i + 1) ** s
        yield acc


def write(path: str, reqs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in PRESETS:
        print(f"usage: python -m eviction.kv_tracegen {{{','.join(PRESETS)}}} SEED OUT.jsonl",
              file=sys.stderr)
        return 2
    reqs = generate(PRESETS[argv[0]], int(argv[1]))
    write(argv[2], reqs)
    n = sum(len(r["hash_ids"]) for r in reqs)
    print(f"{len(reqs)} requests, {n} block accesses -> {argv[2]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
