"""Activations in the store, planner-driven get/load and the overlapped executor.

Tiny random-weight HF models from configs (no downloads). Cost profiles are injected so
the planner's choice is known (a mixed plan, a transfer-only plan, a prefill suffix)
whatever this machine's speed.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from tests.helpers import same

transformers = pytest.importorskip("transformers")

from allocator.disk import KIND_ACT, slab_file_bytes  # noqa: E402
from kvstore import BlockNotFoundError, ConfigError, InvalidInputError, KVStore, StoreConfig  # noqa: E402
from kvstore.store import slab_filename  # noqa: E402
from kvstore.restore.costmodel import ComputeCost, CostModel, CostProfile, LinkCost, recompute_flops  # noqa: E402
from kvstore.hf import HFAdapter  # noqa: E402

VOCAB = 96
BT = 4
_MODELS: dict = {}


def _model(arch: str, dtype: torch.dtype = torch.float32):
    """MHA (kv_heads == heads, so activations are half the KV bytes) tiny models."""
    key = (arch, dtype)
    if key not in _MODELS:
        torch.manual_seed(4321)
        common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=256, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=None, pad_token_id=0)
        if arch == "llama":
            cfg = transformers.LlamaConfig(**common, num_key_value_heads=4, attention_bias=True,
                                           rope_theta=500.0)  # a name every release in the range takes
        elif arch == "qwen2":
            cfg = transformers.Qwen2Config(**common, num_key_value_heads=2)  # GQA
        else:
            cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                          initializer_range=0.2, bos_token_id=0, eos_token_id=None,
                                          pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
        _MODELS[key] = model.to(dtype)
    return _MODELS[key]


def _profile(layout, *, recompute_per_kv: float = 1.0, prefill_rate: float = 1e3) -> CostProfile:
    """Links of 1 GB/s; recompute of a block takes ``recompute_per_kv`` times its KV's transfer."""
    kv_s = layout.kv_block_bytes(BT) / 1e9
    rate = recompute_flops(layout, BT) / (kv_s * recompute_per_kv)
    return CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e9)},
                       recompute=ComputeCost(rate), prefill=ComputeCost(prefill_rate))


def _store(adapter, tmp_path, *, mode="beside", act_blocks=0, host=64, disk=0, share=0.4, profile=None,
           give_adapter=True, **kw) -> KVStore:
    lay = adapter.layout
    per = lay.kv_block_bytes(BT) + lay.act_block_bytes(BT)
    disk_bytes = 0
    if disk:
        disk_bytes = slab_file_bytes(disk, lay.kv_block_bytes(BT)) + slab_file_bytes(disk, lay.act_block_bytes(BT))
    cfg = StoreConfig(layout=lay, block_tokens=BT, device_bytes=0, host_bytes=host * per, disk_bytes=disk_bytes,
                      disk_path=str(tmp_path / "disk") if disk else None, act_share=share,
                      activations=mode, act_blocks=act_blocks, promote_on_hit=False, **kw)
    cm = CostModel(profile or _profile(lay))
    return KVStore(cfg, adapter=adapter if give_adapter else None, cost_model=cm)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.to(a.device)  # compared on one device (results come back on the store's)
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ids(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (1, n), generator=g)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_get_mixed_plan_equals_models_kv(arch, tmp_path, seed):
    adapter = HFAdapter(_model(arch))
    ids = _ids(seed, 32)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path) as s:
        assert s.put(ids[0], kv, activations=act) == 32
        res = s.load(ids[0])
        plan = res.plan
        if arch != "qwen2":  # MHA: activations are half the KV; a mix is faster
            assert plan.count("kv") > 0 and plan.count("recompute") > 0, plan.steps
        else:  # GQA here: activations are as large as the KV, so recompute never pays
            assert plan.count("recompute") == 0
        assert res.tokens_restored == 32 and _rel(res.kv, kv) < 1e-5
        for st in plan.steps:  # KV-read blocks are bytes equal to what was put
            if st.action == "kv":
                sl = slice(st.block * BT, (st.block + 1) * BT)
                assert same(res.kv[:, :, sl], kv[:, :, sl])
        got = s.get(ids[0])
        assert _rel(got, kv) < 1e-5
        assert same(s.get(ids[0], exact=True), kv)  # exact: never recompute a block with KV
        assert s.stats()["recomputed_blocks"] > 0 or arch == "qwen2"
        s._check()


