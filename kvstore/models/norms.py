"""Normalisation of K after its projection (Qwen3, Gemma3, OLMo2, Phi, StableLM), by the model's own module.

Some attentions normalise K before rotating it: per head (``k_norm`` of width ``head_dim``:
Qwen3, Gemma3; Phi's ``k_layernorm``; StableLM's per-head norms), over the whole projection
(width ``kv_heads * head_dim``: OLMo2) or over ``[kv_heads, head_dim]``. Recompute calls the
model's module on K shaped as the model shapes it, told apart by the module's normalised
shape; any other norm in the attention (on V, on a latent) is refused by name.

Cost: one call of the model's norm over ``T * kv_heads * head_dim`` values per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvstore.models.compat import unsupported

K_NORM_NAMES = ("k_norm", "k_layernorm")
Q_NORM_NAMES = ("q_norm", "q_layernorm")


@dataclass(frozen=True)
class KNorm:
    """``apply(k)`` for ``k`` ``[1, H, T, D]``: the model's norm, over the shape it normalises."""

    module: nn.Module
    over: str  # "head" ([.., D]), "heads" ([.., H, D]) or "projection" ([.., H * D])

    def apply(self, k: torch.Tensor) -> torch.Tensor:
        if self.over == "head":
            return self.module(k)
        _, heads, tokens, dim = k.shape
        tk = k.transpose(1, 2)  # [1, T, H, D]
        if self.over == "heads":
            return self.module(tk).transpose(1, 2)
        return self.module(tk.reshape(1, tokens, heads * dim)).view(1, tokens, heads, dim).transpose(1, 2)


def _normalised_shape(module: nn.Module) -> tuple[int, ...] | None:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return tuple(shape)
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


def resolve(attn: nn.Module, layer: int, kv_heads: int, head_dim: int) -> KNorm | None:
    """The K norm of ``attn`` (``None`` if it has none); anything else normalised is refused."""
    for name, child in attn.named_children():
        lowered = name.lower()
        if "norm" in lowered and name not in K_NORM_NAMES + Q_NORM_NAMES:
            raise unsupported(f"normalisation {name!r} ({type(child).__name__}) in the attention of layer {layer}")
    found = [(n, getattr(attn, n)) for n in K_NORM_NAMES if isinstance(getattr(attn, n, None), nn.Module)]
    if not found:
        return None
    if len(found) > 1:
        raise unsupported(f"two K norms ({[n for n, _ in found]}) in layer {layer}")
    name, module = found[0]
    per_head = getattr(module, "norms", None)
    if isinstance(per_head, nn.ModuleList):
        if len(per_head) != kv_heads or any(_normalised_shape(m) != (head_dim,) for m in per_head):
            raise unsupported(f"{name} with {len(per_head)} per-head norms for {kv_heads} heads in layer {layer}")
        return KNorm(module, "head")  # its forward splits dim 1, the heads of [1, H, T, D]
    shape = _normalised_shape(module)
    if shape == (head_dim,):
        return KNorm(module, "head")
    if shape == (kv_heads, head_dim):
        return KNorm(module, "heads")
    if shape == (kv_heads * head_dim,):
        return KNorm(module, "projection")
    raise unsupported(f"{name} ({type(module).__name__}) normalising shape {shape} in layer {layer} "
                      f"(kv_heads {kv_heads}, head_dim {head_dim})")
