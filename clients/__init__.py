"""One client interface for engines, embedded or remote (DESIGN.md).

``from clients import connect``::

    c = connect("tcp://127.0.0.1:5555", layout=layout, namespace="model-a", block_tokens=16)
    c.put(tokens, kv); c.lookup(tokens); c.get(tokens); c.stats(); c.close()

``embedded://`` gives an in-process :class:`~kvstore.KVStore`; ``tcp://`` and ``ipc://`` a
:class:`RemoteClient` talking to ``kvstore serve``. Both raise the same exception classes.
"""

from clients.base import BlockLoadError, KVClient, LoadResult, connect
from clients.embedded import EmbeddedClient
from clients.remote import CurveConfig, RemoteClient

__all__ = ["BlockLoadError", "LoadResult", "KVClient", "CurveConfig", "EmbeddedClient", "RemoteClient", "connect"]