def test_instead_mode_lookup_needs_an_adapter(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(1, 24)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path, mode="instead", act_blocks=3, give_adapter=False) as s:
        # Without an adapter the leading 3 blocks (activations only) are not restorable.
        assert s.put(ids[0], kv, activations=act) == 0
        assert s.lookup(ids[0]) == 0
        with pytest.raises(BlockNotFoundError):
            s.get(ids[0])
        st = s.stats()
        assert st["put_act_blocks"] == 3 and st["put_blocks"] == 3 and st["activations"]["blocks"] == 3
        assert s.lookup(ids[0], adapter=adapter) == 24
        got = s.get(ids[0], adapter=adapter, exact=True)  # act-only blocks must be recomputed
        assert _rel(got, kv) < 1e-5
        assert same(got[:, :, 12:], kv[:, :, 12:])
        s._check()


def test_bad_activations_change_nothing(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(2, 16)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path) as s:
        before = s.stats()
        for bad in (act[:, :8], act.double(), act[:, :, :10], act.tolist()):
            with pytest.raises(InvalidInputError):
                s.put(ids[0], kv, activations=bad)
        assert s.stats() == {**before, "puts": 0}
        assert s.lookup(ids[0]) == 0
        s._check()


def test_config_rules():
    lay = HFAdapter(_model("llama")).layout
    with pytest.raises(ConfigError):
        StoreConfig(layout=lay, activations="beside")  # needs act_share > 0
    with pytest.raises(ConfigError):
        StoreConfig(layout=lay, act_share=0.3)  # act_share without a rule
    with pytest.raises(ConfigError):
        StoreConfig(layout=lay, act_share=1.0, activations="beside")
    # act_share = 0 keeps every byte for KV
    with KVStore(StoreConfig(layout=lay, block_tokens=BT, device_bytes=0, host_bytes=10 * lay.kv_block_bytes(BT))) as s:
        assert s.stats()["tiers"]["host"]["capacity_blocks"] == 10 and "activations" not in s.stats()


