"""Issue 24: the block codecs alone -- round trips, the error bounds each lossy codec states
(per group, against its stored scale), and the encoded size that capacity counts.

KV here has the structure that makes key quantisation hard: a few key channels carry
outliers 20x the rest (per-channel outliers, as in real models)."""

from __future__ import annotations

import pytest
import torch

from allocator.codec_arena import CodecArena
from allocator.codecs import CODECS, codec_problem, make_codec
from allocator import CorruptSlotError, DiskArena, MemoryArena

SHAPE = (2, 2, 16, 4, 64)  # layers, K/V, block_tokens, kv_heads, head_dim
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative Frobenius error each lossy codec must stay under (K, V), on the data below: the
# measured figures (bf16) are int8 0.5%/0.6%, fp8 2.2%/2.5%, int4 8.6%/10.8%; the bounds
# leave room for dtype rounding, not for a worse grouping (per-token key groups on this
# data: int8 K 1.4%, int4 K 17.6%).
FROB = {"int8": (0.01, 0.01), "fp8": (0.035, 0.035), "int4": (0.12, 0.14)}


def kv_blocks(n: int, dtype: torch.dtype, seed: int, outliers: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    channels = torch.randperm(SHAPE[-1], generator=g)[:4]
    x[:, :, 0, :, :, channels] *= outliers  # per-channel key outliers
    return x.to(dtype)


def roundtrip(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codec = make_codec(name, SHAPE, x.dtype)
    enc = torch.empty((x.shape[0], codec.encoded_bytes), dtype=torch.uint8, device=x.device)
    codec.encode(x, enc)
    out = torch.empty_like(x)
    codec.decode(enc, out)
    return out, enc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["none", "lossless"])
def test_exact_codecs_are_byte_exact(name, dtype, seed, device):
    x = kv_blocks(5, dtype, seed).to(device)
    out, _ = roundtrip(name, x)
    assert torch.equal(out.view(torch.uint8) if dtype != torch.float32 else out, x.view(torch.uint8)
                       if dtype != torch.float32 else x)
    assert torch.equal(out.cpu().view(torch.int8 if dtype != torch.float32 else torch.int32).flatten(),
                       x.cpu().view(torch.int8 if dtype != torch.float32 else torch.int32).flatten())


def test_lossless_stores_incompressible_blocks_raw_and_compresses_regular_ones(seed):
    codec = make_codec("lossless", SHAPE, torch.bfloat16)
    noise = torch.randint(-2**15, 2**15, (1, *SHAPE), dtype=torch.int16).view(torch.bfloat16)
    smooth = torch.zeros(1, *SHAPE, dtype=torch.bfloat16)
    smooth[..., :8] = 1.5
    for x in (noise, smooth):
        enc = torch.empty((1, codec.encoded_bytes), dtype=torch.uint8)
        codec.encode(x, enc)
        out = torch.empty_like(x)
        codec.decode(enc, out)
        assert torch.equal(out.view(torch.int16), x.view(torch.int16))
    flag_noise_len = codec.stored_bytes  # both counted: the smooth block shrank a lot
    assert codec.achieved_ratio is not None and codec.achieved_ratio > 1.5, flag_noise_len


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["int8", "fp8", "int4"])
def test_lossy_error_bounds_with_key_channel_outliers(name, dtype, seed, device):
    x = kv_blocks(6, dtype, seed).to(device)
    out, enc = roundtrip(name, x)
    codec = make_codec(name, SHAPE, dtype)
    xf, of = x.float(), out.float()
    for which, bound in enumerate(FROB[name]):
        rel = ((of[:, :, which] - xf[:, :, which]).norm() / xf[:, :, which].norm()).item()
        assert rel < bound, f"{name} {'KV'[which]} relative Frobenius error {rel:.4f} >= {bound}"
    ks, vs = codec._scales(enc)
    ks, vs = ks.float(), vs.float()
    # the dtype's own rounding of the decoded value: half an ulp of the largest element
    ulp = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    for which, s in ((0, ks), (1, vs)):
        err = (of[:, :, which] - xf[:, :, which]).abs()
        mag = xf[:, :, which].abs()
        if name in ("int8", "int4"):  # half a quantisation step per element
            limit = s / 2 + mag * ulp + 1e-30
        else:  # e4m3: 3 mantissa bits -> 2^-4 of the value, 2^-10 of the scale near zero
            limit = mag * 2**-4 + s * 2**-9 + mag * ulp + 1e-30
        worst = (err / limit.expand_as(err)).max().item()
        assert worst <= 1.0 + 1e-3, f"{name} {'KV'[which]}: an error {worst:.3f}x its bound against the group's scale"


def test_key_groups_are_per_channel(seed):
    """The grouping is what the docstring says: one key scale per (layer, head, dim), one
    value scale per (layer, token, head); an outlier channel does not widen its neighbours'."""
    x = kv_blocks(1, torch.float32, seed, outliers=1.0)
    x[:, :, 0, :, :, 3] *= 100.0
    out, enc = roundtrip("int4", x)
    others = [c for c in range(SHAPE[-1]) if c != 3]
    rel = ((out[..., 0, :, :, others] - x[..., 0, :, :, others]).norm() / x[..., 0, :, :, others].norm()).item()
    assert rel < 0.12, f"non-outlier key channels lost precision to the outlier ({rel:.3f})"


