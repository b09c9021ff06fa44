"""The restore executor across devices (issue 26): activations in a device tier restored into
a host ``out`` (item 2) are waited for before the CPU reads them -- proven on CPU with the
delayed-copy device; its CUDA timing (item 7) and stream waits (item 10) where CUDA is."""

from __future__ import annotations

import pytest
import torch

from allocator import MemoryArena
from kvstore import ModelLayout
from kvstore.restore.costmodel import ComputeCost, CostModel, CostProfile, LinkCost
from kvstore.restore.executor import Executor, Source
from kvstore.restore.planner import Step
from tests.delayed_copies import DelayedCopier

BT = 4


class SplitAdapter:
    """Recomputes K/V exactly: K is the first half of each activation row, V the second
    (hidden = 2 * kv_heads * head_dim), so the expected KV is known bit for bit."""

    def __init__(self, layout: ModelLayout) -> None:
        assert layout.hidden_size == 2 * layout.num_kv_heads * layout.head_dim
        self.layout = layout

    def recompute_kv(self, act, start_pos=0, layers=None, out=None):
        a, b = layers if layers is not None else (0, self.layout.num_layers)
        L, T, _ = act.shape
        kvd = self.layout.num_kv_heads * self.layout.head_dim
        kv = torch.stack((act[a:b, :, :kvd], act[a:b, :, kvd:]), dim=1)
        kv = kv.view(b - a, 2, T, self.layout.num_kv_heads, self.layout.head_dim)
        if out is None:
            return kv
        out.copy_(kv)
        return out


def _expected(layout: ModelLayout, act_blocks: torch.Tensor) -> torch.Tensor:
    """KV of ``act_blocks`` ([n, L, bt, hidden]) as ``[L, 2, n*bt, H, D]``."""
    n = act_blocks.shape[0]
    act = act_blocks.permute(1, 0, 2, 3).reshape(layout.num_layers, n * BT, layout.hidden_size)
    return SplitAdapter(layout).recompute_kv(act)


def _profile() -> CostProfile:
    return CostProfile(links={"disk->host": LinkCost(1e9, 1e-4), "host->device": LinkCost(1e10, 1e-5)},
                       recompute=ComputeCost(1e12, 1e-4), prefill=ComputeCost(1e12, 1e-3), device="test")


@pytest.mark.parametrize("layerwise", [False, True])
def test_activations_on_a_device_restored_into_a_host_out_are_waited_for(layout, seed, layerwise):
    """Item 2: ``get(device="cpu")`` with activations in the (fake) device tier: the CPU lays
    the activations out and recomputes only after their device->host copies landed."""
    copier = DelayedCopier()
    n = 6
    act_arena = MemoryArena(8, layout.act_block_bytes(BT), device="cpu", copier=copier)
    copier.put_on(act_arena.data)
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, layout.num_layers, BT, layout.hidden_size, generator=g).to(layout.dtype)
    slots = [5, 0, 1, 7, 3, 4]  # runs and gaps
    act_arena.rows(layout.dtype, acts.shape[1:])[slots] = acts
    steps = [Step(b, "recompute", "device") for b in range(n)]
    src = [Source("device", act_arena, s) for s in slots]
    out = torch.full(layout.kv_shape(n * BT), float("nan"), dtype=layout.dtype)
    ex = Executor(layout, BT, copier=copier, chunk_bytes=2 * layout.act_block_bytes(BT))
    seen: list[int] = []
    res = ex.run(steps, [None] * n, src, out, SplitAdapter(layout), on_layer=seen.append if layerwise else None)
    assert res.corrupt == [] and copier.crossings > 0 and copier.in_flight() == 0
    assert torch.equal(out, _expected(layout, acts)), f"seed {seed}"
    assert seen == (list(range(layout.num_layers)) if layerwise else [])


def test_kv_on_a_device_restored_into_a_host_out(layout, seed):
    """KV slots of a (fake) device tier copied into a host ``out`` are in when run returns."""
    copier = DelayedCopier()
    kv_arena = MemoryArena(8, layout.kv_block_bytes(BT), device="cpu", copier=copier)
    copier.put_on(kv_arena.data)
    shape = (layout.num_layers, 2, BT, layout.num_kv_heads, layout.head_dim)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(4, *shape, generator=g).to(layout.dtype)
    slots = [6, 2, 3, 0]
    kv_arena.rows(layout.dtype, shape)[slots] = blocks
    out = torch.full(layout.kv_shape(4 * BT), float("nan"), dtype=layout.dtype)
    Executor(layout, BT, copier=copier).run([Step(b, "kv", "device") for b in range(4)],
                                            [Source("device", kv_arena, s) for s in slots], [None] * 4, out)
    want = blocks.permute(1, 2, 0, 3, 4, 5).reshape(out.shape)
    assert torch.equal(out, want) and copier.in_flight() == 0


@pytest.mark.cuda
def test_cuda_restore_times_copies_by_events_not_by_their_enqueue(layout):
    """Item 7: host->device activations (pinned host tier) into a CUDA ``out``: the observed
    link time is the copy's own (events), so the learned bandwidth stays below the link's
    peak measured in the same run, and the result is exact."""
    lay = ModelLayout(num_layers=4, num_kv_heads=8, head_dim=128, hidden_size=2048, dtype=torch.float16)
    n, bt = 64, 16
    act_arena = MemoryArena(n, lay.act_block_bytes(bt), device="cpu", pin=True)
    acts = torch.randn(n, lay.num_layers, bt, lay.hidden_size).to(lay.dtype)
    act_arena.rows(lay.dtype, acts.shape[1:])[:] = acts
    cm = CostModel(_profile())
    out = torch.empty(lay.kv_shape(n * bt), dtype=lay.dtype, device="cuda")
    ex = Executor(lay, bt, cost_model=cm)
    res = ex.run([Step(b, "recompute", "host") for b in range(n)], [None] * n,
                 [Source("host", act_arena, b) for b in range(n)], out, SplitAdapter(lay))
    nbytes = res.timings.bytes["host->device"]
    seconds = res.timings.busy_s["host->device"]
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    flat = act_arena.data.view(-1)[:nbytes]
    dst.copy_(flat, non_blocking=True)
    torch.cuda.synchronize("cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(flat, non_blocking=True)
    end.record()
    end.synchronize()
    peak = nbytes / (start.elapsed_time(end) / 1e3)
    assert nbytes / seconds <= 1.5 * peak, (nbytes / seconds, peak)
    assert res.timings.busy_s["compute"] > 0
    lay_sa = SplitAdapter(lay)
    want = lay_sa.recompute_kv(acts.permute(1, 0, 2, 3).reshape(lay.num_layers, n * bt, lay.hidden_size).cuda())
    assert torch.equal(out, want)
    act_arena.close()
