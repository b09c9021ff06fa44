"""Which architectures the adapter serves, one line each, and which it refuses, with the reason.

A family says where the decoder layers and their self-attention sit, which fused K/V layout
its projection uses (``projections.LAYOUTS``) and whether K is rotated. Everything else
(head counts, K norms, rotary frequencies, partial rotary, sliding windows, MoE feed-forward
blocks) is read from the model's own modules at construction, so a new family that fits
"K/V = projection of the layer input + bias, optional per-head norm, optional (partial)
rotary" costs one line here plus its row in the tests. Listed families are exactly the
ones the tests build and check on the oldest and the newest release of the declared range.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where a family keeps its attention, and how its K/V are made."""

    layers: str = "layers"  # dotted path from the base model to the list of decoder layers
    attn: str = "self_attn"  # a decoder layer's self-attention attribute
    proj: str = "separate"  # projection layout, a key of projections.LAYOUTS
    rotary: bool | str = True  # K rotated; a str names the config flag that says whether


_LLAMA = Family()

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,  # MoE feed-forward; attention as Mistral
    "qwen2": _LLAMA,
    "qwen2_moe": _LLAMA,
    "qwen3": _LLAMA,  # per-head k_norm
    "qwen3_moe": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,  # alternating sliding-window layers
    "gemma3_text": _LLAMA,  # k_norm, sliding layers with their own rotary base
    "granite": _LLAMA,
    "olmo2": _LLAMA,  # k_norm over the whole projection
    "starcoder2": _LLAMA,
    "phi": _LLAMA,  # partial rotary, optional k_layernorm
    "stablelm": _LLAMA,  # partial rotary, optional per-head norms
    "phi3": Family(proj="qkv_concat"),  # fused q|k|v, full or partial rotary (Phi-4-mini)
    "gpt_neox": Family(attn="attention", proj="qkv_per_head"),  # [heads, 3, D] fused, partial rotary
    "falcon": Family(layers="h", attn="self_attention", proj="falcon", rotary="rotary"),  # 3 fused layouts; alibi or rotary
    "gpt2": Family(layers="h", attn="attn", proj="conv1d", rotary=False),  # learned absolute positions
    "opt": Family(layers="decoder.layers", rotary=False),  # learned absolute positions
}

_MLA = ("multi-head latent attention (MLA): K/V are up-projections of a normalised low-rank latent, not a "
        "projection of the layer input, and storing the layer input would cost many times the latent it replaces")
_RECURRENT = "a recurrent/state-space mixer whose cache is a running state, not per-head K/V"

#: model_type -> why it is refused (architectures people ask about that do not fit the model above).
REFUSED: dict[str, str] = {
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "minicpm3": _MLA,
    "kimi_k2": _MLA,
    "mamba": _RECURRENT,
    "mamba2": _RECURRENT,
    "falcon_mamba": _RECURRENT,
    "rwkv": _RECURRENT,
    "jamba": "hybrid attention/Mamba layers (" + _RECURRENT + ")",
    "zamba": "hybrid attention/Mamba layers (" + _RECURRENT + ")",
    "zamba2": "hybrid attention/Mamba layers (" + _RECURRENT + ")",
    "bamba": "hybrid attention/Mamba layers (" + _RECURRENT + ")",
    "falcon_h1": "hybrid attention/Mamba layers (" + _RECURRENT + ")",
    "recurrent_gemma": "hybrid attention/recurrent layers (" + _RECURRENT + ")",
    "gemma3n": "KV shared across layers and per-layer inputs (the cache is not one K/V per layer)",
}

#: attribute of an attention module -> why its presence means refusal, whatever the family says.
REFUSED_ATTENTION_PARTS: dict[str, str] = {
    "kv_a_proj_with_mqa": _MLA,
    "kv_b_proj": _MLA,
    "v_norm": "a norm on V",
}
