"""What a model's KV cache looks like, and so how many bytes a block of it takes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from allocator.rowcopy import pair_runs, slot_runs  # runs of consecutive slots: owned by allocator, named here

__all__ = ["ModelLayout", "PoolLayout", "as_block_rows", "dtype_from_name", "dtype_name", "from_block_rows",
           "pair_runs", "slot_runs"]

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a name such as 'float16', got {type(name).__name__} {name!r:.40}")
    key = name.removeprefix("torch.")
    try:
        return _DTYPES[key]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelLayout:
    """The shape of one model's per-token KV and of the activations recompute needs.

    KV of ``T`` tokens is ``[num_layers, 2, T, num_kv_heads, head_dim]`` (K then V);
    activations are ``[num_layers, T, hidden_size]``. For an MHA model the activations are
    half the KV's bytes; for a GQA model (``num_kv_heads * head_dim < hidden_size / 2``)
    they are larger, which is why transfer wins there.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_from_name(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelLayout.{name} must be a positive int, got {value!r}")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def act_bytes_per_token(self) -> int:
        return self.num_layers * self.hidden_size * self.itemsize

    def kv_block_bytes(self, block_tokens: int) -> int:
        return self.kv_bytes_per_token * block_tokens

    def act_block_bytes(self, block_tokens: int) -> int:
        return self.act_bytes_per_token * block_tokens

    def kv_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, tokens, self.num_kv_heads, self.head_dim)

    def block_shape(self, block_tokens: int) -> tuple[int, int, int, int, int]:
        """One block's KV, ``(layers, 2, block_tokens, kv_heads, head_dim)``: a store slot's shape. O(1)."""
        return (self.num_layers, 2, block_tokens, self.num_kv_heads, self.head_dim)

    def act_shape(self, tokens: int) -> tuple[int, int, int]:
        return (self.num_layers, tokens, self.hidden_size)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_size": self.hidden_size,
                "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelLayout":
        return cls(**{k: d[k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "dtype")})