def test_encoded_sizes_give_the_capacity_multipliers():
    ratios = {n: make_codec(n, (32, 2, 16, 8, 128), torch.bfloat16).ratio for n in ("int8", "fp8", "int4")}
    assert ratios["int8"] == ratios["fp8"] and 1.8 < ratios["int8"] < 2.0
    assert 3.3 < ratios["int4"] < 3.6
    assert 3.6 < make_codec("int8", (32, 2, 16, 8, 128), torch.float32).ratio < 4.0


def test_unknown_codec_and_problems():
    assert codec_problem("int3") and "int3" in codec_problem("int3")
    assert all(codec_problem(n) is None for n in CODECS)
    with pytest.raises(ValueError):
        make_codec("zip", SHAPE, torch.float16)
    with pytest.raises(ValueError):
        make_codec("int8", SHAPE, torch.int32)


@pytest.mark.parametrize("name", ["int8", "int4", "lossless"])
def test_codec_arena_decodes_into_strided_rows_and_catches_damaged_encoded_bytes(name, tmp_path, seed):
    codec = make_codec(name, SHAPE, torch.bfloat16)
    disk = CodecArena(DiskArena(tmp_path / "s.slab", 8, codec.encoded_bytes), codec)
    mem = CodecArena(MemoryArena(8, codec.encoded_bytes, device="cpu"), codec)
    x = kv_blocks(4, torch.bfloat16, seed)
    want, _ = roundtrip(name, x)
    for arena in (mem, disk):
        arena.write([5, 1, 2, 3], x)
        # the caller's KV [L, 2, T, H, D] seen as block rows: a strided destination
        kv = torch.zeros(SHAPE[0], 2, 4 * SHAPE[2], *SHAPE[3:], dtype=torch.bfloat16)
        rows = kv.view(SHAPE[0], 2, 4, SHAPE[2], *SHAPE[3:]).permute(2, 0, 1, 3, 4, 5)
        arena.read([5, 1, 2, 3], rows)
        assert torch.equal(rows.contiguous(), want)
    # one flipped byte of an encoded row on disk: that block is reported, the others are valid
    with open(disk.inner.path, "r+b") as f:
        f.seek(disk.inner.data_offset + 2 * disk.inner.stride + 40)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    out = torch.zeros(4, *SHAPE, dtype=torch.bfloat16)
    with pytest.raises(CorruptSlotError) as info:
        disk.read([5, 1, 2, 3], out)
    assert info.value.slots == [2]
    assert torch.equal(out[[0, 1, 3]], want[[0, 1, 3]])
    disk.close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["lossless", "int8", "fp8", "int4"])
def test_encode_leaves_the_source_untouched(name, dtype, seed):
    x = kv_blocks(2, dtype, seed)
    before = x.clone()
    codec = make_codec(name, SHAPE, dtype)
    codec.encode(x, torch.empty((2, codec.encoded_bytes), dtype=torch.uint8))
    assert torch.equal(x, before)


def test_encoded_bytes_cross_through_the_copy_primitive_and_are_waited_for(seed):
    """A demotion from the device tier encodes on the device and moves *encoded* bytes to the
    host arena through the copier, waited for before the host arena keeps them (the delayed-
    copy double poisons a host-bound copy until the wait names its device)."""
    from tests.delayed_copies import DelayedCopier

    copier = DelayedCopier()
    codec = make_codec("int8", SHAPE, torch.bfloat16)
    arena = CodecArena(MemoryArena(4, codec.encoded_bytes, device="cpu", copier=copier), codec)
    x = kv_blocks(2, torch.bfloat16, seed)
    src = copier.put_on(x.clone(), "dev0")  # the device tier's rows
    arena.write([3, 1], src)
    assert copier.crossings >= 1 and copier.in_flight() == 0
    dst = copier.put_on(torch.zeros_like(x), "dev0")  # restored into device memory
    arena.read([3, 1], dst)
    want, _ = roundtrip("int8", x)
    assert torch.equal(dst, want)


def test_lossless_shuffles_at_the_element_size(seed):
    """Gaussian bf16 compresses only through its regular sign/exponent bits: without the
    shuffle at the element size (the typesize) Blosc gets 1.00x; with it, about 1.25x."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, 2, 16, 8, 128)
    x = torch.randn(4, *shape, generator=g).to(torch.bfloat16)
    codec = make_codec("lossless", shape, torch.bfloat16)
    enc = torch.empty((4, codec.encoded_bytes), dtype=torch.uint8)
    codec.encode(x, enc)
    assert codec.achieved_ratio > 1.15, codec.achieved_ratio
    out = torch.empty_like(x)
    codec.decode(enc, out)
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("tokens", [1, 3, 7, 15, 16, 32])
def test_group_absmax_over_tokens_any_block_size(tokens, seed):
    from allocator.codecs import _absmax

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, tokens, 4, 8, generator=g).to(torch.bfloat16)[:, :, 0]  # strided like a block's K
    assert torch.equal(_absmax(x, 2), x.abs().amax(2, keepdim=True))
    assert torch.equal(_absmax(x, -1), x.abs().amax(-1, keepdim=True))
