"""Where a layer's K and V come from: one fused ``[2 * kv_heads * head_dim, hidden]`` matrix.

Every supported attention computes K and V as rows of one or two linear maps of the same
input (the post-norm hidden state): separate ``k_proj``/``v_proj``, a ``qkv_proj`` laid out
``q | k | v`` (Phi-3), per-head interleaved ``[heads, 3, head_dim]`` (GPT-NeoX, Falcon's
original layout), Falcon's grouped ``[kv_heads, q_per_kv + 2, head_dim]`` and multi-query
``[heads + 2, head_dim]`` layouts, and GPT-2's transposed ``Conv1D``. Each layout is a
function that names the rows of K and of V in the model's own weight; the adapter gathers
those rows once, at construction, so that recompute is one GEMM per layer whatever the
layout. Adding a layout is one function here and one name in ``families.py``.

Cost: construction copies the K/V rows of each layer's weight (the model's K/V projection
weights again in memory); ``O(1)`` work per call otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kvstore.models.compat import unsupported

#: Linear subclasses known to compute ``x @ W^T`` then ``+ b`` as two operations (two roundings
#: in low precision, which recompute reproduces); anything else, e.g. a quantised or
#: LoRA-wrapped projection, is refused by name.
_UNFUSED_BIAS_LINEARS = frozenset({"FalconLinear"})


@dataclass(frozen=True)
class KVProjection:
    """One layer's K/V as a single linear map of the activation ``x`` the adapter stores.

    ``kv = x @ weight^T + bias`` gives ``[T, 2 * kv_heads * head_dim]``: K's heads, then V's.
    ``module`` is the model's module whose input *is* ``x`` (the capture hook's target).
    ``cache_repeat``: how many times the model's own cache repeats each K/V head (Falcon's
    grouped layout caches K/V broadcast to every query head of the group; the store keeps
    one copy and the adapter checks the copies are equal when it captures).
    """

    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    kv_heads: int
    head_dim: int
    hidden: int
    cache_repeat: int = 1
    fused_bias: bool = True  # False: the model adds the bias after the matmul (FalconLinear)
    v_module: nn.Module | None = None  # separate V projection: capture checks it saw the same input


def _linear(attn: nn.Module, name: str, layer: int) -> nn.Linear:
    mod = getattr(attn, name, None)
    if mod is None:
        raise unsupported(f"attention {type(attn).__name__} in layer {layer} without {name!r}")
    if type(mod) is not nn.Linear and type(mod).__name__ not in _UNFUSED_BIAS_LINEARS:
        raise unsupported(f"{name} of type {type(mod).__name__} in layer {layer} "
                          "(quantised or wrapped projections)")
    return mod


def _head_dim(attn: nn.Module, config: Any) -> int:
    for value in (getattr(attn, "head_dim", None), getattr(attn, "head_size", None),
                  getattr(config, "head_dim", None)):
        if isinstance(value, int) and value > 0:
            return value
    return config.hidden_size // config.num_attention_heads


def _gather(weight: torch.Tensor, bias: torch.Tensor | None, k_rows: torch.Tensor, v_rows: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = torch.cat([k_rows, v_rows]).to(weight.device)
    with torch.no_grad():
        return (weight.detach().index_select(0, rows).contiguous(),
                None if bias is None else bias.detach().index_select(0, rows).contiguous())


def _head_rows(heads: torch.Tensor, stride: int, offset: int, head_dim: int) -> torch.Tensor:
    """Rows ``h * stride + offset + [0, head_dim)`` for each ``h`` in ``heads`` (in order)."""
    return (heads[:, None] * stride + offset + torch.arange(head_dim)[None, :]).reshape(-1)


def separate(attn: nn.Module, config: Any, layer: int) -> KVProjection:
    """``k_proj`` and ``v_proj`` (Llama, Mistral, Qwen, Gemma, OPT, ...)."""
    k, v = _linear(attn, "k_proj", layer), _linear(attn, "v_proj", layer)
    if (k.bias is None) != (v.bias is None):
        raise unsupported(f"k/v bias mismatch in layer {layer}")
    hd = _head_dim(attn, config)
    if k.out_features % hd or v.out_features != k.out_features or v.in_features != k.in_features:
        raise unsupported(f"k/v projection shapes {tuple(k.weight.shape)}/{tuple(v.weight.shape)} "
                          f"with head_dim {hd} in layer {layer}")
    with torch.no_grad():
        weight = torch.cat([k.weight, v.weight]).detach()
        bias = None if k.bias is None else torch.cat([k.bias, v.bias]).detach()
    return KVProjection(k, weight, bias, k.out_features // hd, hd, k.in_features, v_module=v)


def qkv_concat(attn: nn.Module, config: Any, layer: int) -> KVProjection:
    """``qkv_proj`` laid out ``q (heads * D) | k (kv_heads * D) | v (kv_heads * D)`` (Phi-3)."""
    mod = _linear(attn, "qkv_proj", layer)
    hd = _head_dim(attn, config)
    heads, kvh = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if mod.out_features != (heads + 2 * kvh) * hd:
        raise unsupported(f"qkv_proj of {mod.out_features} rows for {heads} heads, {kvh} kv heads, "
                          f"head_dim {hd} in layer {layer}")
    q = heads * hd
    weight, bias = _gather(mod.weight, mod.bias, torch.arange(q, q + kvh * hd), torch.arange(q + kvh * hd, q + 2 * kvh * hd))
    return KVProjection(mod, weight, bias, kvh, hd, mod.in_features)


def qkv_per_head(attn: nn.Module, config: Any, layer: int, name: str = "query_key_value") -> KVProjection:
    """Fused projection viewed as ``[heads, 3, head_dim]`` (GPT-NeoX; Falcon's original layout)."""
    mod = _linear(attn, name, layer)
    hd = _head_dim(attn, config)
    heads = config.num_attention_heads
    if mod.out_features != 3 * heads * hd:
        raise unsupported(f"{name} of {mod.out_features} rows for {heads} heads of {hd} in layer {layer}")
    idx = torch.arange(heads)
    weight, bias = _gather(mod.weight, mod.bias, _head_rows(idx, 3 * hd, hd, hd), _head_rows(idx, 3 * hd, 2 * hd, hd))
    return KVProjection(mod, weight, bias, heads, hd, mod.in_features, fused_bias=type(mod) is nn.Linear)


def falcon(attn: nn.Module, config: Any, layer: int) -> KVProjection:
    """Falcon's three fused layouts, chosen by the same config flags its ``_split_heads`` reads."""
    if getattr(config, "new_decoder_architecture", False):
        mod = _linear(attn, "query_key_value", layer)
        hd, heads = _head_dim(attn, config), config.num_attention_heads
        kvh = config.num_kv_heads
        if heads % kvh or mod.out_features != (heads + 2 * kvh) * hd:
            raise unsupported(f"falcon query_key_value of {mod.out_features} rows for {heads} heads, "
                              f"{kvh} kv heads in layer {layer}")
        group = heads // kvh + 2  # q heads of the group, then its k, then its v
        idx = torch.arange(kvh)
        weight, bias = _gather(mod.weight, mod.bias, _head_rows(idx, group * hd, (group - 2) * hd, hd),
                               _head_rows(idx, group * hd, (group - 1) * hd, hd))
        return KVProjection(mod, weight, bias, kvh, hd, mod.in_features, cache_repeat=heads // kvh,
                            fused_bias=type(mod) is nn.Linear)
    if getattr(config, "multi_query", False):
        mod = _linear(attn, "query_key_value", layer)
        hd, heads = _head_dim(attn, config), config.num_attention_heads
        if mod.out_features != (heads + 2) * hd:
            raise unsupported(f"falcon multi-query query_key_value of {mod.out_features} rows in layer {layer}")
        q = heads * hd
        weight, bias = _gather(mod.weight, mod.bias, torch.arange(q, q + hd), torch.arange(q + hd, q + 2 * hd))
        return KVProjection(mod, weight, bias, 1, hd, mod.in_features, fused_bias=type(mod) is nn.Linear)
    return qkv_per_head(attn, config, layer)


def conv1d(attn: nn.Module, config: Any, layer: int) -> KVProjection:
    """GPT-2's ``c_attn``: a ``Conv1D`` computing ``x @ W + b`` with ``W: [hidden, 3 * embed]`` (q|k|v)."""
    mod = getattr(attn, "c_attn", None)
    if mod is None or type(mod).__name__ != "Conv1D":
        raise unsupported(f"GPT-2 c_attn of type {type(mod).__name__} in layer {layer}")
    if getattr(attn, "is_cross_attention", False):
        raise unsupported(f"cross-attention in layer {layer}")
    hd, heads = _head_dim(attn, config), config.num_attention_heads
    embed = heads * hd
    if tuple(mod.weight.shape[1:]) != (3 * embed,):
        raise unsupported(f"GPT-2 c_attn of shape {tuple(mod.weight.shape)} in layer {layer}")
    weight, bias = _gather(mod.weight.t(), mod.bias, torch.arange(embed, 2 * embed), torch.arange(2 * embed, 3 * embed))
    return KVProjection(mod, weight, bias, heads, hd, mod.weight.shape[0])


LAYOUTS: dict[str, Callable[[nn.Module, Any, int], KVProjection]] = {
    "separate": separate,
    "qkv_concat": qkv_concat,
    "qkv_per_head": qkv_per_head,
    "falcon": falcon,
    "conv1d": conv1d,
}
