"""``EmbeddedClient``: the client interface over an in-process :class:`~kvstore.KVStore`."""

from __future__ import annotations

from typing import Any

import torch

from kvstore.config import StoreConfig
from kvstore.errors import StoreClosedError
from kvstore.layout import ModelLayout
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

    def load_into(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any, *,
                  exact: bool | None = None) -> int:
        return self._check().load_into(tokens, pool, block_ids, exact=exact)

    def save_from(self, tokens: Any, pool: torch.Tensor | list[torch.Tensor], block_ids: Any) -> int:
        return self._check().save_from(tokens, pool, block_ids)

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
        self._closed = True
        if self._owned:
            self.store.close()

    def __enter__(self) -> "EmbeddedClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
