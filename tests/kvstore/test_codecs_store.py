"""Issue 24 through the public API: codecs per tier (host, disk), capacity in encoded bytes,
exactness as a choice, checksums over the encoded bytes, config errors at start."""

from __future__ import annotations

import pytest
import torch

from allocator.codecs import make_codec
from kvstore import BlockNotFoundError, ConfigError, KVStore, ModelLayout, StoreConfig

BT = 16
LAYOUT = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=64, hidden_size=256, dtype=torch.bfloat16)
CODECS = ("none", "lossless", "fp8", "int8", "int4")
LOSSY = {"fp8": 0.035, "int8": 0.01, "int4": 0.12}  # relative Frobenius bound of the whole KV


def layout_of(dtype: torch.dtype) -> ModelLayout:
    return ModelLayout(num_layers=2, num_kv_heads=2, head_dim=64, hidden_size=256, dtype=dtype)


def kv_for(layout: ModelLayout, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layout.kv_shape(tokens), generator=g)
    kv[:, 0, :, :, torch.randperm(layout.head_dim, generator=g)[:4]] *= 20  # key channel outliers
    return kv.to(layout.dtype)


def make(tmp_path, layout=LAYOUT, *, host=8, disk=0, device=0, **kw) -> KVStore:
    bb = layout.kv_block_bytes(BT)
    return KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=device * bb, host_bytes=host * bb,
                               disk_bytes=disk * bb, disk_path=str(tmp_path) if disk else None, device="cpu", **kw))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_every_codec_every_tier(tmp_path, codec, tier, dtype, seed, device):
    layout = layout_of(dtype)
    # the tier under test holds every block: a raw device tier of one block on top forces
    # demotion into it (encode on demotion), and gets read from it (decode into the result)
    kw = {"host": 0, "disk": 64} if tier == "disk" else {"host": 64}
    st = make(tmp_path, layout, device=1, **kw, **{f"{tier}_codec": codec}, lossy_ok=True)
    toks = list(range(BT * 6))
    kv = kv_for(layout, len(toks), seed)
    assert st.put(toks, kv) == len(toks)
    assert st.stats()["tiers"][tier]["used_blocks"] >= 5
    out = torch.empty(kv.shape, dtype=dtype, device=device)
    got = st.get(toks, out=out)
    assert got is out
    if codec in LOSSY:
        assert 0 < rel(got.cpu(), kv) < LOSSY[codec]
    else:
        assert torch.equal(got.cpu(), kv), f"{codec} on {tier} is not byte-exact"
    # more reads: blocks cycle through the one-block raw device tier and are re-encoded on
    # each demotion; exact codecs stay exact, lossy ones stay within their bound
    for _ in range(4):
        again = st.get(toks).cpu() if codec not in LOSSY else st.get(toks, exact=False).cpu()
        if codec in LOSSY:
            assert rel(again, kv) < LOSSY[codec]
        else:
            assert torch.equal(again, kv)
    st._check()
    st.close()


