"""``as_block_rows``/``from_block_rows``: the one view of KV as block rows, and its inverse."""

from __future__ import annotations

import pytest
import torch

from kvstore.layout import ModelLayout, as_block_rows, from_block_rows

BT = 4


def _kv(layout: ModelLayout, tokens: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(tokens), generator=g).to(layout.dtype).to(device)


def test_block_shape_is_one_slot_of_kv(layout):
    assert layout.block_shape(BT) == (layout.num_layers, 2, BT, layout.num_kv_heads, layout.head_dim)
    assert layout.block_shape(BT) == layout.kv_shape(BT)
    assert torch.Size(layout.block_shape(BT)).numel() * layout.itemsize == layout.kv_block_bytes(BT)


def test_row_i_is_block_i_and_shares_storage(layout, device, seed):
    kv = _kv(layout, 3 * BT, device, seed)
    rows = as_block_rows(kv, BT)
    assert rows.shape == (3, *layout.block_shape(BT))
    assert rows.device == kv.device
    for i in range(3):
        assert torch.equal(rows[i], kv[:, :, i * BT:(i + 1) * BT])
    assert rows.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    rows[1, 0, 1, 2].fill_(7)  # a write through the view lands in the KV
    assert torch.all(kv[0, 1, BT + 2] == 7)


def test_round_trip_is_the_same_tensor_view(layout, device, seed):
    kv = _kv(layout, 5 * BT, device, seed)
    back = from_block_rows(as_block_rows(kv, BT))
    assert back.shape == kv.shape
    assert torch.equal(back, kv)
    assert back.data_ptr() == kv.data_ptr() and back.stride() == kv.stride()  # a view, not a copy


def test_contiguous_rows_come_back_as_a_copy_with_the_same_bytes(layout, device, seed):
    kv = _kv(layout, 3 * BT, device, seed)
    rows = as_block_rows(kv, BT).contiguous()  # laid out like slots in an arena
    back = from_block_rows(rows)
    assert torch.equal(back, kv)
    assert back.data_ptr() != rows.data_ptr()


def test_odd_token_count_drops_the_partial_tail(layout, device, seed):
    kv = _kv(layout, 3 * BT + 3, device, seed)
    rows = as_block_rows(kv, BT)
    assert rows.shape[0] == 3
    assert torch.equal(from_block_rows(rows), kv[:, :, : 3 * BT])
    two = as_block_rows(kv, BT, 2)
    assert two.shape[0] == 2 and torch.equal(two, rows[:2])
    with pytest.raises(ValueError, match="do not fit"):
        as_block_rows(kv, BT, 4)
    with pytest.raises(ValueError, match="do not fit"):
        as_block_rows(kv, BT, -1)


def test_no_blocks(layout, device, seed):
    kv = _kv(layout, BT - 1, device, seed)
    for rows in (as_block_rows(kv, BT), as_block_rows(kv, BT, 0)):
        assert rows.shape == (0, *layout.block_shape(BT))
        assert from_block_rows(rows).shape == layout.kv_shape(0)


def test_a_non_contiguous_kv_is_viewed_not_copied(layout, device, seed):
    wide = _kv(layout, 4 * BT, device, seed)
    kv = wide[:, :, ::2]  # every other token: strided along T
    assert not kv.is_contiguous()
    rows = as_block_rows(kv, BT)
    assert rows.shape == (2, *layout.block_shape(BT))
    assert rows.data_ptr() == kv.data_ptr()
    for i in range(2):
        assert torch.equal(rows[i], kv[:, :, i * BT:(i + 1) * BT])
    back = from_block_rows(rows)
    assert torch.equal(back, kv) and back.data_ptr() == kv.data_ptr()
    heads_last = _kv(layout, 2 * BT, device, seed).transpose(3, 4).contiguous().transpose(3, 4)
    assert torch.equal(as_block_rows(heads_last, BT)[1], heads_last[:, :, BT:])


def test_bad_shapes_are_refused(layout):
    with pytest.raises(ValueError, match="layers, 2, T"):
        as_block_rows(torch.zeros(2, 2, 8, 4), BT)
    with pytest.raises(ValueError, match="positive"):
        as_block_rows(torch.zeros(layout.kv_shape(8)), 0)
    with pytest.raises(ValueError, match="nb, layers"):
        from_block_rows(torch.zeros(layout.kv_shape(8)))
