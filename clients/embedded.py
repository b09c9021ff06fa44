"""``EmbeddedClient``: the client interface over an in-process :class:`~kvstore.KVStore`."""

from __future__ import annotations

from typing import Any

import torch

import numpy as np

from clients.base import LoadResult
from kvstore import paged
from kvstore.config import StoreConfig
from kvstore.errors import BlockNotFoundError, InvalidInputError, StoreClosedError
from kvstore.hashing import tokens_to_array
from kvstore.layout import ModelLayout
from kvstore.saves import AsyncSaver, PutHandle
from kvstore.store import KVStore


class EmbeddedClient:
    """Delegates to a store it owns (built from ``StoreConfig`` fields in ``options``) or
    one passed in as ``store=`` (then ``close`` leaves it open). No copies beyond the store's."""

    def __init__(self, layout: ModelLayout | None = None, *, namespace: str = "default", block_tokens: int = 16,
                 store: KVStore | None = None, **options: Any) -> None:
        if store is None:
            store = KVStore(StoreConfig(layout=layout, block_tokens=block_tokens, namespace=namespace, **options))
            self._owned = True
        else:
            self._owned = False
        self.store = store
        self.layout = store.layout
        self.block_tokens = store.block_tokens
        self.namespace = store.config.namespace
        self._closed = False
        self._saver = AsyncSaver()  # save_from_async, in submission order

    def _check(self) -> KVStore:
        if self._closed:
            raise StoreClosedError("the client is closed")
        return self.store

    def put(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> int:
        return self._check().put(tokens, kv, activations)

    def lookup(self, tokens: Any, *, exact: bool | None = None) -> int:
        return self._check().lookup(tokens, exact=exact)

    def get(self, tokens: Any, device: torch.device | str | None = None, *, exact: bool | None = None) -> torch.Tensor:
        return self._check().get(tokens, device=device, exact=exact)

    def put_async(self, tokens: Any, kv: torch.Tensor, activations: torch.Tensor | None = None) -> PutHandle:
        """``KVStore.put_async``: returns a handle at once; visible once all bytes are in."""
        return self._check().put_async(tokens, kv, activations)

    def load_into(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any, *,
                  on_error: str = "raise", exact: bool | None = None, start: int = 0) -> LoadResult:
        """``KVStore.load_into`` with the sidecar client's reporting (see
        ``SidecarClient.load_into``, also for ``start``): a missing block fails the call
        before the pool is written; ``on_error="report"`` then returns a :class:`LoadResult`
        of ``start * block_tokens`` tokens naming every id as not loaded (a block failing
        its checksum is dropped and reported the same way, though the other ids' rows may
        have been written)."""
        if on_error not in ("raise", "report"):
            raise InvalidInputError(f"on_error must be 'raise' or 'report', got {on_error!r}")
        store = self._check()
        try:
            return LoadResult(store.load_into(tokens, pool, block_ids, exact=exact, start=start))
        except BlockNotFoundError:
            if on_error == "raise":
                raise
            nb = len(tokens_to_array(tokens)) // self.block_tokens
            _, num_blocks = paged.pool_rows(self.layout, self.block_tokens, pool)
            ids = paged.block_ids(block_ids, nb - start, num_blocks)
            return LoadResult(start * self.block_tokens, ids, range(start, nb))

    def save_from(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> int:
        return self._check().save_from(tokens, pool, block_ids)

    def save_from_async(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> PutHandle:
        """``save_from`` on the client's save thread (``put_async``'s semantics: the pool and
        ids are checked now, the blocks become visible once all bytes are in, the pool blocks
        must not change until ``handle.done()``, ``close()`` waits). On CUDA the copy starts
        after the caller's current stream reaches this point."""
        store = self._check()
        arr = np.array(tokens_to_array(tokens), copy=True)
        rows, num_blocks = paged.pool_rows(self.layout, self.block_tokens, pool)
        nb = len(arr) // self.block_tokens
        ids = paged.block_ids(block_ids, nb, num_blocks, spare=1 if len(arr) % self.block_tokens else 0)
        tensors = list(rows) if isinstance(rows, paged.LayerRows) else [rows]
        return self._saver.submit(lambda: store.save_from(arr, pool, ids), *tensors)

    def stats(self) -> dict:
        return self._check().stats()

    def clear(self) -> int:
        return self._check().clear()

    def plan(self, tokens: Any, profile: dict | None = None) -> dict:
        from kvstore.restore.summary import plan_result

        return plan_result(self._check(), tokens, profile)

    def close(self) -> None:
        if self._closed:
            return
        self._saver.close()  # the saves in flight finish first
        self._closed = True
        if self._owned:
            self.store.close()

    def __enter__(self) -> "EmbeddedClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
