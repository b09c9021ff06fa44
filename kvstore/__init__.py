"""A paged, tiered KV-cache store for LLM inference (see docs/architecture.md).

``from kvstore import KVStore, StoreConfig, ModelLayout``

Names are resolved lazily (PEP 562) so that ``kvstore --help`` and the light subcommands do
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "KVStore": "kvstore.store",
    "StoreConfig": "kvstore.config",
    "ModelLayout": "kvstore.layout",
    "KVStoreError": "kvstore.errors",
    "ConfigError": "kvstore.errors",
    "InvalidInputError": "kvstore.errors",
    "BlockNotFoundError": "kvstore.errors",
    "CapacityError": "kvstore.errors",
    "StoreClosedError": "kvstore.errors",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from kvstore.config import StoreConfig
    from kvstore.errors import (BlockNotFoundError, CapacityError, ConfigError, InvalidInputError,
                                KVStoreError, StoreClosedError)
    from kvstore.layout import ModelLayout
    from kvstore.store import KVStore


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
