"""The ``KVClient`` protocol and ``connect``: pick an implementation from a URL."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from kvstore.errors import InvalidInputError
from kvstore.layout import ModelLayout


@runtime_checkable
class KVClient(Protocol):
    """What an engine calls: the :class:`~kvstore.KVStore` methods (docs/architecture.md)."""

    def put(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int: ...

    def lookup(self, tokens: Any, *, exact: bool | None = None) -> int: ...

    def get(self, tokens: Any, device: torch.device | str | None = None, *, exact: bool | None = None
            ) -> torch.Tensor: ...

    def load_into(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any, *,
                  exact: bool | None = None) -> int: ...

    def save_from(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> int: ...

    def stats(self) -> dict: ...

    def clear(self) -> int: ...

    def plan(self, tokens: Any, profile: dict | None = None) -> dict: ...

    def close(self) -> None: ...

    def __enter__(self) -> "KVClient": ...

    def __exit__(self, *exc: object) -> None: ...


def connect(url: str, layout: ModelLayout | None = None, namespace: str = "default", block_tokens: int = 16,
            **options: Any) -> KVClient:
    """A client for ``url``: ``embedded://`` (in-process store; ``options`` are
    ``StoreConfig`` fields such as ``device_bytes``), ``tcp://host:port`` or ``ipc:///path``
    (the sidecar; ``options`` are :class:`~clients.remote.RemoteClient` keywords such as
    ``timeout``, ``curve=CurveConfig(secret=..., server=...)``). Raises :class:`~kvstore.sidecar.protocol.SidecarUnavailableError` when no sidecar
    answers, :class:`~kvstore.sidecar.protocol.LayoutMismatchError` when the namespace has another
    layout, :class:`~kvstore.sidecar.protocol.VersionMismatchError` for another protocol version.
    """
    if not isinstance(url, str):
        raise InvalidInputError(f"url must be a string, got {type(url).__name__}")
    if layout is None:
        raise InvalidInputError("connect needs the model's layout (layout=ModelLayout(...))")
    if url.startswith("embedded://"):
        from clients.embedded import EmbeddedClient

        return EmbeddedClient(layout, namespace=namespace, block_tokens=block_tokens, **options)
    if url.startswith(("tcp://", "ipc://")):
        from clients.remote import RemoteClient

        return RemoteClient(url, layout, namespace=namespace, block_tokens=block_tokens, **options)
    raise InvalidInputError(f"unsupported URL {url!r}: use embedded://, tcp://host:port or ipc:///path")
