"""Exceptions a user of the store can catch by meaning."""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the store raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """The configuration cannot work (capacity below one block, unwritable disk path...)."""


class NamespaceOwnerError(ConfigError, PermissionError):
    """The namespace's persisted data belongs to another owner (authenticated identity)."""


class InvalidInputError(KVStoreError, ValueError):
    """A call's arguments are malformed: wrong dtype, shape, length, token type..."""


class BlockNotFoundError(KVStoreError, KeyError):
    """A requested prefix is not (fully) cached. Nothing partial is ever returned."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "block not found"


class CapacityError(KVStoreError):
    """No room could be made (every block in the way is pinned by in-flight reads)."""


class StoreClosedError(KVStoreError):
    """The store was closed."""
