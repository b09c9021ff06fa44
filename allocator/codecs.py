"""Block codecs: how a tier stores a block of KV in fewer bytes (and how it gets it back).

A block is ``[layers, 2, block_tokens, kv_heads, head_dim]`` of a float dtype (the codec is
told the shape and dtype once); an encoded block is one ``uint8`` row of ``encoded_bytes``,
a fixed size, so a tier's slots hold encoded rows and capacity counts encoded bytes.

Codecs (``make_codec(name, block_shape, dtype)``):

- ``none``: the raw bytes (the arena's row is the block).
- ``lossless``: Blosc (numcodecs: bit shuffle + LZ4) of the raw bytes, byte-exact back.
  The row keeps a 16-byte header (flag, payload length); a block that does not shrink is
  stored raw under the same header. Slots stay sized for the raw block (a fixed-size slot
  cannot count on a ratio no data promises), so lossless keeps exactly as many blocks as
  ``none``; see docs/decisions.md for what it is then for.
- ``int8``, ``fp8`` (e4m3), ``int4`` (two per byte): symmetric quantisation with one scale
  per group, scales (bf16, so any float32 range fits) stored in the same row after the
  data. Groups follow KIVI: **keys per channel** -- one scale per (layer, head, dim) over
  the block's ``block_tokens`` tokens, because keys carry per-channel outliers (a few
  channels 10-100x the rest) and a per-token group would spend the whole code range on
  them; **values per token** -- one scale per (layer, token, head) over ``head_dim``,
  because values have no channel structure and the attention output mixes them per token.
  Measured (tests/allocator/test_codecs.py, bf16, 16-token blocks, head_dim 64, keys with
  20x outliers in 4 of 64 channels): relative Frobenius error of keys int8 0.53%, fp8 2.2%,
  int4 8.4% (values 0.6%, 2.5%, 10.8%); per-token key groups on the same data: int8 1.4%,
  int4 17.6% (the outlier channels set every token's scale). Smaller groups would cost more scale bytes: at 16 tokens the
  key scales are 1/16 of a scale per element (12.5% of int8's bytes with a bf16 scale) --
  the block is the natural group and needs no state across blocks.

  Quantisation uses the *stored* (bf16-rounded) scale, so the error per element is at most
  half a step: ``|x - x'| <= scale / 2`` for int8/int4 (``scale = absmax / qmax``), and for
  fp8 at most 2^-4 of the element's magnitude or 2^-10 of the scale near zero (e4m3 keeps
  3 mantissa bits), before the final rounding to the block's dtype.

Every operation is a handful of vectorised torch ops over the whole batch of blocks (on the
tensors' device, CUDA included); decoding writes straight into the destination rows (any
strides) with one multiply per half of the block. Only ``lossless`` loops per block (one
Blosc call each: the library compresses one buffer at a time, multi-threaded inside).

Imports nothing of this project.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
import math

import torch

CODECS = ("none", "lossless", "fp8", "int8", "int4")
LOSSY = frozenset({"fp8", "int8", "int4"})
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ALIGN = 16  # encoded rows are padded to a multiple of this (aligned views of scales)
_SCALE = torch.bfloat16
#: keeps the sign bit and the 7 shifted e4m3 bits of a sign-extended byte shifted left by 7
_F16_FROM_E4M3_MASK = -16512  # 0xBF80 as int16


class CodecUnavailableError(RuntimeError):
    """The codec cannot run here (a library or a torch dtype is missing)."""


def codec_problem(name: str) -> str | None:
    """Why codec ``name`` cannot be used in this process, or None when it can."""
    if name not in CODECS:
        return f"unknown codec {name!r}; choose one of {', '.join(CODECS)}"
    if name == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        return f"codec 'fp8' needs a torch with float8_e4m3fn (this is torch {torch.__version__})"
    if name == "lossless":
        try:
            import numcodecs.blosc  # noqa: F401
        except ImportError:
            return "codec 'lossless' needs numcodecs (pip install 'kvstore[codecs]')"
    return None


class Codec(ABC):
    """Encodes ``[n, *block_shape]`` tensors of ``dtype`` into ``[n, encoded_bytes]`` uint8 rows."""

    name: str = ""
    lossy: bool = False

    def __init__(self, block_shape: Sequence[int], dtype: torch.dtype) -> None:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"codecs take {', '.join(map(str, FLOAT_DTYPES))} blocks, not {dtype}")
        if len(block_shape) != 5 or block_shape[1] != 2:
            raise ValueError(f"a KV block is [layers, 2, block_tokens, kv_heads, head_dim], got {tuple(block_shape)}")
        self.block_shape = tuple(int(x) for x in block_shape)
        self.dtype = dtype
        self.raw_bytes = math.prod(self.block_shape) * torch.empty((), dtype=dtype).element_size()

    @property
    @abstractmethod
    def encoded_bytes(self) -> int:
        """Bytes of one encoded block (the slot size of a tier using this codec)."""

    @property
    def ratio(self) -> float:
        """Raw bytes per encoded byte of one slot (what the tier's capacity is multiplied by)."""
        return self.raw_bytes / self.encoded_bytes

    @abstractmethod
    def encode(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """Encode ``src`` (``[n, *block_shape]``, any strides) into ``out`` (``[n, encoded_bytes]``
        uint8 rows, each row contiguous, on the same device). O(bytes)."""

    @abstractmethod
    def decode(self, enc: torch.Tensor, out: torch.Tensor) -> None:
        """Decode ``enc`` (``[n, encoded_bytes]`` uint8) into ``out`` (``[n, *block_shape]`` of the
        codec's dtype, any strides with a contiguous last dim, same device). O(bytes)."""

    def spec(self) -> str:
        """What a reader must agree on to read this codec's rows (name, shape, dtype)."""
        return f"{self.name}:{'x'.join(map(str, self.block_shape))}:{str(self.dtype).removeprefix('torch.')}"


class RawCodec(Codec):
    """``none``: the block's own bytes."""

    name = "none"

    @property
    def encoded_bytes(self) -> int:
        return self.raw_bytes

    def encode(self, src: torch.Tensor, out: torch.Tensor) -> None:
        out.view(self.dtype).view(src.shape).copy_(src)

    def decode(self, enc: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(enc.view(self.dtype).view(out.shape))


class LosslessCodec(Codec):
    """``lossless``: Blosc with bit shuffle (at the element size) and LZ4, per block.

    Row: ``[flag u32 (0 raw, 1 blosc)][length u32][8 reserved][payload]``. The shuffle groups
    the bits of equal significance (a float's sign and exponent bits are far more regular
    than its mantissa bits), which is where KV's redundancy lies. Measured on Gaussian bf16
    (2 MiB): LZ4 + bit shuffle 1.25x, decode 2.6 GB/s, encode 1.0 GB/s; LZ4 + byte shuffle
    1.15x; zstd + byte shuffle 1.43x but decode 1.2 GB/s and encode 0.03 GB/s at level 5 --
    LZ4 + bit shuffle keeps decode near memcpy speed.
    """

    name = "lossless"
    HEADER = 16

    def __init__(self, block_shape: Sequence[int], dtype: torch.dtype, *, cname: str = "lz4",
                 clevel: int = 5) -> None:
        super().__init__(block_shape, dtype)
        problem = codec_problem("lossless")
        if problem:
            raise CodecUnavailableError(problem)
        from numcodecs import blosc
        self._blosc = blosc
        self._cname, self._clevel = cname, clevel
        self._typesize = torch.empty((), dtype=dtype).element_size()
        self.stored_bytes = 0  # payload bytes written (for the achieved ratio)
        self.stored_blocks = 0

    @property
    def encoded_bytes(self) -> int:
        return -(-(self.raw_bytes + self.HEADER) // _ALIGN) * _ALIGN

    def encode(self, src: torch.Tensor, out: torch.Tensor) -> None:
        host = src.detach().to("cpu").contiguous().view(torch.uint8).reshape(src.shape[0], -1).numpy()
        rows = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=torch.uint8)
        hdr = rows[:, :8].view(torch.int32).numpy()
        for i in range(host.shape[0]):
            packed = self._blosc.compress(host[i], self._cname.encode(), self._clevel, self._blosc.BITSHUFFLE,
                                          typesize=self._typesize)
            n = len(packed)
            if n < self.raw_bytes:
                rows[i, self.HEADER:self.HEADER + n] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
                flag = 1
            else:  # incompressible: stored raw under the same header
                rows[i, self.HEADER:self.HEADER + self.raw_bytes] = torch.from_numpy(host[i])
                flag, n = 0, self.raw_bytes
            hdr[i] = (flag, n)
            rows[i, self.HEADER + n:].zero_()  # defined bytes after the payload (checksums)
            self.stored_bytes += n + self.HEADER
            self.stored_blocks += 1
        if rows is not out:
            out.copy_(rows)

    def decode(self, enc: torch.Tensor, out: torch.Tensor) -> None:
        host = enc.to("cpu") if enc.device.type != "cpu" else enc
        hdr = host[:, :8].view(torch.int32).tolist()
        staging: torch.Tensor | None = None
        for i, (flag, n) in enumerate(hdr):
            if not 0 <= n <= self.raw_bytes or flag not in (0, 1):
                raise ValueError(f"malformed lossless row {i} (flag {flag}, length {n})")
            direct = out.device.type == "cpu" and out[i].is_contiguous()
            if direct:
                target = out[i]
            else:  # one block of staging, reused (strided or device destination)
                staging = torch.empty(self.block_shape, dtype=self.dtype) if staging is None else staging
                target = staging
            flat = target.view(-1).view(torch.uint8)
            payload = host[i, self.HEADER:self.HEADER + n]
            if flag == 1:
                self._blosc.decompress(payload.numpy(), flat.numpy())
            else:
                flat.copy_(payload)
            if not direct:
                out[i].copy_(target)

    @property
    def achieved_ratio(self) -> float | None:
        """Raw bytes per stored payload byte over every block encoded so far (None before any)."""
        return self.stored_blocks * self.raw_bytes / self.stored_bytes if self.stored_bytes else None


class QuantCodec(Codec):
    """Symmetric per-group quantisation (see the module docstring for the groups and bounds)."""

    lossy = True
    #: code range, bits per element
    qmax: float = 127.0
    bits: int = 8

    def __init__(self, block_shape: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__(block_shape, dtype)
        L, _, T, H, D = self.block_shape
        if self.bits == 4 and D % 2:
            raise ValueError(f"int4 packs two values per byte: head_dim must be even, got {D}")
        self.half = L * T * H * D  # elements of K (and of V)
        self.data_bytes = self.half * self.bits // 8
        self.kscales = L * H * D  # keys: one per channel over the block's tokens
        self.vscales = L * T * H  # values: one per token over head_dim
        self.k_off = 0
        self.v_off = self.data_bytes
        self.ks_off = 2 * self.data_bytes
        self.vs_off = self.ks_off + 2 * self.kscales
        self._encoded = -(-(self.vs_off + 2 * self.vscales) // _ALIGN) * _ALIGN

    @property
    def encoded_bytes(self) -> int:
        return self._encoded

    # -- views into encoded rows -----------------------------------------------------------
    def _scales(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = enc.shape[0]
        L, _, T, H, D = self.block_shape
        ks = enc[:, self.ks_off:self.ks_off + 2 * self.kscales].view(_SCALE).view(n, L, 1, H, D)
        vs = enc[:, self.vs_off:self.vs_off + 2 * self.vscales].view(_SCALE).view(n, L, T, H, 1)
        return ks, vs

    def _data(self, enc: torch.Tensor, which: int) -> torch.Tensor:
        off = self.k_off if which == 0 else self.v_off
        return enc[:, off:off + self.data_bytes]

    # -- encode ----------------------------------------------------------------------------
    def _group_scales(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """bf16 scales of absmax/qmax over ``dim`` (kept), rounded *up* so no code clips; an
        all-zero group gets scale 1 (its codes are 0)."""
        amax = _absmax(x, dim).float()
        s = (amax / self.qmax).clamp_min(torch.finfo(torch.float32).tiny)
        sb = s.to(_SCALE)
        sb = torch.where(sb.float() < s, torch.nextafter(sb, torch.full_like(sb, math.inf)), sb)
        return torch.where(amax == 0, torch.ones_like(sb), sb)

    def encode(self, src: torch.Tensor, out: torch.Tensor) -> None:
        n = src.shape[0]
        out[:, self.vs_off + 2 * self.vscales:].zero_()  # padding: defined bytes (checksums)
        ks, vs = self._scales(out)
        for which, dim, dst in ((0, 2, ks), (1, -1, vs)):  # keys over tokens, values over head_dim
            x = src[:, :, which]  # [n, L, T, H, D]
            s = self._group_scales(x, dim)
            dst.copy_(s)
            y = x.to(torch.float32, copy=True)  # never in place on the caller's fp32 KV
            self._store(y.mul_(1.0 / s.float()), self._data(out, which), n)

    @abstractmethod
    def _store(self, y: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        """Write codes of ``y`` (values already divided by their scale) into ``dst`` rows."""

    # -- decode ----------------------------------------------------------------------------
    def decode(self, enc: torch.Tensor, out: torch.Tensor) -> None:
        ks, vs = self._scales(enc)
        for which, s in ((0, ks), (1, vs)):
            self._load(self._data(enc, which), s if self.dtype == torch.bfloat16 else s.to(self.dtype),
                       out[:, :, which])

    @abstractmethod
    def _load(self, src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst = codes(src) * scale`` written into ``dst`` ([n, L, T, H, D], any strides)."""


class Int8Codec(QuantCodec):
    """``int8``: codes in [-127, 127]; decode is one int8 x scale multiply into the destination."""

    name = "int8"

    def _store(self, y: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        dst.view(torch.int8).view(n, *y.shape[1:]).copy_(y.round_())  # |y| <= 127: the scale is rounded up

    def _load(self, src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor) -> None:
        # a converting copy then a same-dtype multiply: both vectorised on the CPU, 2.7x faster
        # than one mixed int8 x bf16 multiply (measured at the arena's chunk size)
        dst.copy_(src.view(torch.int8).view(dst.shape))
        dst.mul_(scale)


class Fp8Codec(QuantCodec):
    """``fp8``: e4m3 (max 448) after dividing by the group's scale."""

    name = "fp8"
    qmax = 448.0

    def _store(self, y: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        dst.view(torch.float8_e4m3fn).view(n, *y.shape[1:]).copy_(y.clamp_(-448.0, 448.0))

    def _load(self, src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor) -> None:
        if dst.device.type != "cpu":
            dst.copy_(src.view(torch.float8_e4m3fn).view(dst.shape))
            dst.mul_(scale)
            return
        # torch's CPU conversion from float8 is scalar (~50x slower than this). An e4m3 byte
        # ``s eeee mmm`` shifted into a float16 as ``s 0eeee mmm0000000`` is exactly its value
        # times 2^-8, subnormals and zero included (both formats keep the hidden bit's rules);
        # the 2^8 goes into the scale (exact: a power of two).
        bits = torch.empty(dst.shape, dtype=torch.int16, device=dst.device)
        bits.copy_(src.view(torch.int8).view(dst.shape))  # sign-extends the byte
        bits.bitwise_left_shift_(7).bitwise_and_(_F16_FROM_E4M3_MASK)
        dst.copy_(bits.view(torch.float16))
        dst.mul_(scale * 256)


class Int4Codec(QuantCodec):
    """``int4``: codes in [-7, 7] stored +8 as nibbles, two neighbours along head_dim per byte
    (low nibble first)."""

    name = "int4"
    qmax = 7.0
    bits = 4

    def _store(self, y: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        q = y.round_().add_(8).to(torch.uint8)  # |y| <= 7: the scale is rounded up
        pairs = q.view(*q.shape[:-1], q.shape[-1] // 2, 2)
        dst.view(n, *q.shape[1:-1], q.shape[-1] // 2).copy_(pairs[..., 0] | (pairs[..., 1] << 4))

    def _load(self, src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor) -> None:
        D = dst.shape[-1]
        packed = src.view(*dst.shape[:-1], D // 2)
        pairs = dst.unflatten(-1, (D // 2, 2))
        lo = (packed & 15).view(torch.int8) - 8
        hi = (packed >> 4).view(torch.int8) - 8
        s_lo, s_hi = (scale[..., 0::2], scale[..., 1::2]) if scale.shape[-1] == D else (scale, scale)
        for half, codes, sc in ((pairs[..., 0], lo, s_lo), (pairs[..., 1], hi, s_hi)):
            half.copy_(codes)  # converting copy + same-dtype multiply: vectorised (see int8)
            half.mul_(sc)


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``|x|.amax(dim, keepdim=True)``. Over the innermost dim one ``aminmax`` pass; over an
    outer dim (keys: the block's tokens) a pairwise tree of elementwise maxima, which runs
    vectorised along the contiguous inner dims (measured 5x faster than torch's strided
    reduction over that dim). O(elements)."""
    if dim in (-1, x.dim() - 1):
        lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
        return torch.maximum(-lo, hi)
    a = x.abs()
    while a.shape[dim] > 1:
        size = a.shape[dim]
        half = size // 2
        m = torch.maximum(a.narrow(dim, 0, half), a.narrow(dim, half, half))
        if size % 2:  # the odd one out joins the first
            first = m.narrow(dim, 0, 1)
            first.copy_(torch.maximum(first, a.narrow(dim, size - 1, 1)))
        a = m
    return a


_CLASSES: dict[str, type[Codec]] = {"none": RawCodec, "lossless": LosslessCodec, "int8": Int8Codec,
                                    "fp8": Fp8Codec, "int4": Int4Codec}


def make_codec(name: str, block_shape: Sequence[int], dtype: torch.dtype) -> Codec:
    """The codec ``name`` for blocks of ``block_shape`` and ``dtype``; raises
    :class:`CodecUnavailableError` when it cannot run here, ``ValueError`` for a bad name."""
    problem = codec_problem(name)
    if problem:
        raise (ValueError if name not in CODECS else CodecUnavailableError)(problem)
    return _CLASSES[name](block_shape, dtype)
