"""Model adapters: capture a model's KV and the activations that recompute needs, and
recompute KV from them (``HFAdapter`` for transformers causal LMs).

Owns: everything that knows a model architecture. Modules: ``hf`` (the adapter),
``compat`` (what the installed transformers release expects of a cache, found by
signature and attributes), ``families`` (which architectures, one line each, and which
are refused and why), ``projections`` (where K/V rows sit in each fused layout), ``norms``
and ``rotary`` (K's norm and rotation through the model's own modules). May import: the
store's layout and errors (``kvstore.layout``, ``kvstore.errors``), torch and transformers;
nothing else of ours, so the store never depends on a model library.
"""

from kvstore.models.hf import CaptureError, HFAdapter

__all__ = ["CaptureError", "HFAdapter"]
