"""Chained 128-bit block hashes, salted with the namespace.

Block ``i``'s key is ``H(key[i-1] || tokens of block i as int32 LE)`` with ``H`` = BLAKE2b-128
keyed by a salt derived from the namespace, the model layout and ``block_tokens``. Chaining
makes a key name the whole prefix up to its block (equal keys mean equal prefixes), and the
keyed hash means two tenants with the same prompt get unrelated keys -- they can never share
or probe each other's blocks -- while a cryptographic hash makes a crafted collision
infeasible (a non-cryptographic hash would let one tenant poison another's prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import itertools

import numpy as np
import torch

from kvstore.errors import InvalidInputError

KEY_BYTES = 16
_ONLY_INT = {int}
_I4 = np.dtype("<i4")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def namespace_salt(namespace: str, layout_desc: str = "", block_tokens: int = 0,
                   owner: str | None = None) -> bytes:
    """A 64-byte BLAKE2b key naming (namespace, layout, block size[, owner]): a namespace
    owned by an authenticated identity has keys no other owner's store can produce."""
    h = hashlib.blake2b(digest_size=64, person=b"kvstore-ns-v1")
    h.update(f"{namespace}\x00{layout_desc}\x00{block_tokens}".encode())
    if owner is not None:
        h.update(b"\x00owner\x00" + owner.encode())
    return h.digest()


def tokens_to_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate tokens and return them as a contiguous little-endian int32 array.

    Accepts a sequence of Python ints, a 1-D integer numpy array or torch tensor. Rejects
    empty input, floats, bools, nested lists and values outside int32 with a clear error.
    """
    if type(tokens) is list and tokens and set(map(type, tokens)) == _ONLY_INT:  # the common case, fast
        try:
            return np.fromiter(tokens, dtype="<i4", count=len(tokens))
        except OverflowError:
            raise InvalidInputError("token ids must fit in int32") from None
    if type(tokens) is np.ndarray and tokens.dtype == _I4 and tokens.ndim == 1 and tokens.size:
        return tokens if tokens.flags.c_contiguous else np.ascontiguousarray(tokens)  # already int32 LE
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise InvalidInputError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidInputError(f"tokens must be integers, got dtype {tokens.dtype}")
        arr = tokens.detach().to("cpu").numpy()
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    elif isinstance(tokens, (str, bytes)):
        raise InvalidInputError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    else:
        if not hasattr(tokens, "__len__") or not hasattr(tokens, "__iter__"):
            raise InvalidInputError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
        if bool in set(map(type, tokens)):  # numpy would silently coerce bools to ints
            raise InvalidInputError("tokens must be ints, found bool")
        try:
            arr = np.asarray(tokens)
        except (TypeError, ValueError, OverflowError):
            raise InvalidInputError("tokens must be a flat sequence of ints") from None
        if arr.dtype.kind not in "iu" and arr.size:
            bad = next((t for t in np.ravel(arr) if not isinstance(t, (int, np.integer)) or isinstance(t, bool)), None)
            raise InvalidInputError(f"tokens must be ints, found {type(bad).__name__} {bad!r}"
                                    if bad is not None else f"tokens must be ints, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidInputError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidInputError("tokens must not be empty")
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.min() < _INT32_MIN or arr.max() > _INT32_MAX:
        raise InvalidInputError("token ids must fit in int32")
    return np.ascontiguousarray(arr, dtype="<i4")


def iter_block_keys(tokens: np.ndarray, block_tokens: int, salt: bytes):
    """The keys of :func:`block_keys`, one at a time: a caller that stops at the first key
    it does not know (``lookup``) hashes O(known prefix) blocks, not O(tokens)."""
    n = len(tokens) // block_tokens
    step = block_tokens * 4
    data = memoryview(np.ascontiguousarray(tokens[: n * block_tokens])).cast("B")
    prev = b""
    # Keying BLAKE2b costs a compression of the key block; do it once and copy the state.
    base = hashlib.blake2b(digest_size=KEY_BYTES, key=salt)
    for i in range(n):
        h = base.copy()
        h.update(prev)
        h.update(data[i * step:(i + 1) * step])
        prev = h.digest()
        yield prev


def block_keys(tokens: np.ndarray, block_tokens: int, salt: bytes, max_blocks: int | None = None) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` (an int32 LE array), at most ``max_blocks``.
    O(len(tokens))."""
    keys = iter_block_keys(tokens, block_tokens, salt)
    return list(keys if max_blocks is None else itertools.islice(keys, max_blocks))


class KeyMemo:
    """The block keys of recently hashed token sequences (an LRU keyed by their bytes).

    Why: an engine asks about the same tokens several times per request (``lookup`` while
    the request waits to be scheduled, then ``get``, then ``put`` of the same prefix), and
    hashing is most of a lookup's server time. A hit costs one dict probe over the token
    bytes (O(tokens) memcmp, far cheaper than BLAKE2b per block) and returns keys equal to
    :func:`block_keys`'. Bounded: ``entries`` sequences of at most ``max_tokens`` tokens each
    (longer ones are hashed, never kept). Thread-safe. O(tokens) per call.
    """

    def __init__(self, block_tokens: int, salt: bytes, entries: int = 128, max_tokens: int = 4096) -> None:
        from collections import OrderedDict
        import threading

        self.block_tokens = block_tokens
        self.salt = salt
        self.entries = entries
        self.max_tokens = max_tokens
        self._memo: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def _data(self, tokens: np.ndarray) -> bytes | None:
        n = len(tokens) // self.block_tokens * self.block_tokens
        if n == 0 or n > self.max_tokens or self.entries <= 0:
            return None
        return tokens[:n].tobytes()

    def cached(self, tokens: np.ndarray) -> list[bytes] | None:
        """The memoised keys of ``tokens``' full blocks, or None (nothing is hashed)."""
        data = self._data(tokens)
        if data is None:
            return None
        with self._lock:
            hit = self._memo.get(data)
            if hit is None:
                return None
            self._memo.move_to_end(data)
            return list(hit)

    def remember(self, tokens: np.ndarray, keys: list[bytes]) -> None:
        """Keep ``keys`` (every full block's, as :func:`block_keys` gives them) for ``tokens``."""
        data = self._data(tokens)
        if data is None:
            return
        with self._lock:
            self._memo[data] = list(keys)
            if len(self._memo) > self.entries:
                self._memo.popitem(last=False)

    def keys(self, tokens: np.ndarray) -> list[bytes]:
        """``block_keys(tokens, block_tokens, salt)`` (a new list each call)."""
        n = len(tokens) // self.block_tokens * self.block_tokens
        if n == 0 or n > self.max_tokens or self.entries <= 0:
            return block_keys(tokens, self.block_tokens, self.salt)
        data = tokens[:n].tobytes()
        with self._lock:
            hit = self._memo.get(data)
            if hit is not None:
                self._memo.move_to_end(data)
                return list(hit)
        keys = block_keys(tokens, self.block_tokens, self.salt)
        with self._lock:
            self._memo[data] = keys
            if len(self._memo) > self.entries:
                self._memo.popitem(last=False)
        return list(keys)
