"""Model adapters: capture a HF causal LM's KV and activations, and recompute KV from them.

``HFAdapter(model)`` wraps a ``transformers`` causal LM (Llama, Mistral, Qwen2, GPT-2, OPT)
and offers the three operations the transfer-or-recompute planner needs:

* ``capture(input_ids, past_kv=None) -> (kv, act)`` runs the model's own forward (the real
  prefill, so the KV is the model's own cache, byte for byte) and records, through forward
  pre-hooks, the activations recompute needs;
* ``recompute_kv(act, start_pos=0, layers=None, out=None) -> kv`` rebuilds the K/V of those
  tokens with **one GEMM per layer** over all the tokens at once (not one per block): the
  K and V projection weights of a layer are concatenated once, at construction, into a
  ``[2 * kv_heads * head_dim, hidden]`` matrix (and the biases likewise), so a layer's
  recompute is ``X @ W_kv^T + b_kv`` followed, for RoPE models, by the rotation of K;
* ``to_cache(kv)`` turns a restored ``[layers, 2, T, kv_heads, head_dim]`` tensor into a
  ``DynamicCache`` the model's ``forward``/``generate`` accept.

Which activations: the input to the K/V projections (post-norm), not the pre-norm
residual stream. Why:

* it is exactly what the K/V GEMM consumed, so recompute is just that GEMM (+ bias + RoPE):
  no norm weights to re-apply, no reduction to recompute, nothing architecture-specific
  beyond the projection, and no second source of rounding differences;
* it is uniform across norm placements: OPT's post-LN variant (``do_layer_norm_before=False``)
  feeds the raw residual into K/V, pre-LN models feed ``norm(residual)``; "the tensor that
  entered ``k_proj``" is right for both without special cases;
* it is well conditioned for storage: normalised activations have a bounded, per-token
  scale, whereas the residual stream grows with depth and loses relative precision when
  stored in fp16/bf16 (or quantised later);
* same bytes either way (``hidden`` values per token per layer).
The pre-norm residual would only win if we wanted to re-run more of the layer than K/V
(e.g. recompute the attention output too), which the store never does.

For GPT-2 and OPT the keys are not rotated; a token's position reaches its K/V only through
the learned position embedding already folded into the stored activations, so
``start_pos`` does not change their recompute (it is validated and otherwise ignored).

Anything not understood raises ``NotImplementedError`` naming it at construction: an
unsupported architecture, a RoPE type whose frequencies depend on the sequence length
(``dynamic``, ``longrope``) or that is partial, cross-attention, qk-norm, quantised or
otherwise non-standard projection modules. Sliding-window attention is accepted: it
changes which keys a query attends to, not the K/V values themselves (the activations
capture its effect on later layers), and ``capture``/``to_cache`` use full, non-sliding
cache layers so no token's KV is dropped.

Costs: ``capture`` is one forward pass; ``recompute_kv`` is ``O(L * T * hidden * 2 *
kv_heads * head_dim)`` flops in L GEMMs plus ``O(L * T * kv_heads * head_dim)`` for RoPE.
The fused weights cost extra memory equal to the model's K/V projection weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: model_type -> (attention class name, family)
_SUPPORTED: dict[str, tuple[str, str]] = {
    "llama": ("LlamaAttention", "rope"),
    "mistral": ("MistralAttention", "rope"),
    "qwen2": ("Qwen2Attention", "rope"),
    "gpt2": ("GPT2Attention", "gpt2"),
    "opt": ("OPTAttention", "linear_abs"),
}

#: RoPE types whose inverse frequencies and attention scaling are fixed at init (so K's
#: rotation depends only on the position), as computed by the model's own rotary module.
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})

_QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


@dataclass(frozen=True)
class _LayerWeights:
    """One layer's fused K/V projection: ``kv = x @ weight^T + bias`` (weight: [2*kvd, hidden])."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"HFAdapter does not support {what}; refusing rather than risk wrong KV")


