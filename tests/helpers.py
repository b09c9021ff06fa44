"""Comparisons that hold wherever the store returns results (CUDA when present, else CPU)."""

from __future__ import annotations

import torch


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bytes equal, compared on ``got``'s device (the store's, or the one asked for)."""
    return torch.equal(got, want.to(got.device))
