"""Checks of a put's tensors, shared by the embedded store and the sidecar client (which
must reject bad input with the same error before sending anything)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout


def _check(what: str, t: Any, layout: ModelLayout, expected: tuple[int, ...], dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != layout.dtype:
        raise InvalidInputError(f"{what} dtype is {t.dtype}, the layout says {layout.dtype}")
    if tuple(t.shape) != expected:
        raise InvalidInputError(f"{what} shape is {tuple(t.shape)}, expected {expected} [{dims}]")


def check_kv(layout: ModelLayout, kv: Any, num_tokens: int) -> None:
    """``kv`` must be ``[layers, 2, num_tokens, kv_heads, head_dim]`` of the layout's dtype."""
    _check("kv", kv, layout, layout.kv_shape(num_tokens), "layers, 2, len(tokens), kv_heads, head_dim")


def check_act(layout: ModelLayout, act: Any, num_tokens: int) -> None:
    """``act`` must be ``[layers, num_tokens, hidden]`` of the layout's dtype."""
    _check("activations", act, layout, layout.act_shape(num_tokens), "layers, len(tokens), hidden")


def check_whole_blocks(num_tokens: int, block_tokens: int) -> None:
    """Reads (``get``, ``load_into``) take whole blocks only: a partial one is refused."""
    if num_tokens % block_tokens:
        raise InvalidInputError(f"get needs whole blocks: {num_tokens} tokens is not a multiple of "
                                f"block_tokens={block_tokens} (use lookup() for the cached length)")


def check_start(start: Any, num_blocks: int) -> int:
    """``load_into``'s ``start``: an int in ``[0, num_blocks]`` (the first block of the prefix
    to copy; ``num_blocks`` copies none). Shared so every client refuses the same values
    before anything is sent or read. O(1)."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise InvalidInputError(f"start must be an int, got {type(start).__name__}")
    if not 0 <= int(start) <= num_blocks:
        raise InvalidInputError(f"start={int(start)} is outside the prefix's {num_blocks} block(s) "
                                f"(0 <= start <= {num_blocks})")
    return int(start)