class PoolLayout(str, Enum):
    """How an engine lays out its paged KV pool: the one place that says so.

    ``num_blocks`` pool blocks of ``block_size`` tokens each; the store's rows are always
    ``[tokens, kv_heads, head_dim]`` per layer and K/V (see :meth:`kv_rows`):

    * ``CROSS_LAYER`` -- one tensor ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``:
      a pool block is laid out exactly like a store slot (when ``block_size`` is the store's);
    * ``BLOCK_MAJOR`` -- one tensor per layer ``[2, num_blocks, block_size, kv_heads,
      head_dim]`` (vLLM's CUDA FlashAttention backends);
    * ``HEAD_MAJOR`` -- one tensor per layer ``[2, num_blocks, kv_heads, block_size,
      head_dim]`` (K and V apart, heads outermost within a block);
    * ``HEAD_MAJOR_PACKED`` -- one tensor per layer ``[num_blocks, kv_heads, block_size,
      2 * head_dim]``, K in the first ``head_dim`` of the last axis and V in the second
      (what vLLM 0.32's CPU attention backend hands a KV connector: its "LBHNC" layout).
    """

    CROSS_LAYER = "cross_layer"
    BLOCK_MAJOR = "block_major"
    HEAD_MAJOR = "head_major"
    HEAD_MAJOR_PACKED = "head_major_packed"

    @property
    def per_layer(self) -> bool:
        return self is not PoolLayout.CROSS_LAYER

    def num_blocks(self, layer: torch.Tensor) -> int:
        """Blocks in one layer's tensor (per-layer layouts). O(1)."""
        return layer.shape[0] if self is PoolLayout.HEAD_MAJOR_PACKED else layer.shape[1]

    def layer_shape(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The shape of one layer's tensor (per-layer layouts only)."""
        if self is PoolLayout.HEAD_MAJOR:
            return (2, num_blocks, kv_heads, block_size, head_dim)
        if self is PoolLayout.HEAD_MAJOR_PACKED:
            return (num_blocks, kv_heads, block_size, 2 * head_dim)
        if self is PoolLayout.BLOCK_MAJOR:
            return (2, num_blocks, block_size, kv_heads, head_dim)
        raise ValueError("a cross-layer pool has no per-layer tensors")

    def shape_doc(self) -> str:
        return {PoolLayout.CROSS_LAYER: "[num_blocks, layers, 2, block_size, kv_heads, head_dim]",
                PoolLayout.BLOCK_MAJOR: "[2, num_blocks, block_size, kv_heads, head_dim] per layer",
                PoolLayout.HEAD_MAJOR: "[2, num_blocks, kv_heads, block_size, head_dim] per layer",
                PoolLayout.HEAD_MAJOR_PACKED: "[num_blocks, kv_heads, block_size, 2 * head_dim] per layer"}[self]

    def kv_rows(self, layer: torch.Tensor, kv: int, split: int) -> torch.Tensor:
        """A view ``[num_blocks, split, block_size / split, kv_heads, head_dim]`` of one
        layer's K (``kv=0``) or V half: pool block ``b``'s ``j``-th run of ``block_size /
        split`` tokens is ``[b, j]``. No copy (a strided view); O(1)."""
        if self is PoolLayout.HEAD_MAJOR_PACKED:
            n, h, bs, d2 = layer.shape
            d = d2 // 2
            return layer[..., kv * d:(kv + 1) * d].view(n, h, split, bs // split, d).permute(0, 2, 3, 1, 4)
        half = layer[kv]
        n = half.shape[0]
        if self is PoolLayout.HEAD_MAJOR:
            _, h, bs, d = half.shape
            return half.view(n, h, split, bs // split, d).permute(0, 2, 3, 1, 4)
        if self is PoolLayout.BLOCK_MAJOR:
            _, bs, h, d = half.shape
            return half.view(n, split, bs // split, h, d)
        raise ValueError("a cross-layer pool has no per-layer tensors")


def as_block_rows(kv: torch.Tensor, block_tokens: int, nb: int | None = None) -> torch.Tensor:
    """KV ``[layers, 2, T, kv_heads, head_dim]`` seen as block rows ``[nb, layers, 2,
    block_tokens, kv_heads, head_dim]``: row ``i`` is block ``i`` of the prefix, laid out like
    a store slot, so tiers and copies take it row by row.

    The one place this view is derived (the engine layouts and codecs build on it). ``nb``
    defaults to the whole blocks in ``T``; a partial trailing block is left out. Always a
    strided view sharing ``kv``'s storage (splitting the token axis never needs a copy), for
    any strides and any device. O(1).
    """
    if kv.dim() != 5:
        raise ValueError(f"KV must be [layers, 2, T, kv_heads, head_dim], got shape {tuple(kv.shape)}")
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    whole = kv.shape[2] // block_tokens
    if nb is None:
        nb = whole
    elif not 0 <= nb <= whole:
        raise ValueError(f"{nb} blocks of {block_tokens} tokens do not fit in {kv.shape[2]} tokens")
    return kv[:, :, : nb * block_tokens].unflatten(2, (nb, block_tokens)).permute(2, 0, 1, 3, 4, 5)


def from_block_rows(rows: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_block_rows`: rows ``[nb, layers, 2, bt, kv_heads, head_dim]``
    as KV ``[layers, 2, nb * bt, kv_heads, head_dim]``.

    A view (O(1)) when the rows' block and token axes can merge, i.e. the block stride is
    ``bt`` times the token stride -- true of any :func:`as_block_rows` view of a
    contiguous KV. Otherwise (e.g. contiguous rows, as a slot arena or a cross-layer pool
    holds them, where a block's layers sit between its tokens and the next block's) no
    such view exists and this returns a copy, O(nb * block bytes).
    """
    if rows.dim() != 6:
        raise ValueError(f"block rows must be [nb, layers, 2, bt, kv_heads, head_dim], got shape {tuple(rows.shape)}")
    return rows.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
