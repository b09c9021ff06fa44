"""Issue 24: the planner weighs fewer bytes against decode time for tiers with a codec."""

from __future__ import annotations

import pytest
import torch

from kvstore import KVStore, ModelLayout, StoreConfig
from kvstore.restore.costmodel import ComputeCost, CostProfile, LinkCost
from kvstore.restore.planner import BlockForms, TierCodec, plan_restore, simulate

LAYOUT = ModelLayout(num_layers=4, num_kv_heads=8, head_dim=128, hidden_size=1024, dtype=torch.bfloat16)
BT = 16
RAW = LAYOUT.kv_block_bytes(BT)


def profile(disk_Bps: float = 1e9, prefill_flops: float = 1e12) -> CostProfile:
    return CostProfile(links={"disk->host": LinkCost(disk_Bps), "host->device": LinkCost(20e9)},
                       recompute=ComputeCost(1e13), prefill=ComputeCost(prefill_flops))


def test_encoded_bytes_shorten_a_link_bound_restore():
    blocks = [BlockForms(kv="disk")] * 32
    raw = plan_restore(blocks, LAYOUT, BT, profile(), allow_prefill=False)
    fast = TierCodec(encoded_bytes=RAW // 2, decode_s=RAW / 20e9)
    coded = plan_restore(blocks, LAYOUT, BT, profile(), allow_prefill=False, codecs={"disk": fast})
    assert coded.predicted_s == pytest.approx(raw.predicted_s * 0.5, rel=0.1)
    assert coded.predicted_s < 0.6 * raw.predicted_s
    # the fast path and the explicit schedule agree with the codec too
    assert simulate(blocks, ["kv"] * 32, LAYOUT, BT, profile(), {"disk": fast})[0] == pytest.approx(coded.predicted_s)


def test_decode_time_is_charged_and_can_make_prefill_the_better_choice():
    blocks = [BlockForms(kv="host")] * 8
    prof = profile(prefill_flops=1e13)  # prefill of 128 tokens ~1.3 ms, raw host KV ~0.1 ms
    raw = plan_restore(blocks, LAYOUT, BT, prof)
    assert raw.prefill_tokens == 0  # raw host KV is cheaper than prefill
    slow = TierCodec(encoded_bytes=RAW // 4, decode_s=1.0)  # a decode far slower than prefill
    coded = plan_restore(blocks, LAYOUT, BT, prof, codecs={"host": slow})
    assert coded.prefill_tokens == 8 * BT, "a codec too slow to decode must lose to prefill"
    assert coded.predicted_s < 8 * 1.0


def test_store_hands_its_codecs_to_the_planner(tmp_path):
    bb = LAYOUT.kv_block_bytes(BT)
    st = KVStore(StoreConfig(layout=LAYOUT, block_tokens=BT, device_bytes=0, host_bytes=4 * bb,
                             disk_bytes=0, host_codec="int4", device="cpu"))
    prof = CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e9)},
                       recompute=ComputeCost(1e13), prefill=ComputeCost(1e12),
                       meta={"decode_Bps": {"int4": 4e9}})
    codecs = st.planner_codecs(prof)
    codec = st._tiers.tiers[0].arena.codec
    assert codecs == {"host": TierCodec(codec.encoded_bytes, codec.raw_bytes / 4e9)}
    st.close()


def test_remote_read_is_priced_in_encoded_bytes_plus_decode():
    from kvstore.restore.planner import remote_worth_reading

    prof = CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(20e9),
                              "remote->host": LinkCost(1e8, 1e-3)},
                       recompute=ComputeCost(1e13), prefill=ComputeCost(1e12))  # 256 tokens: ~26 ms
    n = 16
    assert not remote_worth_reading(prof, LAYOUT, BT, n)  # raw over a 100 MB/s link: prefill is faster
    fast = TierCodec(encoded_bytes=RAW // 4, decode_s=RAW / 4e9)
    assert remote_worth_reading(prof, LAYOUT, BT, n, codec=fast)  # a quarter of the bytes wins
    slow = TierCodec(encoded_bytes=RAW // 4, decode_s=1.0)
    assert not remote_worth_reading(prof, LAYOUT, BT, n, codec=slow)  # unless decoding costs more
