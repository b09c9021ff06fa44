"""``from kvstore.hf import HFAdapter``: the public name of the model adapter (extra ``hf``).

A re-export only; the adapters live in :mod:`kvstore.models`.
"""

from kvstore.models import HFAdapter

__all__ = ["HFAdapter"]
