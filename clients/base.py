"""The ``KVClient`` protocol and ``connect``: pick an implementation from a URL; what
``load_into`` reports (:class:`LoadResult`, :class:`BlockLoadError`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from kvstore.errors import BlockNotFoundError, InvalidInputError
from kvstore.layout import ModelLayout
from kvstore.saves import PutHandle


class LoadResult(int):
    """What ``load_into`` did: an ``int`` (the tokens loaded, as before) that also names the
    blocks that failed.

    * ``failed_block_ids``: the engine's pool block ids whose rows hold unusable bytes (a
      block changed in shared memory after it was written, or was not loaded at all); the
      engine must not attend over them -- a vLLM connector reports them as load errors;
    * ``failed_positions``: the same blocks as positions in the prefix (block ``i`` is tokens
      ``[i * block_tokens, (i + 1) * block_tokens)``).

    With no failure the value is ``len(tokens)`` and both tuples are empty; with failures it
    is the tokens of the prefix before the first failed block. With ``start=k`` (copy only
    blocks ``k...``) positions stay positions in the whole prefix (all ``>= k``), the ids
    are among the ``block_ids`` given (one per copied block), and the blocks before ``k``
    count as loaded: the value is at least ``k * block_tokens``.
    """

    failed_block_ids: tuple[int, ...]
    failed_positions: tuple[int, ...]

    def __new__(cls, tokens: int, failed_block_ids: Iterable[int] = (),
                failed_positions: Iterable[int] = ()) -> "LoadResult":
        self = super().__new__(cls, tokens)
        self.failed_block_ids = tuple(int(b) for b in failed_block_ids)
        self.failed_positions = tuple(int(p) for p in failed_positions)
        return self

    @property
    def ok(self) -> bool:
        return not self.failed_block_ids

    def __repr__(self) -> str:
        return (f"LoadResult({int(self)}, failed_block_ids={list(self.failed_block_ids)}, "
                f"failed_positions={list(self.failed_positions)})")


class BlockLoadError(BlockNotFoundError):
    """``load_into`` found blocks it could not deliver (``on_error="raise"``): ``result`` is
    the :class:`LoadResult`; ``failed_block_ids`` the pool blocks whose rows are unusable."""

    def __init__(self, result: LoadResult, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.failed_block_ids = result.failed_block_ids
        self.failed_positions = result.failed_positions


@runtime_checkable
class KVClient(Protocol):
    """What an engine calls: the :class:`~kvstore.KVStore` methods (docs/architecture.md)."""

    def put(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int: ...

    def lookup(self, tokens: Any, *, exact: bool | None = None) -> int: ...

    def get(self, tokens: Any, device: torch.device | str | None = None, *, exact: bool | None = None
            ) -> torch.Tensor: ...

    def put_async(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> PutHandle: ...

    def load_into(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any, *,
                  on_error: str = "raise", exact: bool | None = None, start: int = 0) -> LoadResult: ...

    def save_from(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> int: ...

    def save_from_async(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> PutHandle: ...

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
    (the sidecar; ``options`` are :class:`~clients.sidecar.SidecarClient` keywords such as
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
        from clients.sidecar import SidecarClient

        return SidecarClient(url, layout, namespace=namespace, block_tokens=block_tokens, **options)
    raise InvalidInputError(f"unsupported URL {url!r}: use embedded://, tcp://host:port or ipc:///path")