def test_activations_ignored_without_act_share(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(3, 16)
    kv, act = adapter.capture(ids)
    lay = adapter.layout
    with KVStore(StoreConfig(layout=lay, block_tokens=BT, device_bytes=0, host_bytes=8 * lay.kv_block_bytes(BT)),
                 adapter=adapter) as s:
        assert s.put(ids[0], kv, activations=act) == 16
        assert same(s.get(ids[0]), kv)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_generation_from_load_equals_plain_generation(arch, tmp_path, seed):
    rng = random.Random(seed)
    model = _model(arch)
    adapter = HFAdapter(model)
    prompt = torch.tensor([[rng.randrange(2, VOCAB) for _ in range(30)]])
    mask = torch.ones_like(prompt)
    kv, act = adapter.capture(prompt[:, :24])
    # Cheap prefill: the planner may leave a suffix of the cached blocks to the engine.
    prof = _profile(adapter.layout, recompute_per_kv=rng.choice([0.5, 1.0, 3.0]),
                    prefill_rate=rng.choice([1e3, 1e12]))
    with _store(adapter, tmp_path, profile=prof, mode=rng.choice(["beside", "instead"]),
                act_blocks=rng.choice([0, 2, 4])) as s:
        s.put(prompt[0, :24], kv, activations=act)
        res = s.load(prompt[0], device=next(model.parameters()).device)  # the model's device
        n = res.tokens_restored
        assert n % BT == 0 and n <= 24
        baseline = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
        if n == 0:
            return
        cache = adapter.to_cache(res.kv)
        got = model.generate(prompt, attention_mask=mask, **{adapter.cache_keyword: cache}, max_new_tokens=6,
                             do_sample=False)
        assert cache.get_seq_length() == prompt.shape[1] + 6 - 1
        assert got.tolist() == baseline.tolist(), f"steps={res.plan.steps}"


def test_load_leaves_suffix_to_prefill_when_cheaper(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(5, 32)
    kv, act = adapter.capture(ids)
    slow_links = CostProfile(links={"disk->host": LinkCost(1e3), "host->device": LinkCost(1e3)},
                             recompute=ComputeCost(1e3), prefill=ComputeCost(1e15))
    with _store(adapter, tmp_path, profile=slow_links) as s:
        s.put(ids[0], kv, activations=act)
        res = s.load(ids[0])
        assert res.plan.prefill_tokens > 0 and res.tokens_restored == 32 - res.plan.prefill_tokens
        assert res.kv.shape[2] == res.tokens_restored
        # get never leaves a prefill suffix
        assert _rel(s.get(ids[0]), kv) < 1e-5


def test_blocks_stay_pinned_during_restore(tmp_path, seed):
    """A writer that floods the store from the layer callback (mid-restore) cannot evict the
    blocks being restored, in either manager; the restore stays correct."""
    adapter = HFAdapter(_model("llama"))
    ids = _ids(seed, 32)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path, host=8) as s:  # exactly 8 blocks of each form fit
        s.put(ids[0], kv, activations=act)
        stored = []

        def flood(layer: int) -> None:
            if layer == 0:
                for i in range(4):
                    other = _ids(1000 + i, 8)
                    okv, oact = adapter.capture(other)
                    t = threading.Thread(target=lambda: stored.append(s.put(other[0], okv, activations=oact)))
                    t.start()
                    t.join()
                s._check()
                assert s.lookup(ids[0]) == 32

        got = s.get(ids[0], on_layer=flood)
        # Only the free slot and the flood's own blocks could be reused (LRU would otherwise
        # have evicted the older restored blocks first).
        assert all(n <= BT for n in stored) and s.lookup(ids[0]) == 32
        assert s.stats()["activations"]["tiers"]["host"]["evictions"] >= 3
        assert _rel(got, kv) < 1e-5
        s._check()
        okv, oact = adapter.capture(_ids(2000, 8))
        assert s.put(_ids(2000, 8)[0], okv, activations=oact) == 8  # after release: evictable
        s._check()


def test_layer_callbacks_in_order_with_layer_ready(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(7, 32)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path, disk=16, host=4) as s:  # blocks on host and on disk
        s.put(ids[0], kv, activations=act)
        out = torch.full(adapter.layout.kv_shape(32), float("nan"))
        seen = []

        def ready(layer: int) -> None:
            assert not torch.isnan(out[layer]).any()
            assert _rel(out[layer], kv[layer]) < 1e-5
            seen.append(layer)

        got = s.get(ids[0], out=out, on_layer=ready)
        assert got.data_ptr() == out.data_ptr() and seen == list(range(adapter.layout.num_layers))
        tiers = {t for t in s.stats()["tiers"] if s.stats()["tiers"][t]["used_blocks"]}
        assert tiers == {"host", "disk"}
        assert s.cost_model.observations > 0  # observed reads and recomputes refined the model


def test_stress_random_ops_keep_both_managers_consistent(tmp_path, seed):
    rng = random.Random(seed)
    adapter = HFAdapter(_model("llama"))
    prompts = [_ids(seed * 100 + i, 4 * BT * rng.randint(1, 3)) for i in range(6)]
    caps = {i: adapter.capture(p) for i, p in enumerate(prompts)}
    with _store(adapter, tmp_path, host=5, disk=6, mode="beside", act_blocks=2,
                profile=_profile(adapter.layout, recompute_per_kv=rng.choice([0.3, 1.0, 5.0]))) as s:
        for _ in range(40):
            i = rng.randrange(len(prompts))
            p, (kv, act) = prompts[i], caps[i]
            op = rng.random()
            if op < 0.4:
                s.put(p[0], kv, activations=act if rng.random() < 0.8 else None)
            elif op < 0.7:
                n = s.lookup(p[0])
                if n:
                    assert _rel(s.get(p[0, :n]), kv[:, :, :n]) < 1e-5, f"seed={seed}"
            elif op < 0.95:
                res = s.load(p[0])
                if res.tokens_restored:
                    assert _rel(res.kv, kv[:, :, :res.tokens_restored]) < 1e-5, f"seed={seed}"
            else:
                s.clear()
            s._check()


def test_activation_slab_is_recovered_with_its_kind(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(9, 16)
    kv, act = adapter.capture(ids)
    kw = dict(host=0, disk=8, mode="instead", act_blocks=2, persist=True)
    with _store(adapter, tmp_path, **kw) as s:
        assert s.put(ids[0], kv, activations=act) == 16
        slab = s._acts.tiers[-1].arena
        assert {r for r in [slab.path]} and (tmp_path / "disk" / slab_filename("default", "act")).exists()
    with _store(adapter, tmp_path, **kw) as s:
        assert all(r.kind == KIND_ACT for r in s._acts.tiers[-1].arena.recovered)
        assert s.lookup(ids[0]) == 16  # act-only leading blocks link the KV blocks after them
        assert _rel(s.get(ids[0]), kv) < 1e-5
        s._check()


def test_get_plan_never_prefills_and_planner_flag(tmp_path):
    from kvstore.restore.planner import BlockForms, plan_restore

    lay = HFAdapter(_model("llama")).layout
    cheap_prefill = _profile(lay, prefill_rate=1e18)
    blocks = [BlockForms(kv="disk", act="host")] * 6
    assert plan_restore(blocks, lay, BT, cheap_prefill).prefill_tokens > 0
    plan = plan_restore(blocks, lay, BT, cheap_prefill, allow_prefill=False)
    assert plan.prefill_tokens == 0 and plan.count("prefill") == 0 and plan.lower_bound_s <= plan.predicted_s


def test_corrupt_activation_block_is_dropped_not_returned(tmp_path):
    adapter = HFAdapter(_model("llama"))
    ids = _ids(11, 16)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path, host=0, disk=8, mode="instead", act_blocks=2) as s:
        s.put(ids[0], kv, activations=act)
        slab = s._acts.tiers[-1].arena
        entry = s._acts.index[s._keys(ids[0])[1][1]]
        with open(slab.path, "r+b") as f:  # flip a byte of block 1's activations
            off = slab.data_offset + entry.slot * slab.stride + 5
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
        res = s.load(ids[0])
        assert res.tokens_restored == BT and _rel(res.kv, kv[:, :, :BT]) < 1e-5
        assert s.stats()["corrupt_blocks"] == 1 and s.lookup(ids[0]) == BT
        s._check()


@pytest.mark.cuda
def test_restore_into_cuda_out(tmp_path):
    model = _model("llama", torch.float16)
    adapter = HFAdapter(model.to("cuda"))
    try:
        ids = _ids(12, 32)
        kv, act = adapter.capture(ids)
        with _store(adapter, tmp_path, disk=16, host=4) as s:
            s.put(ids[0], kv, activations=act)
            seen = []
            got = s.get(ids[0], device="cuda", on_layer=seen.append)
            assert got.device.type == "cuda" and _rel(got, kv) < 1e-2 and seen == [0, 1]
            assert _rel(s.load(ids[0]).kv, kv) < 1e-2
    finally:
        model.to("cpu")


def test_exact_get_recomputes_blocks_a_lossy_codec_stored(tmp_path, seed):
    """Issue 24: KV in an int4 host tier with activations beside it. An exact get must not
    return the int4 KV: those blocks are recomputed from their activations (within the
    recompute tolerance); a get that accepts lossy KV reads it (int4-sized error)."""
    adapter = HFAdapter(_model("llama"))
    ids = _ids(seed, 32)
    kv, act = adapter.capture(ids)
    with _store(adapter, tmp_path, host_codec="int4") as s:
        assert s.put(ids[0], kv, activations=act) == 32
        exact = s.get(ids[0], exact=True)
        assert _rel(exact, kv) < 1e-4, "an exact get returned int4 KV"
        assert s.stats()["lossy_refused"] >= 1
        lossy = s.get(ids[0], exact=False)
        assert 1e-3 < _rel(lossy, kv) < 0.15  # some blocks read as int4 (the plan chose KV)
        res = s.load(ids[0], exact=True)
        assert res.tokens_restored == 32 and _rel(res.kv, kv) < 1e-4
