"""A paged, tiered KV-cache store for LLM inference (see DESIGN.md).

``from kvstore import KVStore, StoreConfig, ModelLayout``
"""

from kvstore.config import StoreConfig
from kvstore.errors import (BlockNotFoundError, CapacityError, ConfigError, InvalidInputError,
                            KVStoreError, StoreClosedError)
from kvstore.layout import ModelLayout
from kvstore.store import KVStore

__all__ = ["KVStore", "StoreConfig", "ModelLayout", "KVStoreError", "ConfigError", "InvalidInputError",
           "BlockNotFoundError", "CapacityError", "StoreClosedError"]