@pytest.mark.parametrize("codec,lo,hi", [("int8", 1.7, 2.0), ("fp8", 1.7, 2.0), ("int4", 3.2, 3.6)])
def test_capacity_multiplier_through_the_public_api(tmp_path, codec, lo, hi, seed):
    """A host tier of a fixed number of bytes holds ~2x (8-bit) / ~3.5x (int4) the blocks."""
    counts = {}
    for name in ("none", codec):
        st = make(tmp_path, host=32, host_codec=name, lossy_ok=True)
        for p in range(200):  # distinct one-block prompts until well past capacity
            st.put([p * 1000 + i for i in range(BT)], kv_for(LAYOUT, BT, seed + p))
        counts[name] = sum(st.lookup([p * 1000 + i for i in range(BT)]) // BT for p in range(200))
        assert counts[name] == st.stats()["tiers"]["host"]["used_blocks"]
        assert st.stats()["tiers"]["host"]["codec"] == name
        st.close()
    assert counts["none"] == 32
    assert lo <= counts[codec] / counts["none"] <= hi, counts


def test_stats_show_codec_and_ratio(tmp_path):
    st = make(tmp_path, host=8, disk=32, host_codec="int4", disk_codec="lossless")
    st.put(list(range(BT * 40)), torch.zeros(LAYOUT.kv_shape(BT * 40), dtype=LAYOUT.dtype))  # spills to disk
    tiers = st.stats()["tiers"]
    assert tiers["host"]["codec"] == "int4" and tiers["host"]["lossy"] is True
    assert tiers["host"]["codec_ratio"] == round(make_codec("int4", (2, 2, BT, 2, 64), torch.bfloat16).ratio, 4)
    assert tiers["disk"]["codec"] == "lossless" and tiers["disk"]["payload_ratio"] > 10  # zeros shrink
    st.close()


def test_exact_refuses_lossy_blocks_and_lossy_ok_is_the_default(tmp_path, seed):
    toks = list(range(BT * 4))
    kv = kv_for(LAYOUT, len(toks), seed)
    for lossy_ok in (False, True):
        st = make(tmp_path, host=16, host_codec="int8", lossy_ok=lossy_ok)
        st.put(toks, kv)
        with pytest.raises(BlockNotFoundError, match="lossy"):
            st.get(toks, exact=True)
        assert st.lookup(toks, exact=True) == 0
        pool = torch.zeros(8, LAYOUT.num_layers, 2, BT, LAYOUT.num_kv_heads, LAYOUT.head_dim, dtype=LAYOUT.dtype)
        with pytest.raises(BlockNotFoundError):
            st.load_into(toks, pool, [7, 2, 3, 0], exact=True)
        assert not pool.any(), "a refused load_into wrote into the pool"
        if lossy_ok:
            assert rel(st.get(toks), kv) < 0.01
            assert st.lookup(toks) == len(toks)
        else:
            with pytest.raises(BlockNotFoundError):
                st.get(toks)
            assert st.lookup(toks) == 0
        assert st.load_into(toks, pool, [7, 2, 3, 0], exact=False) == len(toks)
        blocks = kv.view(2, 2, 4, BT, 2, 64).permute(2, 0, 1, 3, 4, 5)
        assert rel(pool[[7, 2, 3, 0]], blocks) < 0.01
        assert st.stats()["lossy_refused"] >= 2
        st.close()


def test_lossy_stays_lossy_after_promotion_to_a_raw_tier(tmp_path, seed):
    """A block decoded from int4 and promoted into the raw device tier is still approximate:
    exact reads keep refusing it."""
    toks = list(range(BT * 2))
    st = make(tmp_path, device=2, host=8, host_codec="int4")
    st.put(toks, kv_for(LAYOUT, len(toks), seed))
    st.put(list(range(10**6, 10**6 + BT * 2)), kv_for(LAYOUT, BT * 2, seed + 1))  # demote the first two
    assert st.locate(toks) == ["host", "host"]
    st.get(toks, exact=False)  # promotes them to the device tier
    assert st.locate(toks) == ["device", "device"]
    with pytest.raises(BlockNotFoundError):
        st.get(toks, exact=True)
    st.close()


def test_exact_codecs_are_always_served(tmp_path, seed):
    toks = list(range(BT * 3))
    kv = kv_for(LAYOUT, len(toks), seed)
    st = make(tmp_path, host=8, disk=16, host_codec="lossless", disk_codec="lossless")
    st.put(toks, kv)
    assert torch.equal(st.get(toks, exact=True), kv)
    st.close()


def test_damaged_encoded_block_on_disk_is_a_miss(tmp_path, seed):
    toks = list(range(BT * 3))
    kv = kv_for(LAYOUT, len(toks), seed)
    st = make(tmp_path, host=0, disk=16, disk_codec="int8", lossy_ok=True)
    st.put(toks, kv)
    arena = st._tiers.tiers[-1].arena.inner  # the slab of encoded rows
    slot = st._tiers.index[st._keys(toks)[1][2]].slot
    with open(arena.path, "r+b") as f:  # one byte of block 2's *encoded* row
        f.seek(arena.data_offset + slot * arena.stride + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(BlockNotFoundError, match="checksum"):
        st.get(toks)
    assert st.lookup(toks) == 2 * BT  # dropped: the prefix ends before it
    assert st.stats()["corrupt_blocks"] == 1
    assert rel(st.get(toks[:2 * BT]), kv[:, :, :2 * BT]) < 0.01
    st.close()


def test_persisted_encoded_blocks_survive_a_restart_and_another_codec_starts_empty(tmp_path, seed):
    toks = list(range(BT * 3))
    kv = kv_for(LAYOUT, len(toks), seed)
    bb = LAYOUT.kv_block_bytes(BT)

    def open_store(codec):
        return KVStore(StoreConfig(layout=LAYOUT, block_tokens=BT, device_bytes=0, host_bytes=0,
                                   disk_bytes=16 * bb, disk_path=str(tmp_path), persist=True, device="cpu",
                                   disk_codec=codec, lossy_ok=True))
    st = open_store("int8")
    st.put(toks, kv)
    first = st.get(toks)
    st.close()
    st = open_store("int8")
    assert torch.equal(st.get(toks), first)
    assert st.get(toks, exact=None) is not None
    with pytest.raises(BlockNotFoundError):
        st.get(toks, exact=True)  # still known to be lossy after the restart
    st.close()
    st = open_store("fp8")  # same encoded size, other rows: never read as fp8
    assert st.lookup(toks) == 0
    st.close()


@pytest.mark.parametrize("kw,match", [
    ({"host_codec": "int3"}, "host_codec must be one of"),
    ({"disk_codec": "INT8"}, "disk_codec must be one of"),
    ({"remote_codec": "int9"}, "remote_codec must be one of"),
    ({"lossy_ok": "yes"}, "lossy_ok must be true or false"),
])
def test_config_errors_at_start(kw, match):
    with pytest.raises(ConfigError, match=match):
        StoreConfig(layout=LAYOUT, **kw)


def test_codec_config_errors_name_what_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numcodecs" else real(name, *a))
    with pytest.raises(ConfigError, match="numcodecs"):
        StoreConfig(layout=LAYOUT, disk_codec="lossless")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError, match="float8"):
        StoreConfig(layout=LAYOUT, host_codec="fp8")


def test_toml_keys(tmp_path):
    path = tmp_path / "store.toml"
    path.write_text('host_codec = "int4"\ndisk_codec = "lossless"\nlossy_ok = true\n'
                    '[layout]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 64\nhidden_size = 256\ndtype = "bfloat16"\n')
    cfg = StoreConfig.from_toml(path)
    assert (cfg.host_codec, cfg.disk_codec, cfg.lossy_ok) == ("int4", "lossless", True)
    path.write_text('host_codec = "int5"\n')
    with pytest.raises(ConfigError, match="host_codec"):
        StoreConfig.from_toml(path)


def test_per_layer_pool_load_into_from_an_encoded_tier(tmp_path, seed):
    toks = list(range(BT * 3))
    kv = kv_for(LAYOUT, len(toks), seed)
    st = make(tmp_path, host=8, disk=16, disk_codec="int8", host_codec="lossless", lossy_ok=True)
    st.put(toks, kv)
    pools = [torch.zeros(2, 6, BT, 2, 64, dtype=LAYOUT.dtype) for _ in range(LAYOUT.num_layers)]
    assert st.load_into(toks, pools, [4, 0, 5]) == len(toks)
    for layer, p in enumerate(pools):
        for i, b in enumerate([4, 0, 5]):
            assert torch.equal(p[:, b], kv[layer, :, i * BT:(i + 1) * BT])
    st.close()


def test_load_restores_up_to_the_first_lossy_block(tmp_path, seed):
    toks = list(range(BT * 4))
    kv = kv_for(LAYOUT, len(toks), seed)
    st = make(tmp_path, device=2, host=8, host_codec="int8", promote_on_hit=False)
    st.put(toks, kv)
    assert st.locate(toks) == ["device", "device", "host", "host"]
    res = st.load(toks)
    assert res.tokens_restored == 2 * BT and torch.equal(res.kv, kv[:, :, :2 * BT])
    res = st.load(toks, exact=False)
    assert res.tokens_restored == 4 * BT and 0 < rel(res.kv, kv) < 0.01
    st.close()


@pytest.mark.parametrize("codec", ["int4", "lossless"])
def test_save_from_and_put_async_land_encoded_in_a_coded_top_tier(tmp_path, codec, seed):
    """No device tier: puts land straight in the coded host tier (encode on the way in)."""
    toks = list(range(BT * 3))
    kv = kv_for(LAYOUT, len(toks), seed)
    st = make(tmp_path, device=0, host=8, host_codec=codec, lossy_ok=True)
    pool = torch.zeros(6, LAYOUT.num_layers, 2, BT, 2, 64, dtype=LAYOUT.dtype)
    pool[[5, 1, 3]] = kv.view(2, 2, 3, BT, 2, 64).permute(2, 0, 1, 3, 4, 5)
    assert st.save_from(toks, pool, [5, 1, 3]) == len(toks)
    other = list(range(10**6, 10**6 + BT * 2))
    assert st.put_async(other, kv[:, :, :BT * 2]).wait() == BT * 2
    back = torch.zeros_like(pool)
    assert st.load_into(toks, back, [0, 2, 4]) == len(toks)
    got = back[[0, 2, 4]]
    if codec == "lossless":
        assert torch.equal(got, pool[[5, 1, 3]])
        assert torch.equal(st.get(other), kv[:, :, :BT * 2])
    else:
        assert rel(got, pool[[5, 1, 3]]) < LOSSY["int4"]
    assert st.locate(toks) == ["host"] * 3
    st.close()