class HFAdapter:
    """Capture and recompute the KV cache of a ``transformers`` causal LM (see module doc).

    Holds no mutable state after construction apart from the model reference and the fused
    K/V weights; safe to share between threads for ``recompute_kv`` (each call allocates
    its own outputs unless ``out`` is given).
    """

    def __init__(self, model: "nn.Module") -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _SUPPORTED:
            raise _unsupported(f"architecture {model_type!r} ({type(model).__name__}); "
                               f"supported: {sorted(_SUPPORTED)}")
        if getattr(config, "is_encoder_decoder", False):
            raise _unsupported("encoder-decoder models")
        self.model = model
        self.config = config
        self.model_type: str = model_type
        attn_cls, self._family = _SUPPORTED[model_type]
        self._base = getattr(model, model.base_model_prefix, model) if hasattr(model, "base_model_prefix") else model
        attns = self._attention_modules()
        for i, attn in enumerate(attns):
            if type(attn).__name__ != attn_cls:
                raise _unsupported(f"attention module {type(attn).__name__} in layer {i} (expected {attn_cls})")
            for name in _QK_NORM_NAMES:
                if getattr(attn, name, None) is not None:
                    raise _unsupported(f"qk-norm ({name}) in layer {i}")
        self._weights, kv_heads, head_dim, hidden = self._fuse(attns)
        self._rope_inv_freq: torch.Tensor | None = None
        self._rope_scale = 1.0
        if self._family == "rope":
            self._init_rope(head_dim)
        dtype = self._weights[0].weight.dtype
        self.layout = ModelLayout(num_layers=len(attns), num_kv_heads=kv_heads, head_dim=head_dim,
                                  hidden_size=hidden, dtype=dtype)
        self.device = self._weights[0].weight.device

    # ------------------------------------------------------------------ construction
    def _attention_modules(self) -> list["nn.Module"]:
        base = self._base
        if self.model_type == "gpt2":
            if getattr(self.config, "add_cross_attention", False):
                raise _unsupported("GPT-2 with add_cross_attention=True")
            return [block.attn for block in base.h]
        if self.model_type == "opt":
            return [layer.self_attn for layer in base.decoder.layers]
        return [layer.self_attn for layer in base.layers]

    def _fuse(self, attns: list["nn.Module"]) -> tuple[list[_LayerWeights], int, int, int]:
        """Concatenate each layer's K and V projections into one matrix (one GEMM per layer)."""
        out: list[_LayerWeights] = []
        kv_heads = head_dim = hidden = -1
        with torch.no_grad():
            for i, attn in enumerate(attns):
                if self.model_type == "gpt2":
                    c_attn = attn.c_attn
                    if type(c_attn).__name__ != "Conv1D":
                        raise _unsupported(f"GPT-2 c_attn of type {type(c_attn).__name__} in layer {i}")
                    embed = attn.embed_dim
                    # Conv1D computes x @ W + b with W: [hidden, 3*embed] ordered q|k|v.
                    weight = c_attn.weight[:, embed:3 * embed].t().contiguous()
                    bias = c_attn.bias[embed:3 * embed].clone()
                    heads, hd, hid = attn.num_heads, attn.head_dim, c_attn.weight.shape[0]
                else:
                    k, v = attn.k_proj, attn.v_proj
                    for name, mod in (("k_proj", k), ("v_proj", v)):
                        if type(mod) is not torch.nn.Linear:
                            raise _unsupported(f"{name} of type {type(mod).__name__} in layer {i} "
                                               "(quantised or wrapped projections)")
                    if (k.bias is None) != (v.bias is None):
                        raise _unsupported(f"k/v bias mismatch in layer {i}")
                    hd = attn.head_dim
                    heads = k.out_features // hd
                    if heads * hd != k.out_features or v.out_features != k.out_features:
                        raise _unsupported(f"k/v projection shapes {k.out_features}/{v.out_features} "
                                           f"with head_dim {hd} in layer {i}")
                    weight = torch.cat([k.weight, v.weight], dim=0)
                    bias = torch.cat([k.bias, v.bias], dim=0) if k.bias is not None else None
                    hid = k.in_features
                if i == 0:
                    kv_heads, head_dim, hidden = heads, hd, hid
                elif (heads, hd, hid) != (kv_heads, head_dim, hidden):
                    raise _unsupported(f"heterogeneous layers (layer {i} differs from layer 0)")
                out.append(_LayerWeights(weight=weight.detach(), bias=None if bias is None else bias.detach()))
        if not out:
            raise _unsupported("a model with no attention layers")
        return out, kv_heads, head_dim, hidden

    def _init_rope(self, head_dim: int) -> None:
        rotary = getattr(self._base, "rotary_emb", None)
        if rotary is None:
            raise _unsupported(f"{self.model_type} model without a shared rotary_emb module")
        rope_type = getattr(rotary, "rope_type", None)
        if not isinstance(rope_type, str) or rope_type not in _STATIC_ROPE_TYPES:
            raise _unsupported(f"rope type {rope_type!r} (handled: {sorted(_STATIC_ROPE_TYPES)})")
        inv_freq = rotary.inv_freq
        if inv_freq.numel() * 2 != head_dim:
            raise _unsupported(f"partial rotary embedding ({inv_freq.numel() * 2} of {head_dim} dims)")
        # The model's own buffers: rope_theta and the scaling type are already folded in.
        self._rope_inv_freq = inv_freq.detach().float().clone()
        self._rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    # ------------------------------------------------------------------ capture
    def _hook_targets(self) -> list["nn.Module"]:
        attns = self._attention_modules()
        return [a.c_attn if self.model_type == "gpt2" else a.k_proj for a in attns]

    def capture(self, input_ids: torch.Tensor, past_kv: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model's forward on ``input_ids`` and return the new tokens' KV and activations.

        ``input_ids``: ``[T]`` or ``[1, T]``. ``past_kv``: an optional cached prefix in this
        adapter's layout (``[L, 2, P, H, D]``); the new tokens then sit at positions
        ``P..P+T-1``. Returns ``kv`` ``[L, 2, T, H, D]`` (read from the model's own cache) and
        ``act`` ``[L, T, hidden]`` (the inputs to the K/V projections). One forward pass.
        """
        ids = self._as_ids(input_ids)
        past_len = 0
        cache = self._new_cache()
        if past_kv is not None:
            self._check_kv(past_kv)
            past_len = past_kv.shape[2]
            self._fill_cache(cache, past_kv)
        captured: list[torch.Tensor | None] = [None] * self.layout.num_layers
        handles = []
        for i, mod in enumerate(self._hook_targets()):
            def hook(_mod: Any, args: tuple, _i: int = i) -> None:
                captured[_i] = args[0].detach()
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.inference_mode():
                self._base(input_ids=ids, cache=cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in captured):
            raise RuntimeError("capture hooks did not fire for every layer")
        act = torch.stack([c[0] for c in captured])  # type: ignore[index]
        kv = self._cache_to_kv(cache, start=past_len)
        return kv, act

    def _as_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise InvalidInputError(f"input_ids must be [T] or [1, T] with T > 0, got {tuple(ids.shape)}")
        return ids.to(self.device)

    @staticmethod
    def _new_cache() -> Any:
        from transformers import DynamicCache
        # No config: every layer is a full DynamicLayer, so sliding-window models keep all KV.
        return DynamicCache()

    def _fill_cache(self, cache: Any, kv: torch.Tensor) -> None:
        for layer in range(kv.shape[0]):
            k = kv[layer, 0].to(self.device).transpose(0, 1)[None]  # [1, H, T, D]
            v = kv[layer, 1].to(self.device).transpose(0, 1)[None]
            cache.update(k, v, layer)

    def _cache_to_kv(self, cache: Any, start: int = 0) -> torch.Tensor:
        per_layer = []
        for layer in cache.layers[: self.layout.num_layers]:
            k = layer.keys[0, :, start:].transpose(0, 1)  # [T, H, D]
            v = layer.values[0, :, start:].transpose(0, 1)
            per_layer.append(torch.stack([k, v]))
        return torch.stack(per_layer).contiguous()

    def to_cache(self, kv: torch.Tensor) -> Any:
        """A ``DynamicCache`` holding ``kv`` (``[L, 2, T, H, D]``), for ``forward``/``generate``."""
        self._check_kv(kv)
        cache = self._new_cache()
        self._fill_cache(cache, kv)
        return cache

    def _check_kv(self, kv: torch.Tensor) -> None:
        lay = self.layout
        if kv.dim() != 5 or kv.shape[0] != lay.num_layers or kv.shape[1] != 2 \
                or tuple(kv.shape[3:]) != (lay.num_kv_heads, lay.head_dim):
            raise InvalidInputError(f"kv must be {lay.kv_shape('T')}, got {tuple(kv.shape)}")

    # ------------------------------------------------------------------ recompute
    def rope_cos_sin(self, start_pos: int, tokens: int, dtype: torch.dtype, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[T, head_dim]`` for positions ``start_pos..start_pos+T-1``, as the model computes them."""
        assert self._rope_inv_freq is not None
        pos = torch.arange(start_pos, start_pos + tokens, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self._rope_inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self._rope_scale).to(dtype), (emb.sin() * self._rope_scale).to(dtype)

    def recompute_kv(self, act: torch.Tensor, start_pos: int = 0,
                     layers: tuple[int, int] | None = None, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Recompute K/V from stored activations: one GEMM (+bias, +RoPE on K) per layer.

        ``act``: ``[L, T, hidden]`` (all layers) or ``[b - a, T, hidden]`` for
        ``layers=(a, b)``. Tokens are at positions ``start_pos..start_pos+T-1``. Returns
        ``[b - a, 2, T, H, D]`` in the model's dtype and device, written into ``out`` when
        given (e.g. a slice of the caller's KV buffer). Cost: ``b - a`` GEMMs of
        ``T x hidden x 2*H*D``.
        """
        lay = self.layout
        a, b = layers if layers is not None else (0, lay.num_layers)
        if not (0 <= a < b <= lay.num_layers):
            raise InvalidInputError(f"layers must satisfy 0 <= a < b <= {lay.num_layers}, got {(a, b)}")
        if not isinstance(start_pos, int) or start_pos < 0:
            raise InvalidInputError(f"start_pos must be a non-negative int, got {start_pos!r}")
        if act.dim() != 3 or act.shape[2] != lay.hidden_size or act.shape[0] not in (lay.num_layers, b - a):
            raise InvalidInputError(f"act must be [{lay.num_layers} or {b - a}, T, {lay.hidden_size}], "
                                    f"got {tuple(act.shape)}")
        offset = 0 if act.shape[0] == lay.num_layers else a
        tokens = act.shape[1]
        kvd = lay.num_kv_heads * lay.head_dim
        shape = (b - a, 2, tokens, lay.num_kv_heads, lay.head_dim)
        if out is None:
            out = torch.empty(shape, dtype=lay.dtype, device=self.device)
        elif tuple(out.shape) != shape:
            raise InvalidInputError(f"out must be {shape}, got {tuple(out.shape)}")
        cos = sin = None
        if self._family == "rope":
            cos, sin = self.rope_cos_sin(start_pos, tokens, lay.dtype, self.device)
            cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        with torch.inference_mode():
            for layer in range(a, b):
                w = self._weights[layer]
                x = act[layer - offset].to(device=self.device, dtype=lay.dtype)
                y = torch.nn.functional.linear(x, w.weight, w.bias)  # [T, 2*kvd]: the one GEMM
                k = y[:, :kvd].view(tokens, lay.num_kv_heads, lay.head_dim)
                v = y[:, kvd:].view(tokens, lay.num_kv_heads, lay.head_dim)
                if cos is not None:
                    k = k * cos + _rotate_half(k) * sin
                out[layer - a, 0].copy_(k)
                out[layer - a, 1].copy_(v)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
