"""One vLLM engine in its own process, driven by a JSON spec: the vLLM bench's and the vLLM
tests' engine (``python -m kvstore.bench._vllm_engine SPEC.json``).

vLLM spawns its engine core and worker processes, so this module is the script they
re-import (everything runs under ``if __name__ == "__main__"``). The spec says which model
directory, which KV connector (none, ours, vLLM's ``ExampleConnector``) and a list of
phases, run in order; each phase prints one line ``KVSTORE-ENGINE {json}`` on stdout:

* ``{"generate": [[token ids], ...], "max_tokens": N}``: one ``generate`` of the prompts
  (greedy), reporting each output's token ids and vLLM's ``num_cached_tokens``;
* ``{"ttft": [[token ids], ...]}``: each prompt alone with ``max_tokens=1``, timed;
* ``"wait_for": PATH`` (any phase): wait until the file exists first (tests use it to
  kill a sidecar or start a second engine at a known point);
* ``"touch": PATH``: create the file once the phase is done; ``"sleep": S``: pause first
  (a finished request's save completes on the worker's save thread after its output).

``make_model`` writes a random-weight Llama with ``save_pretrained`` (no downloads).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

PREFIX = "KVSTORE-ENGINE "


def make_model(path: str | os.PathLike, *, layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
               vocab: int = 1024, intermediate: int | None = None, max_positions: int = 8192, seed: int = 0,
               dtype: str = "bfloat16", init_std: float = 0.2) -> str:
    """A random-weight Llama saved to ``path`` (config + safetensors); returns ``path``.

    ``init_std`` is larger than a trained model's so greedy decoding has clear winners: a
    random model's near-ties would make token equality depend on float rounding order."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, initializer_range=init_std,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(path))
    return str(path)


def _emit(event: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _wait_for(path: str, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout} s for {path}")
        time.sleep(0.05)


def _external_hits(llm) -> dict:
    """vLLM's own counters of prefix-cache and connector (external) hits, where it keeps them."""
    out = {}
    try:
        for m in llm.get_metrics():
            if m.name in ("vllm:external_prefix_cache_hits", "vllm:external_prefix_cache_queries",
                          "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                out[m.name.split(":", 1)[1]] = getattr(m, "value", None)
    except Exception as exc:  # noqa: BLE001 -- metrics are informative; their absence is reported
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def run(spec: dict) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 1)))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = None
    if spec.get("connector"):
        kv = KVTransferConfig(**spec["connector"])
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, block_size=spec.get("block_size", 32),
              dtype=spec.get("dtype", "bfloat16"), max_model_len=spec.get("max_model_len", 2048),
              enable_prefix_caching=spec.get("prefix_caching", True), enforce_eager=spec.get("enforce_eager", True),
              max_num_batched_tokens=spec.get("max_num_batched_tokens", None), seed=0,
              disable_log_stats=False, kv_transfer_config=kv, **spec.get("llm_kwargs", {}))
    _emit({"event": "ready", "startup_s": time.perf_counter() - t0})
    for i, phase in enumerate(spec.get("phases", [])):
        if phase.get("wait_for"):
            _wait_for(phase["wait_for"])
        time.sleep(phase.get("sleep", 0))
        result: dict = {"event": "phase", "index": i, "name": phase.get("name", str(i))}
        try:
            if "generate" in phase:
                params = SamplingParams(max_tokens=phase.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
                t = time.perf_counter()
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in phase["generate"]], params,
                                    use_tqdm=False)
                result["seconds"] = time.perf_counter() - t
                result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
                result["cached"] = [o.num_cached_tokens for o in outs]
            if "ttft" in phase:
                params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
                result["ttft_s"], result["tokens"], result["cached"] = [], [], []
                for p in phase["ttft"]:
                    t = time.perf_counter()
                    (o,) = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
                    result["ttft_s"].append(time.perf_counter() - t)
                    result["tokens"].append(list(o.outputs[0].token_ids))
                    result["cached"].append(o.num_cached_tokens)
            result["metrics"] = _external_hits(llm)
        except Exception as exc:  # noqa: BLE001 -- reported to the driver, which decides
            import traceback

            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()[-4000:]
            _emit(result)
            if phase.get("stop_on_error", True):
                break
            continue
        _emit(result)
        if phase.get("touch"):
            Path(phase["touch"]).touch()
    _emit({"event": "done"})


def parse_events(stdout: str) -> list[dict]:
    """The ``KVSTORE-ENGINE`` lines of an engine's stdout, in order."""
    return [json.loads(line[len(PREFIX):]) for line in stdout.splitlines() if line.startswith(PREFIX)]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
