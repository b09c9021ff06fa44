"""Activations as a second payload of the store: the disk slab's kind and the keep rule.

A block may hold KV, activations (``[layers, block_tokens, hidden]``: the input of the K/V
projections, see :mod:`kvstore.models.hf` for why post-norm), or both. Each form has its own tier
manager, arenas and slots (sized ``layout.act_block_bytes``), keyed by the same block keys,
so capacities, eviction and pins of one form never disturb the other's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from allocator.disk import KIND_ACT, DiskArena

Form = str  # "kv" | "act"


class ActDiskArena(DiskArena):
    """A slab of activation blocks: every slot header it writes says ``KIND_ACT``.

    A subclass rather than a flag at each call site because the tier manager's batched
    moves (``allocator.transfer``) write through ``DiskArena.write`` without a kind, and a
    recovered slab must never hand activations back as KV. Same costs as ``DiskArena``.
    """

    def write(self, slots: Sequence[int], src: torch.Tensor, keys: Sequence[bytes] | None = None,
              kind: int = KIND_ACT, parents: Sequence[bytes | None] | None = None, expect=None) -> None:
        super().write(slots, src, keys=keys, kind=KIND_ACT, parents=parents, expect=expect)


def keeps_activations(mode: str, act_blocks: int, block_index: int) -> bool:
    """Whether a put keeps activations for block ``block_index`` of its sequence. O(1)."""
    return mode != "none" and (act_blocks == 0 or block_index < act_blocks)


def put_forms(mode: str, act_blocks: int, nblocks: int, have_activations: bool
              ) -> tuple[list[bool], list[bool]]:
    """(wants KV, wants activations) per block of a put, by the config's rule. O(blocks).

    ``"instead"`` drops the KV only of blocks that get activations; without activations in
    the call every block keeps its KV.
    """
    want_act = [have_activations and keeps_activations(mode, act_blocks, i) for i in range(nblocks)]
    want_kv = [not (mode == "instead" and a) for a in want_act]
    return want_kv, want_act
