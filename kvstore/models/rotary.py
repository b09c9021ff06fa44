"""Rotary position embedding of K, computed by the model's own modules.

Recompute rotates K exactly as the model does by calling the model's own rotary embedding
module (its ``inv_freq``, scaling type and attention scaling already folded in) for the
positions wanted, and the ``apply_rotary_pos_emb`` of the attention's own modeling module.
Nothing is re-derived from the config, so a new rotary family costs no code here. Partial
rotary (Phi-3, GPT-NeoX, Phi, StableLM: the first ``rot_dim`` of each head's dims rotated, the
rest passed through) is handled uniformly: the model's function is given only the rotated
slice; the rest is copied.

Which rotary module a layer uses: the base model's ``rotary_emb``; for a module whose
``forward`` takes a ``layer_type`` (Gemma3 from 5.x: one module, per-layer-type frequencies)
the layer's type from ``config.layer_types``; for a model with a separate
``rotary_emb_local`` (Gemma3 in 4.x) that one for the sliding layers; an attention's own
``rotary_emb`` where the base model has none. Refused: rope types whose frequencies depend
on the sequence length seen so far (``dynamic``, ``longrope``), since recomputing a block
cannot know it; a modeling module without ``apply_rotary_pos_emb``.

Cost per ``recompute_kv`` call: one rotary forward per distinct rotary (``O(T * rot_dim)``),
then per layer one elementwise pass over ``T * kv_heads * rot_dim`` values.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kvstore.models.compat import unsupported

#: RoPE types whose inverse frequencies and attention scaling are fixed at init, so K's
#: rotation depends only on the token's position.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


@dataclass(frozen=True)
class LayerRotary:
    """How one layer rotates K: ``module(x, position_ids[, layer_type]) -> (cos, sin)``, then ``apply``."""

    module: nn.Module
    layer_type: str | None
    apply: Callable[..., Any]
    rot_dim: int

    @property
    def key(self) -> tuple[int, str | None]:
        """Layers with equal keys share cos/sin (computed once per recompute call)."""
        return id(self.module), self.layer_type

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[1, T, rot_dim]`` for ``positions`` (``[T]``), in ``dtype``, as the model computes them."""
        probe = torch.empty((1, 1, 1), dtype=dtype, device=positions.device)
        args: tuple = (probe, positions[None])
        if self.layer_type is not None:
            args += (self.layer_type,)
        cos, sin = self.module(*args)
        return cos, sin

    def rotate(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``k`` ``[1, H, T, D]`` with its first ``rot_dim`` dims of every head rotated."""
        rot = k[..., : self.rot_dim]
        _, rotated = self.apply(rot.new_empty((1, 0) + tuple(rot.shape[2:])), rot, cos, sin)
        if self.rot_dim == k.shape[-1]:
            return rotated
        return torch.cat([rotated, k[..., self.rot_dim:]], dim=-1)


def _rope_type(module: nn.Module, layer_type: str | None) -> Any:
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(layer_type)
    return rope_type


def resolve(base: nn.Module, attn: nn.Module, config: Any, layer: int, head_dim: int) -> LayerRotary:
    """The rotary of ``layer`` (see module doc), checked to be position-only; else ``NotImplementedError``."""
    module = getattr(base, "rotary_emb", None)
    local = getattr(base, "rotary_emb_local", None)
    if local is not None and getattr(attn, "is_sliding", False):
        module = local
    if module is None:
        module = getattr(attn, "rotary_emb", None)
    if not isinstance(module, nn.Module):
        raise unsupported(f"{type(attn).__name__} in layer {layer} without a rotary embedding module")
    layer_type = None
    if "layer_type" in inspect.signature(module.forward).parameters:
        types = getattr(config, "layer_types", None)
        if not types or layer >= len(types):
            raise unsupported(f"a per-layer-type rotary embedding without config.layer_types (layer {layer})")
        layer_type = types[layer]
    rope_type = _rope_type(module, layer_type)
    if not isinstance(rope_type, str) or rope_type not in STATIC_ROPE_TYPES:
        raise unsupported(f"rope type {rope_type!r} in layer {layer} (handled: {sorted(STATIC_ROPE_TYPES)}; "
                          "dynamic and longrope frequencies depend on the sequence length)")
    apply = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if not callable(apply):
        raise unsupported(f"{type(attn).__module__} without apply_rotary_pos_emb")
    inv_freq = getattr(module, "inv_freq", None)
    if layer_type is not None:
        inv_freq = getattr(module, f"{layer_type}_inv_freq", inv_freq)
    if not isinstance(inv_freq, torch.Tensor):
        raise unsupported(f"rotary module {type(module).__name__} without inv_freq in layer {layer}")
    rot_dim = 2 * inv_freq.numel()
    if rot_dim > head_dim:
        raise unsupported(f"rotary of {rot_dim} dims on heads of {head_dim} in layer {layer}")
    return LayerRotary(module, layer_type, apply, rot_dim)
