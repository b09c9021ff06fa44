"""Model adapters: capture a model's KV and the activations that recompute needs, and
recompute KV from them (``HFAdapter`` for transformers causal LMs).

Owns: everything that knows a model architecture. May import: the store's layout and
errors (``kvstore.layout``, ``kvstore.errors``), torch and transformers; nothing else of
ours, so the store never depends on a model library.
"""

from kvstore.models.hf import HFAdapter

__all__ = ["HFAdapter"]
