"""Property-based fuzzing of the store API against a model (a dict of what must be there).

Random valid and invalid operation sequences; after every step the invariants hold and no
stored block changed: every ``get`` returns exactly the bytes the model holds for that
prefix, or a clean miss.
"""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
import pytest
import torch

from tests.helpers import same

from allocator.disk import slab_file_bytes
from kvstore import BlockNotFoundError, InvalidInputError, KVStore, ModelLayout, StoreConfig

BT = 4
LAYOUT = ModelLayout(num_layers=1, num_kv_heads=1, head_dim=4, hidden_size=8, dtype=torch.float16)
# A small alphabet and short prompts so prefixes collide often.
tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=14)


def kv_of(tokens: list[int]) -> torch.Tensor:
    """Deterministic KV of a prefix (equal prefixes -> equal KV, as a real model gives)."""
    out = torch.empty(LAYOUT.kv_shape(len(tokens)), dtype=LAYOUT.dtype)
    h = 17
    for i, t in enumerate(tokens):
        h = (h * 31 + t + 1) % 65521
        out[:, :, i] = float(h % 997) / 7.0
    return out


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvstore-fuzz-")
        self.persist = False
        self.store = self._open()
        self.model: dict[tuple[int, ...], torch.Tensor] = {}  # full-block prefix -> its last block
        self.hits = 0

    def _open(self) -> KVStore:
        bb = LAYOUT.kv_block_bytes(BT)
        return KVStore(StoreConfig(layout=LAYOUT, block_tokens=BT, device_bytes=2 * bb, host_bytes=3 * bb,
                                   disk_bytes=slab_file_bytes(6, bb), disk_path=self.dir, persist=True))

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    prompts = Bundle("prompts")

    @rule(target=prompts, tokens=tokens_st)
    def new_prompt(self, tokens):
        return tokens

    @rule(target=prompts, base=prompts, cut=st.integers(0, 4), extra=tokens_st)
    def extend_prompt(self, base, cut, extra):
        """A later turn: an earlier prompt's leading blocks plus new tokens."""
        return base[:min(cut, len(base) // BT) * BT] + extra

    @rule(tokens=prompts)
    def put(self, tokens):
        n = self.store.put(tokens, kv_of(tokens))
        assert n % BT == 0 and n <= len(tokens) // BT * BT
        kv = kv_of(tokens)
        for b in range(len(tokens) // BT):
            self.model[tuple(tokens[:(b + 1) * BT])] = kv[:, :, b * BT:(b + 1) * BT]

    @rule(tokens=prompts)
    def lookup_and_get(self, tokens):
        n = self.store.lookup(tokens)
        assert n % BT == 0 and n <= len(tokens)
        for b in range(n // BT):
            assert tuple(tokens[:(b + 1) * BT]) in self.model, "store claims a block never put"
        if n:
            self.hits += 1
            got = self.store.get(tokens[:n])
            want = torch.cat([self.model[tuple(tokens[:(b + 1) * BT])] for b in range(n // BT)], dim=2)
            assert same(got, want)

    @rule(tokens=prompts)
    def get_beyond_the_cached_prefix_is_a_clean_miss(self, tokens):
        n = self.store.lookup(tokens)
        whole = len(tokens) // BT * BT
        if whole > n:
            with pytest.raises(BlockNotFoundError):
                self.store.get(tokens[:whole])

    @rule(tokens=prompts, bad=st.sampled_from(["dtype", "short", "tokens", "empty", "nan_tokens"]))
    def bad_put_changes_nothing(self, tokens, bad):
        before = self.store.stats()["blocks"]
        kv = kv_of(tokens)
        with pytest.raises(InvalidInputError):
            if bad == "dtype":
                self.store.put(tokens, kv.float())
            elif bad == "short":
                self.store.put(tokens + [0], kv)
            elif bad == "tokens":
                self.store.put([float(t) for t in tokens], kv)
            elif bad == "empty":
                self.store.put([], kv[:, :, :0])
            else:
                self.store.put(["x"] * len(tokens), kv)
        assert self.store.stats()["blocks"] == before

    @rule()
    def clear(self):
        self.store.clear()
        assert self.store.stats()["blocks"] == 0

    @rule()
    def restart(self):
        self.store.close()
        self.store = self._open()

    @invariant()
    def invariants_hold(self):
        self.store._check()
        for tier in self.store.stats()["tiers"].values():
            assert tier["used_blocks"] <= tier["capacity_blocks"]


StoreMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_store_state_machine = StoreMachine.TestCase
