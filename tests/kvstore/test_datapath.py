"""The data path an engine calls: row copies, get into the caller's layout, the paged-pool
calls (load_into / save_from) and saves that do not stall (put_async). Device-agnostic:
the ``device`` fixture is CUDA when present; every comparison happens on one device."""

from __future__ import annotations

import threading

import pytest
import torch

from allocator import MemoryArena
from allocator.disk import slab_file_bytes
from allocator.rowcopy import copy_rows, gather
from kvstore import BlockNotFoundError, InvalidInputError, KVStore, ModelLayout, StoreConfig

BT = 4


def make_kv(layout: ModelLayout, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype).to(device)


def store_on(layout, tmp_path, tier: str, blocks: int = 64, **kw) -> KVStore:
    bb = layout.kv_block_bytes(BT)
    sizes = {"device_bytes": 0, "host_bytes": 0, "disk_bytes": 0}
    sizes[f"{tier}_bytes"] = slab_file_bytes(blocks, bb) if tier == "disk" else blocks * bb
    return KVStore(StoreConfig(layout=layout, block_tokens=BT, disk_path=str(tmp_path / "d"), **sizes, **kw))


def blocks_of(kv: torch.Tensor) -> torch.Tensor:
    """``[L, 2, T, H, D]`` as ``[T / BT, L, 2, BT, H, D]`` (a copy)."""
    L, _, T, H, D = kv.shape
    return kv.view(L, 2, T // BT, BT, H, D).permute(2, 0, 1, 3, 4, 5).contiguous()


# -- copy_rows ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["runs", "scattered_src", "scattered_dst", "both", "short_rows"])
def test_copy_rows_matches_a_loop(shape, rng, device):
    rows, width = (64, 4) if shape == "short_rows" else (24, 4096)
    src = torch.randint(-1000, 1000, (rows, width), dtype=torch.int16)
    n = 12
    src_idx = list(range(3, 3 + n)) if shape in ("runs", "scattered_dst") else rng.sample(range(rows), n)
    dst_idx = list(range(5, 5 + n)) if shape in ("runs", "scattered_src") else rng.sample(range(rows), n)
    for src_dev, dst_dev in ((torch.device("cpu"), device), (device, torch.device("cpu")), (device, device)):
        dst = torch.zeros((rows, width), dtype=torch.int16, device=dst_dev)
        copy_rows(src.to(src_dev), src_idx, dst, dst_idx)
        want = torch.zeros((rows, width), dtype=torch.int16)
        for s, d in zip(src_idx, dst_idx):
            want[d] = src[s]
        assert torch.equal(dst.cpu(), want), (src_dev, dst_dev)


def test_copy_rows_into_a_strided_view_and_checks(device):
    src = torch.arange(6 * 2 * 8, dtype=torch.float16).view(6, 2, 8)
    out = torch.zeros((2, 4, 8), dtype=torch.float16, device=device)  # rows are dim 1
    copy_rows(src.to(device), [5, 0, 3, 1], out.transpose(0, 1), [0, 1, 2, 3])
    assert torch.equal(out.transpose(0, 1).cpu(), src[[5, 0, 3, 1]])
    with pytest.raises(ValueError, match="dtype"):
        copy_rows(src, [0], torch.zeros((1, 2, 8)), [0])
    with pytest.raises(ValueError, match="source rows"):
        copy_rows(src, [0, 1], out.transpose(0, 1), [0])
    assert torch.equal(gather(src, [2, 3]), src[2:4]) and torch.equal(gather(src, [4, 1]), src[[4, 1]])


# -- get into the caller's layout ------------------------------------------------------
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_get_is_byte_exact_from_every_tier_with_scattered_slots(layout, tmp_path, tier, device):
    with store_on(layout, tmp_path, tier) as s:
        # interleave two prompts block by block, so each prompt's slots are scattered
        a, b = list(range(0, 32)), list(range(1000, 1032))
        kv_a, kv_b = make_kv(layout, 32, 1, device), make_kv(layout, 32, 2, device)
        for k in range(1, 9):
            s.put(a[:k * BT], kv_a[:, :, :k * BT])
            s.put(b[:k * BT], kv_b[:, :, :k * BT])
        assert torch.equal(s.get(a, device=device), kv_a)
        out = torch.full_like(kv_b, 7)
        assert s.get(b, out=out) is out and torch.equal(out, kv_b)
        with pytest.raises(InvalidInputError, match="out must be"):
            s.get(b, out=out[:, :, :8])
        with pytest.raises(InvalidInputError, match="out must be"):
            s.get(b, out=out.float())
        s._check()


# -- paged pools -----------------------------------------------------------------------
def pools(layout, num_blocks, device):
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    xlayer = torch.zeros((num_blocks, L, 2, BT, H, D), dtype=layout.dtype, device=device)
    per_layer = [torch.zeros((2, num_blocks, BT, H, D), dtype=layout.dtype, device=device) for _ in range(L)]
    return {"xlayer": xlayer, "layers": per_layer}


def pool_blocks(pool, ids) -> torch.Tensor:
    """``[len(ids), L, 2, BT, H, D]`` read back from either pool layout."""
    idx = torch.as_tensor(ids, device=(pool if isinstance(pool, torch.Tensor) else pool[0]).device)
    if isinstance(pool, torch.Tensor):
        return pool.index_select(0, idx)
    return torch.stack([p.index_select(1, idx) for p in pool]).permute(2, 0, 1, 3, 4, 5)


@pytest.mark.parametrize("kind", ["xlayer", "layers"])
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_load_into_pool_is_byte_exact_and_touches_only_named_blocks(layout, tmp_path, tier, kind, rng, device):
    with store_on(layout, tmp_path, tier) as s:
        tokens = list(range(24))
        kv = make_kv(layout, 24, 3, device)
        s.put(tokens, kv)
        pool = pools(layout, 16, device)[kind]
        ids = rng.sample(range(16), 6)
        assert s.load_into(tokens, pool, ids) == 24
        assert torch.equal(pool_blocks(pool, ids), blocks_of(kv))
        others = [b for b in range(16) if b not in ids]
        assert not pool_blocks(pool, others).any()
        assert s.load_into(tokens[:8], pool, torch.tensor(others[:2])) == 8  # ids as a tensor
        assert torch.equal(pool_blocks(pool, others[:2]), blocks_of(kv[:, :, :8]))


@pytest.mark.parametrize("kind", ["xlayer", "layers"])
def test_save_from_pool_round_trips_and_dedups(layout, tmp_path, kind, rng, device):
    with store_on(layout, tmp_path, "host") as s:
        kv = make_kv(layout, 20, 4, device)
        pool = pools(layout, 12, device)[kind]
        ids = rng.sample(range(12), 6)  # 5 full blocks + the partial tail's block (ignored)
        src = store_on(layout, tmp_path / "src", "device")
        src.put(list(range(20)), kv)
        src.load_into(list(range(20)), pool, ids[:5])
        src.close()
        assert s.save_from(list(range(22)), pool, ids) == 20
        assert torch.equal(s.get(list(range(20)), device=device), kv)
        assert s.save_from(list(range(8)), pool, ids[:2]) == 8
        assert s.stats()["put_blocks"] == 5 and s.stats()["dedup_blocks"] == 2


def test_load_into_missing_block_raises_and_leaves_pool_untouched(layout, tmp_path, device):
    with store_on(layout, tmp_path, "host") as s:
        s.put(list(range(8)), make_kv(layout, 8, 5, device))
        pool = pools(layout, 8, device)["xlayer"]
        with pytest.raises(BlockNotFoundError, match="only 8 of 12"):
            s.load_into(list(range(12)), pool, [0, 1, 2])
        assert not pool.any()
        with pytest.raises(InvalidInputError, match="whole blocks"):
            s.load_into(list(range(6)), pool, [0, 1])


def test_pool_validation_names_the_problem(layout, tmp_path, device):
    with store_on(layout, tmp_path, "host") as s:
        tokens = list(range(8))
        s.put(tokens, make_kv(layout, 8, 6, device))
        p = pools(layout, 4, device)
        bad = [
            (p["xlayer"].float(), "dtype"),
            (p["xlayer"][:, :1], "cross-layer pool must be"),
            (p["layers"][:1], "one tensor per layer"),
            ([t[:, :, :2] for t in p["layers"]], r"pool\[0\] must be"),
            ("pool", "pool must be a tensor"),
        ]
        for pool, msg in bad:
            with pytest.raises(InvalidInputError, match=msg):
                s.load_into(tokens, pool, [0, 1])
        for ids, msg in [([0], "1 block ids for 2"), ([0, 0], "repeat"), ([0, 4], "out of range"),
                         ([0.5, 1], "sequence of ints"), (torch.tensor([0.0, 1.0]), "integer tensor")]:
            with pytest.raises(InvalidInputError, match=msg):
                s.load_into(tokens, p["xlayer"], ids)
            with pytest.raises(InvalidInputError, match=msg):
                s.save_from(tokens, p["xlayer"], ids)
        assert s.stats()["put_blocks"] == 2  # nothing bad was stored


# -- saves that do not stall -----------------------------------------------------------
class GatedArena(MemoryArena):
    """A memory arena whose writes wait for a gate (to observe a save in flight)."""

    def __init__(self, *a, gate: threading.Event, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = gate
        self.writing = threading.Event()

    def write(self, slots, src) -> None:
        self.writing.set()
        assert self.gate.wait(10)
        super().write(slots, src)


def test_put_async_blocks_become_visible_only_once_their_bytes_are_in(layout, device):
    gate = threading.Event()
    arenas = []

    def factory(tier, num_slots, slot_bytes, dev):
        arenas.append(GatedArena(num_slots, slot_bytes, device=dev, gate=gate))
        return arenas[-1]

    bb = layout.kv_block_bytes(BT)
    cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=16 * bb, host_bytes=0, disk_bytes=0)
    with KVStore(cfg, arena_factory=factory) as s:
        tokens = list(range(16))
        kv = make_kv(layout, 16, 7, device)
        h = s.put_async(tokens, kv)
        assert arenas[0].writing.wait(10)  # the copy has started, and is held
        assert not h.done()
        assert s.lookup(tokens) == 0  # invisible while the bytes are not in
        with pytest.raises(BlockNotFoundError):
            s.get(tokens[:4])
        gate.set()
        assert h.wait(10) == 16 and h.done()
        assert s.lookup(tokens) == 16
        assert torch.equal(s.get(tokens, device=device), kv)
        s._check()


def test_put_async_matches_put_and_close_waits(layout, tmp_path, device):
    kv = make_kv(layout, 24, 8, device)
    with store_on(layout, tmp_path, "host", blocks=4) as s:  # too small: falls back to put's spill rules
        assert s.put_async(list(range(8)), kv[:, :, :8]).wait(10) == 8
    s = store_on(layout, tmp_path, "host")
    handles = [s.put_async(list(range(k * BT)), kv[:, :, :k * BT]) for k in range(1, 7)]
    with pytest.raises(InvalidInputError):
        s.put_async(list(range(8)), kv[:, :, :4])  # bad input raises at once
    s.close()  # waits for every accepted save
    assert all(h.done() for h in handles) and [h.wait() for h in handles] == [4, 8, 12, 16, 20, 24]
    with store_on(layout, tmp_path / "b", "device") as s:
        s.put_async(list(range(24)), kv).wait(10)
        assert torch.equal(s.get(list(range(24)), device=device), kv)
        assert s.stats()["put_blocks"] == 6


def test_memory_arena_moves_rows_across_devices_and_layouts(device, rng):
    arena = MemoryArena(8, 4 * 2 * 16 * 2, device=device)  # slots of [4, 2, 16] fp16
    src = torch.randn(4, 2, 4, 16).to(torch.float16)  # rows are dim 2: a strided view below
    rows = src.permute(2, 0, 1, 3)
    slots = rng.sample(range(8), 4)
    arena.write(slots, rows)  # from the CPU, non-contiguous
    for dst_dev in (torch.device("cpu"), device):
        out = torch.zeros(4, 2, 4, 16, dtype=torch.float16, device=dst_dev)
        arena.read(slots, out.permute(2, 0, 1, 3))  # straight into a permuted view
        assert torch.equal(out.cpu(), src)
    with pytest.raises(ValueError, match="row of"):
        arena.write([0], torch.zeros(1, 3))


def test_load_fills_the_leading_tokens_of_an_engine_buffer(layout, device):
    """``load(out=buf)``: the buffer may cover the whole prompt; the plan's restored prefix is
    written into its leading tokens, the rest is untouched, and a too-short buffer is refused."""
    from kvstore.bench.api import _Projection
    from kvstore.restore.costmodel import ComputeCost, CostModel, CostProfile, LinkCost

    proj = _Projection(layout, device)
    act = torch.randn(layout.act_shape(12), generator=torch.Generator().manual_seed(9)).to(layout.dtype)
    kv = proj.recompute_kv(act.to(device))
    bb, ab = layout.kv_block_bytes(BT), layout.act_block_bytes(BT)

    def store(prefill_rate: float) -> KVStore:
        prof = CostProfile(links={"disk->host": LinkCost(1e9), "host->device": LinkCost(1e9)},
                           recompute=ComputeCost(1e3), prefill=ComputeCost(prefill_rate), device="test")
        cfg = StoreConfig(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=8 * (bb + ab), disk_bytes=0,
                          act_share=ab / (bb + ab), activations="beside")
        return KVStore(cfg, adapter=proj, cost_model=CostModel(prof))

    prompt = list(range(18))  # 3 cached blocks, then 6 new tokens
    with store(prefill_rate=1.0) as s:  # prefill hopeless: restore every cached block
        s.put(prompt[:12], kv.cpu(), activations=act)
        buf = torch.full(layout.kv_shape(18), float("nan"), dtype=layout.dtype, device=device)
        res = s.load(prompt, out=buf)
        assert res.tokens_restored == 12 and res.kv.data_ptr() == buf.data_ptr()
        assert torch.equal(buf[:, :, :12], kv) and buf[:, :, 12:].isnan().all()
        with pytest.raises(InvalidInputError, match="at least"):
            s.load(prompt, out=buf[:, :, :8].contiguous())
    with store(prefill_rate=1e30) as s:  # prefill free: nothing restored, nothing written
        s.put(prompt[:12], kv.cpu(), activations=act)
        buf = torch.full(layout.kv_shape(18), float("nan"), dtype=layout.dtype, device=device)
        assert s.load(prompt, out=buf).tokens_restored == 0 and buf.isnan().all()
