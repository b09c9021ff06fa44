"""One client interface for engines, embedded or over the sidecar (docs/architecture.md).

``from clients import connect``::

    c = connect("tcp://127.0.0.1:5555", layout=layout, namespace="model-a", block_tokens=16)
    c.put(tokens, kv); c.lookup(tokens); c.get(tokens); c.stats(); c.close()

``embedded://`` gives an in-process :class:`~kvstore.KVStore`; ``tcp://`` and ``ipc://`` a
:class:`SidecarClient` talking to ``kvstore serve``. Both raise the same exception classes.

Names are resolved lazily (PEP 562), as in :mod:`kvstore`: a process that only talks to a
sidecar (``clients.sidecar``) does not import the store core that the embedded client needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BlockLoadError": "clients.base",
    "LoadResult": "clients.base",
    "KVClient": "clients.base",
    "connect": "clients.base",
    "EmbeddedClient": "clients.embedded",
    "CurveConfig": "clients.sidecar",
    "SidecarClient": "clients.sidecar",
    "RemoteClient": "clients.remote",  # the old name of SidecarClient, kept for one release
}

__all__ = ["BlockLoadError", "LoadResult", "KVClient", "CurveConfig", "EmbeddedClient", "SidecarClient", "RemoteClient",
           "connect"]

if TYPE_CHECKING:  # pragma: no cover
    from clients.base import BlockLoadError, KVClient, LoadResult, connect
    from clients.embedded import EmbeddedClient
    from clients.remote import RemoteClient
    from clients.sidecar import CurveConfig, SidecarClient


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
