"""Tiny random-weight models of every supported architecture, built from configs (no downloads).

Configs use the keyword names that every release of the declared range accepts
(``rope_theta``/``rope_scaling``, ``partial_rotary_factor``, ``rotary_pct``: 5.x maps them
onto ``rope_parameters``). Biases are randomised (HF initialises them to zero, which would
hide a missing bias in recompute) and the weight scale is raised so attention depends on
the cached keys. Two layers, four query heads, head_dim 16: each arch builds in well under
a second, so the whole matrix (arch x attention x dtype) stays cheap enough for CI.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96
_TOKENS = dict(bos_token_id=0, eos_token_id=None, pad_token_id=0)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=256, initializer_range=0.2, **_TOKENS)
_GQA = dict(_COMMON, num_key_value_heads=2)
_FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2,
               **_TOKENS)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}

#: arch id -> config factory. What each adds to the matrix is in its comment.
CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaConfig(**_GQA, attention_bias=True, rope_theta=500.0),  # GQA + bias
    "llama-mha": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=4),  # MHA
    "llama-mqa": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=1),  # MQA
    "llama3-rope": lambda: transformers.LlamaConfig(**_GQA, rope_scaling=_LLAMA3),  # frequency-scaled RoPE
    "llama-yarn-rope": lambda: transformers.LlamaConfig(**_GQA, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),  # attention-scaled RoPE
    "mistral-sliding": lambda: transformers.MistralConfig(**_GQA, sliding_window=8),  # sliding window
    "mixtral": lambda: transformers.MixtralConfig(**_GQA, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=None),  # MoE
    "qwen2": lambda: transformers.Qwen2Config(**_GQA),  # q/k/v bias
    "qwen2-moe": lambda: transformers.Qwen2MoeConfig(**_GQA, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3": lambda: transformers.Qwen3Config(**_GQA, head_dim=16),  # per-head k_norm
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(**_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32),
    "gemma": lambda: transformers.GemmaConfig(**_GQA, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**_GQA, head_dim=16, sliding_window=8),  # alternating sliding
    "gemma3": lambda: transformers.Gemma3TextConfig(**_GQA, head_dim=16, sliding_window=8, sliding_window_pattern=2,
                                                    rope_theta=10000.0, rope_local_base_freq=100.0),  # k_norm, 2 rotaries
    "granite": lambda: transformers.GraniteConfig(**_GQA),
    "olmo2": lambda: transformers.Olmo2Config(**_GQA),  # k_norm over the whole projection
    "starcoder2": lambda: transformers.Starcoder2Config(**_GQA, sliding_window=8),  # LayerNorm, bias
    "phi": lambda: transformers.PhiConfig(**_GQA, partial_rotary_factor=0.5, qk_layernorm=True),  # partial, k LayerNorm
    "phi3": lambda: transformers.Phi3Config(**_GQA, partial_rotary_factor=0.5),  # fused q|k|v + partial rotary
    "stablelm": lambda: transformers.StableLmConfig(**_GQA, partial_rotary_factor=0.25, use_qkv_bias=True,
                                                    qk_layernorm=True),  # per-head norm modules
    "stablelm-plain": lambda: transformers.StableLmConfig(**_GQA, partial_rotary_factor=0.25, use_qkv_bias=True),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**_COMMON, rotary_pct=0.5, attention_bias=True),  # per-head fused
    "falcon-gqa": lambda: transformers.FalconConfig(**_FALCON, new_decoder_architecture=True, num_kv_heads=2,
                                                    bias=True),  # grouped fused, cache broadcast per query head
    "falcon-mqa": lambda: transformers.FalconConfig(**_FALCON, multi_query=True),  # q heads | k | v
    "falcon-mha": lambda: transformers.FalconConfig(**_FALCON, multi_query=False, bias=True),  # [heads, 3, D]
    "falcon-alibi": lambda: transformers.FalconConfig(**_FALCON, multi_query=True, alibi=True),  # no rotary
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                            initializer_range=0.2, **_TOKENS),  # Conv1D, learned positions
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=64,
                                          init_std=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=1),
    "opt-postln": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, ffn_dim=96, max_position_embeddings=256,
                                                 word_embed_proj_dim=32, do_layer_norm_before=False, init_std=0.2,
                                                 bos_token_id=0, eos_token_id=None, pad_token_id=1),
}

#: archs whose keys are not rotated (start_pos does not change their recompute).
UNROTATED = frozenset({"gpt2", "opt", "opt-postln", "falcon-alibi"})
ATTENTION = ["sdpa", "eager"]
DTYPES = [torch.float32, torch.bfloat16]

_MODELS: dict = {}


def build(arch: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 1234):
    """A tiny random model of ``arch`` (memoised per session: tests must treat it as read-only).

    A config that this transformers release itself cannot build (a bug in that release,
    e.g. StableLM's norms without bias in 4.53) skips the test with the release's error.
    """
    key = (arch, attn, dtype, device, seed)
    if key not in _MODELS:
        torch.manual_seed(seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn).eval()
        except (AttributeError, TypeError, ValueError) as exc:
            pytest.skip(f"transformers {transformers.__version__} cannot build {arch}: {exc}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
        _MODELS[key] = model.to(device=device, dtype=dtype)
    return _MODELS[key]


def cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(K, V)`` ``[heads, T, D]`` of a transformers cache, read without the adapter's code."""
    if hasattr(cache, "layers"):
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return [(k[0], v[0]) for k, v in zip(cache.key_cache, cache.value_cache)]
    return [(k[0], v[0]) for k, v, *_ in cache]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
