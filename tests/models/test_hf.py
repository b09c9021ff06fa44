"""HFAdapter correctness on tiny random-weight models of every supported architecture.

Each test builds its model from a config (no downloads). Biases are randomised (HF
initialises them to zero, which would hide a missing bias in recompute) and the weight scale
is raised so attention actually depends on the cached keys.
"""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvstore.errors import InvalidInputError  # noqa: E402
from kvstore.hf import HFAdapter  # noqa: E402

VOCAB = 96
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                   initializer_range=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=0)


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**_LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                        attention_bias=True)
    if arch == "llama3-rope":
        return transformers.LlamaConfig(**_LLAMA_LIKE, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if arch == "llama-linear-rope":
        return transformers.LlamaConfig(**_LLAMA_LIKE, rope_parameters={
            "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if arch == "llama-yarn-rope":
        return transformers.LlamaConfig(**_LLAMA_LIKE, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "mistral":
        return transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=None)
    if arch == "mistral-sliding":
        return transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=8)
    if arch == "qwen2":
        return transformers.Qwen2Config(**_LLAMA_LIKE)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                       initializer_range=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    if arch == "opt":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=64,
                                      init_std=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=1)
    if arch == "opt-postln":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=32,
                                      do_layer_norm_before=False, init_std=0.2, bos_token_id=0,
                                      eos_token_id=None, pad_token_id=1)
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt"]
EXTRA = ["llama3-rope", "llama-linear-rope", "llama-yarn-rope", "mistral-sliding", "opt-postln"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

_MODELS: dict = {}


def _model(arch: str, dtype: torch.dtype = torch.float32):
    """Build (and memoise per test session) a tiny random model; read-only in every test."""
    key = (arch, dtype)
    if key not in _MODELS:
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
        _MODELS[key] = model.to(dtype)
    return _MODELS[key]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model_cache_kv(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own cache after a plain forward, in the store's [L, 2, T, H, D] layout."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                        for layer in cache.layers])


@pytest.mark.parametrize("arch", ARCHS + EXTRA)
def test_capture_equals_models_own_cache(arch: str) -> None:
    model = _model(arch)
    adapter = HFAdapter(model)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    kv, act = adapter.capture(ids)
    lay = adapter.layout
    assert tuple(kv.shape) == lay.kv_shape(20)
    assert tuple(act.shape) == lay.act_shape(20)
    assert kv.dtype == act.dtype == lay.dtype
    ref = _model_cache_kv(model, ids)
    # A sliding-window layer of the model's default cache keeps only the window's tail;
    # the adapter keeps every token, and the tail must match.
    assert torch.equal(kv[:, :, kv.shape[2] - ref.shape[2]:], ref)
    if arch == "mistral-sliding":
        assert ref.shape[2] < kv.shape[2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS + EXTRA)
def test_recompute_matches_capture(arch: str, dtype: torch.dtype) -> None:
    model = _model(arch, dtype)
    adapter = HFAdapter(model)
    assert adapter.layout.dtype == dtype
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    kv, act = adapter.capture(ids)
    assert _rel_err(adapter.recompute_kv(act, start_pos=0), kv) < TOL[dtype]
    # start_pos > 0: capture a continuation on top of a cached prefix, recompute only it.
    prefix_kv, _ = adapter.capture(ids[:, :24])
    cont_kv, cont_act = adapter.capture(ids[:, 24:], past_kv=prefix_kv)
    assert _rel_err(cont_kv, kv[:, :, 24:]) < TOL[dtype]
    assert _rel_err(adapter.recompute_kv(cont_act, start_pos=24), kv[:, :, 24:]) < TOL[dtype]
    # Block-sized slices at arbitrary offsets (the store recomputes per block run).
    assert _rel_err(adapter.recompute_kv(act[:, 8:16], start_pos=8), kv[:, :, 8:16]) < TOL[dtype]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_wrong_start_pos_gives_wrong_kv_for_rope_only(arch: str) -> None:
    """RoPE keys depend on the position passed; GPT-2/OPT keys carry it in the activations."""
    adapter = HFAdapter(_model(arch))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    kv, act = adapter.capture(ids)
    shifted = adapter.recompute_kv(act, start_pos=5)
    if arch == "gpt2":
        assert torch.allclose(shifted, kv)
    else:
        assert _rel_err(shifted[:, 0], kv[:, 0]) > 1e-2  # K rotated differently
        assert torch.allclose(shifted[:, 1], kv[:, 1], rtol=1e-5, atol=1e-6)  # V unaffected


def test_layer_range_and_out_buffer() -> None:
    adapter = HFAdapter(_model("llama"))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    kv, act = adapter.capture(ids)
    out = torch.full(adapter.layout.kv_shape(12), float("nan"))
    got = adapter.recompute_kv(act[1:2], start_pos=0, layers=(1, 2), out=out[1:2])
    assert got.data_ptr() == out[1].data_ptr()
    assert torch.isnan(out[0]).all()
    assert _rel_err(out[1], kv[1]) < 1e-5
    full = adapter.recompute_kv(act, layers=(1, 2))  # whole-model act, one layer's range
    assert _rel_err(full[0], kv[1]) < 1e-5


def _restore_mixed(adapter: HFAdapter, ids: torch.Tensor, block: int, rng: random.Random
                   ) -> tuple[torch.Tensor, list[str]]:
    """KV of a cached prefix assembled per block as a planner might: some blocks' captured KV
    (transfer), some recomputed from activations; a random suffix of blocks is left out
    (prefill). Returns the restored prefix KV and the choices made."""
    kv, act = adapter.capture(ids)
    nblocks = ids.shape[1] // block
    keep = rng.randint(1, nblocks)  # blocks restored; the rest is left for prefill
    choices, parts = [], []
    for b in range(keep):
        sl = slice(b * block, (b + 1) * block)
        if rng.random() < 0.5:
            choices.append("kv")
            parts.append(kv[:, :, sl])
        else:
            choices.append("recompute")
            parts.append(adapter.recompute_kv(act[:, sl], start_pos=b * block))
    return torch.cat(parts, dim=2), choices + ["prefill"] * (nblocks - keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS + ["mistral-sliding", "llama3-rope"])
def test_greedy_generation_from_restored_cache(arch: str, dtype: torch.dtype) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    model = _model(arch, dtype)
    adapter = HFAdapter(model)
    # Token ids >= 2 and an explicit mask: generate() must not mistake a token for padding.
    prompt = torch.tensor([[rng.randrange(2, VOCAB) for _ in range(24)]])
    mask = torch.ones_like(prompt)
    restored, choices = _restore_mixed(adapter, prompt[:, :20], 4, rng)
    # Always at least one token for the model to process; the generate call prefills the rest.
    baseline = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    cache = adapter.to_cache(restored)
    prefix = restored.shape[2]
    got = model.generate(prompt, attention_mask=mask, cache=cache, max_new_tokens=8, do_sample=False)
    assert cache.get_seq_length() == prompt.shape[1] + 8 - 1, "generate did not use the restored cache"
    assert got.tolist() == baseline.tolist(), f"seed={seed} choices={choices}"
    # Next-token logits agree too (stronger than argmax).
    with torch.no_grad():
        ref_logits = model(prompt).logits[0, -1].float()
        got_logits = model(prompt[:, prefix:], cache=adapter.to_cache(restored)).logits[0, -1].float()
    assert _rel_err(got_logits, ref_logits) < (1e-4 if dtype == torch.float32 else 5e-2), f"seed={seed}"


def test_corrupted_cache_is_detected_by_generation_test() -> None:
    """Guards the generation test itself: a wrong restored cache must change the logits."""
    model = _model("llama")
    adapter = HFAdapter(model)
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    kv, act = adapter.capture(prompt[:, :8])
    wrong = adapter.recompute_kv(act, start_pos=3)  # K rotated for the wrong positions
    with torch.no_grad():
        ref = model(prompt).logits[0, -1]
        bad = model(prompt[:, 8:], cache=adapter.to_cache(wrong)).logits[0, -1]
        good = model(prompt[:, 8:], cache=adapter.to_cache(kv)).logits[0, -1]
    assert _rel_err(good, ref) < 1e-5
    assert _rel_err(bad, ref) > 1e-3


# ----------------------------------------------------------------------- refusals
def _tiny(cls, **kw):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cls(**kw))


@pytest.mark.parametrize("rope_type,params", [
    ("dynamic", {"factor": 2.0}),
    ("longrope", {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}),
])
def test_sequence_dependent_rope_is_refused(rope_type: str, params: dict) -> None:
    model = _tiny(transformers.LlamaConfig, **{**_LLAMA_LIKE, "rope_parameters": {
        "rope_type": rope_type, "rope_theta": 10000.0, **params}})
    with pytest.raises(NotImplementedError, match=rope_type):
        HFAdapter(model)


def test_unsupported_architecture_is_refused_by_name() -> None:
    model = _tiny(transformers.GPTNeoXConfig, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                  num_attention_heads=4, intermediate_size=96)
    with pytest.raises(NotImplementedError, match="gpt_neox"):
        HFAdapter(model)


def test_qwen3_qk_norm_is_refused() -> None:
    model = _tiny(transformers.Qwen3Config, **_LLAMA_LIKE)
    with pytest.raises(NotImplementedError, match="qwen3"):
        HFAdapter(model)


def test_qk_norm_module_is_refused_even_under_a_supported_name() -> None:
    model = _tiny(transformers.LlamaConfig, **_LLAMA_LIKE)
    model.model.layers[1].self_attn.k_norm = torch.nn.LayerNorm(16)
    with pytest.raises(NotImplementedError, match="qk-norm"):
        HFAdapter(model)


def test_wrapped_projection_is_refused() -> None:
    class Wrapped(torch.nn.Linear):
        pass

    model = _tiny(transformers.LlamaConfig, **_LLAMA_LIKE)
    old = model.model.layers[0].self_attn.k_proj
    model.model.layers[0].self_attn.k_proj = Wrapped(old.in_features, old.out_features, bias=False)
    with pytest.raises(NotImplementedError, match="k_proj"):
        HFAdapter(model)


def test_gpt2_cross_attention_is_refused() -> None:
    model = _tiny(transformers.GPT2Config, vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4,
                  add_cross_attention=True)
    with pytest.raises(NotImplementedError, match="add_cross_attention"):
        HFAdapter(model)


def test_bad_inputs_raise_invalid_input() -> None:
    adapter = HFAdapter(_model("llama"))
    lay = adapter.layout
    with pytest.raises(InvalidInputError):
        adapter.capture(torch.zeros((2, 3), dtype=torch.long))
    with pytest.raises(InvalidInputError):
        adapter.recompute_kv(torch.zeros(lay.num_layers, 4, lay.hidden_size + 1))
    with pytest.raises(InvalidInputError):
        adapter.recompute_kv(torch.zeros(lay.act_shape(4)), start_pos=-1)
    with pytest.raises(InvalidInputError):
        adapter.recompute_kv(torch.zeros(lay.act_shape(4)), layers=(1, 1))
    with pytest.raises(InvalidInputError):
        adapter.to_cache(torch.zeros(lay.num_layers, 2, 4, lay.num_kv_heads + 1, lay.head_dim))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_on_cuda_fp16(arch: str) -> None:
    model = _model(arch, torch.float32).to("cuda", torch.float16)
    try:
        adapter = HFAdapter(model)
        assert adapter.device.type == "cuda"
        ids = torch.randint(0, VOCAB, (1, 33), generator=torch.Generator().manual_seed(6))
        kv, act = adapter.capture(ids)
        assert _rel_err(adapter.recompute_kv(act.cpu(), start_pos=0), kv) < 1e-2  # act from host
        prefix_kv, _ = adapter.capture(ids[:, :16])
        cont_kv, cont_act = adapter.capture(ids[:, 16:], past_kv=prefix_kv)
        assert _rel_err(adapter.recompute_kv(cont_act, start_pos=16), kv[:, :, 16:]) < 1e-2
    finally:
        model.to("cpu", torch.float32)
