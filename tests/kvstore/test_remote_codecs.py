"""Issue 24 on the Redis tier: values carry encoded blocks, a fleet on mixed codecs shares
nothing between codecs (each codec has its own keys, so none deletes another's values as
damaged), lossy remote blocks are refused by exact reads, damaged encoded values are misses."""

from __future__ import annotations

import pytest
import torch

from kvstore import BlockNotFoundError, KVStore, ModelLayout, StoreConfig
from kvstore.remote_tier import KEY_PREFIX

LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=64, hidden_size=256, dtype=torch.bfloat16)
BT = 16
BB = LAYOUT.kv_block_bytes(BT)


@pytest.fixture
def server(redis_server_proc):
    redis_server_proc.client().flushall()
    return redis_server_proc


def store(url: str, codec: str, **kw) -> KVStore:
    return KVStore(StoreConfig(layout=LAYOUT, block_tokens=BT, device_bytes=0, host_bytes=16 * BB, device="cpu",
                               remote_url=url, remote_codec=codec, namespace="fleet", **kw))


def kv_for(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.kv_shape(tokens), generator=g).to(LAYOUT.dtype)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("codec", ["lossless", "int8", "int4"])
def test_remote_values_carry_encoded_blocks(server, codec, seed):
    toks = list(range(BT * 3))
    kv = kv_for(len(toks), seed)
    with store(server.url, codec, lossy_ok=True) as a:
        a.put(toks, kv)
        assert a.flush_remote(5.0)
    r = server.client()
    keys = r.keys(KEY_PREFIX + f"{codec}:".encode() + b"*")
    assert len(keys) == 3 and not r.keys(KEY_PREFIX + b"[^a-z]*")  # only under the codec's prefix
    size = r.strlen(keys[0])
    assert size < BB if codec != "lossless" else size <= BB + 64 + 16  # encoded, not raw
    with store(server.url, codec, lossy_ok=True) as b:  # another machine: nothing local
        got = b.get(toks)
        if codec == "lossless":
            assert torch.equal(got, kv)
        else:
            assert 0 < rel(got, kv) < (0.01 if codec == "int8" else 0.12)
            with pytest.raises(BlockNotFoundError):
                b.get(toks, exact=True)  # promoted locally by the read above, still lossy
    with store(server.url, codec) as c:  # lossy_ok False: a lossy remote block is not counted
        assert c.lookup(toks) == (len(toks) if codec == "lossless" else 0)


def test_mixed_codec_fleet_shares_nothing_and_deletes_nothing(server, seed):
    toks = list(range(BT * 2))
    kv = kv_for(len(toks), seed)
    with store(server.url, "none") as raw, store(server.url, "int8", lossy_ok=True) as coded:
        raw.put(toks, kv)
        assert raw.flush_remote(5.0)
        assert coded.lookup(toks) == 0  # another codec's values are not this store's blocks
        coded.put(toks, kv)
        assert coded.flush_remote(5.0)
    with store(server.url, "none") as raw2:
        assert torch.equal(raw2.get(toks), kv)  # the raw values survived the int8 store
    assert len(server.client().keys(b"*")) == 4


def test_damaged_encoded_remote_value_is_a_miss(server, seed):
    toks = list(range(BT * 2))
    with store(server.url, "int8", lossy_ok=True) as a:
        a.put(toks, kv_for(len(toks), seed))
        assert a.flush_remote(5.0)
    r = server.client()
    key = sorted(r.keys(KEY_PREFIX + b"int8:*"))[0]
    v = bytearray(r.get(key))
    v[-5] ^= 0xFF  # one byte of the encoded payload
    r.set(key, bytes(v))
    with store(server.url, "int8", lossy_ok=True) as b:
        with pytest.raises(BlockNotFoundError):
            b.get(toks)  # the damaged value fails its checksum: a miss, never decoded bytes
    assert key not in r.keys(KEY_PREFIX + b"int8:*")  # and it was deleted for a fresh put to replace
