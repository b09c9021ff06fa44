"""One conformance suite, run against every client kind: embedded, TCP frames, TCP with
shared memory, ipc:// with shared memory. Identical results and identical errors."""

from __future__ import annotations

import random

import pytest
import torch

from clients import KVClient
from kvstore import BlockNotFoundError, InvalidInputError, ModelLayout, StoreClosedError
from tests.clients.conftest import BT, DEVICE_BLOCKS, DISK_BLOCKS, HOST_BLOCKS, KINDS


def make_kv(layout: ModelLayout, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def test_is_a_kvclient(client):
    assert isinstance(client, KVClient)


def test_put_lookup_get_roundtrip(client, layout):
    tokens = list(range(10))
    kv = make_kv(layout, 10, 0)
    assert client.put(tokens, kv) == 8  # only full blocks
    assert client.lookup(tokens) == 8
    assert client.lookup(tokens[:7]) == 4
    assert torch.equal(client.get(tokens[:8], device="cpu"), kv[:, :, :8])
    assert torch.equal(client.get(tokens[:4], device="cpu"), kv[:, :, :4])
    assert client.lookup([99] + tokens[1:]) == 0
    out = client.get(torch.tensor(tokens[:8]), device="cpu")
    assert out.dtype == layout.dtype and out.shape == layout.kv_shape(8) and out.is_contiguous()


def test_put_of_less_than_a_block_stores_nothing(client, layout):
    assert client.put([1, 2, 3], make_kv(layout, 3, 0)) == 0
    assert client.lookup([1, 2, 3, 4]) == 0


def test_non_contiguous_kv_is_stored_exactly(client, layout):
    base = make_kv(layout, 8, 3)
    kv = base.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not kv.is_contiguous()
    assert client.put(list(range(8)), kv) == 8
    assert torch.equal(client.get(list(range(8)), device="cpu"), base)


def test_shared_prefix_is_stored_once(client, layout):
    base = list(range(8))
    kv_a = make_kv(layout, 12, 1)
    client.put(base + [100, 101, 102, 103], kv_a)
    kv_b = make_kv(layout, 12, 2)
    kv_b[:, :, :8] = kv_a[:, :, :8]
    assert client.put(base + [200, 201, 202, 203], kv_b) == 12
    st = client.stats()
    assert st["blocks"] == 4 and st["dedup_blocks"] == 2 and st["put_blocks"] == 4
    assert torch.equal(client.get(base + [200, 201, 202, 203], device="cpu"), kv_b)


def test_get_of_uncached_prefix_raises_keyerror(client, layout):
    client.put(list(range(8)), make_kv(layout, 8, 0))
    with pytest.raises(BlockNotFoundError, match="only 8 of 12"):
        client.get(list(range(12)))
    with pytest.raises(KeyError):
        client.get([7, 7, 7, 7])
    st = client.stats()
    assert st["misses"] == 2 and st["hits"] == 2


def test_get_needs_whole_blocks(client, layout):
    client.put(list(range(8)), make_kv(layout, 8, 0))
    with pytest.raises(InvalidInputError, match="not a multiple of block_tokens=4"):
        client.get(list(range(6)))


@pytest.mark.parametrize("tokens, match", [
    ([], "must not be empty"),
    ([1.5, 2.0, 3.0, 4.0], "must be ints"),
    ("abcd", "sequence of ints"),
    ([[1, 2], [3, 4]], "must be 1-D"),
    ([2**40, 1, 2, 3], "fit in int32"),
    (torch.zeros(4), "must be integers"),
])
def test_bad_tokens_are_rejected_alike(client, layout, tokens, match):
    for call in (lambda: client.lookup(tokens), lambda: client.get(tokens),
                 lambda: client.put(tokens, make_kv(layout, 4, 0))):
        with pytest.raises(InvalidInputError, match=match):
            call()


def test_bad_kv_is_rejected_alike(client, layout):
    tokens = list(range(8))
    with pytest.raises(InvalidInputError, match="kv must be a torch.Tensor, got list"):
        client.put(tokens, [[0.0]])
    with pytest.raises(InvalidInputError, match="dtype is torch.float32"):
        client.put(tokens, make_kv(layout, 8, 0).float())
    with pytest.raises(InvalidInputError, match=r"shape is .* expected"):
        client.put(tokens, make_kv(layout, 12, 0))
    with pytest.raises(InvalidInputError, match=r"activations shape is \(1,\), expected"):
        client.put(tokens, make_kv(layout, 8, 0), activations=torch.zeros(1, dtype=layout.dtype))
    with pytest.raises(InvalidInputError, match="activations dtype is torch.float32"):
        client.put(tokens, make_kv(layout, 8, 0), activations=torch.zeros(layout.act_shape(8)))
    assert client.lookup(tokens) == 0  # nothing half-stored
    assert client.stats()["put_blocks"] == 0


def test_spill_through_every_tier_keeps_bytes_exact(client, layout):
    """More blocks than device+host: the oldest go to disk, and still come back exact.
    (Two slots stay free so that promoting a disk prompt never has to drop another.)"""
    total = DEVICE_BLOCKS + HOST_BLOCKS + DISK_BLOCKS
    prompts = []
    for i in range(total // 2 - 1):
        tokens = [1000 * (i + 1) + j for j in range(2 * BT)]
        kv = make_kv(layout, 2 * BT, 10 + i)
        assert client.put(tokens, kv) == 2 * BT
        prompts.append((tokens, kv))
    st = client.stats()
    assert st["blocks"] == total - 2 and st["tiers"]["disk"]["used_blocks"] > 0 and st["demotions"] > 0
    for tokens, kv in prompts:  # the first prompts live on disk now
        assert torch.equal(client.get(tokens, device="cpu"), kv)
    assert client.stats()["promotions"] > 0
    for i in range(2):
        client.put([7 + i] * (2 * BT), make_kv(layout, 2 * BT, 99))
    assert client.stats()["evictions"] > 0 and client.stats()["blocks"] == total


def test_clear_drops_everything(client, layout):
    client.put(list(range(12)), make_kv(layout, 12, 0))
    assert client.clear() == 3
    assert client.lookup(list(range(12))) == 0
    assert client.stats()["blocks"] == 0
    assert client.clear() == 0


def test_plan_covers_the_cached_prefix(client, layout):
    client.put(list(range(8)), make_kv(layout, 8, 0))
    plan = client.plan(list(range(12)))
    assert plan["blocks"] == 2 and plan["cached_tokens"] == 8 and len(plan["steps"]) == 2
    assert plan["predicted_s"] >= plan["lower_bound_s"] >= 0


def test_closed_client_refuses_calls(client, layout):
    with client as c:
        c.put(list(range(4)), make_kv(layout, 4, 0))
    client.close()  # idempotent
    for call in (lambda: client.lookup([1, 2, 3, 4]), lambda: client.get([1, 2, 3, 4]),
                 lambda: client.put([1, 2, 3, 4], make_kv(layout, 4, 0)), client.clear, client.stats):
        with pytest.raises(StoreClosedError):
            call()


def _outcome(fn):
    try:
        r = fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is what we compare
        return ("error", type(exc).__name__, str(exc))
    if isinstance(r, torch.Tensor):
        return ("tensor", r.shape, r.to("cpu").view(torch.int16).sum().item())
    return ("ok", r)


def _script(layout, seed: int, n: int = 60):
    """A random workload over a few shared-prefix prompts, with bad calls mixed in."""
    rng = random.Random(seed)
    stems = [[rng.randrange(50) for _ in range(BT * 2)] for _ in range(3)]
    ops = []
    for i in range(n):
        stem = rng.choice(stems)
        tail = [rng.randrange(50) for _ in range(rng.choice([0, 3, BT, 2 * BT]))]
        tokens = stem[:rng.choice([BT, 2 * BT])] + tail
        kind = rng.choice(["put", "put", "lookup", "get", "get", "bad", "clear"] if i % 17 else ["clear"])
        ops.append((kind, tokens, i))
    return ops


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "embedded"])
def test_same_script_same_outcomes_as_embedded(make_client, layout, kind, seed):
    """Every result, error class and message, and the final counters match the embedded store."""
    script = _script(layout, seed)
    outcomes = {}
    for k in ("embedded", kind):
        c = make_client(k)
        seen = []
        for op, tokens, i in script:
            if op == "put":
                seen.append(_outcome(lambda: c.put(tokens, make_kv(layout, len(tokens), i))))
            elif op == "lookup":
                seen.append(_outcome(lambda: c.lookup(tokens)))
            elif op == "get":
                seen.append(_outcome(lambda: c.get(tokens[:len(tokens) // BT * BT] if i % 3 else tokens,
                                                   device="cpu")))
            elif op == "bad":
                seen.append(_outcome(lambda: c.put(tokens, make_kv(layout, len(tokens) + 1, i))))
            else:
                seen.append(_outcome(c.clear))
        st = c.stats()
        keep = ("blocks", "lookups", "puts", "gets", "hits", "misses", "put_blocks", "dedup_blocks",
                "get_blocks", "evictions", "demotions", "promotions")
        seen.append({key: st[key] for key in keep})
        seen.append({t: v["used_blocks"] for t, v in st["tiers"].items()})
        outcomes[k] = seen
    for i, (a, b) in enumerate(zip(outcomes["embedded"], outcomes[kind])):
        assert a == b, f"step {i}: embedded {a} vs {kind} {b}"
