"""An arena whose slots hold *encoded* blocks: a codec in front of a plain arena.

:class:`CodecArena` presents the raw block rows (``slot_bytes`` = the raw block) to the
tier manager and the copies, and keeps ``inner`` -- a memory or disk arena whose slots are
``codec.encoded_bytes`` -- underneath. So a tier's capacity counts encoded bytes (the inner
arena is sized from the tier's bytes), and everything above sees whole blocks.

- ``write`` encodes on the source's device (a demotion from the GPU crosses as encoded
  bytes) into encoded rows, then writes those: a disk slab checksums the encoded bytes it
  stores, so a damaged encoded block fails its check and is a miss, as any block.
- ``read`` reads encoded rows (the disk's checked read; a run of memory slots as a view,
  no copy) and decodes straight into ``out``'s rows on ``out``'s device -- any strides, so
  the caller's KV or an engine pool is the destination and no full-size raw buffer is made.
  Batches are cut into chunks of at most ``chunk_bytes`` of raw block bytes, which bounds the
  codec's temporaries.

Complexity: O(bytes) per call with O(chunks) Python steps (``lossless``: one step per block).
Imports nothing of this project but ``allocator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Any

import torch

from allocator.arena import Arena, CorruptSlotError
from allocator.codecs import Codec
from allocator.disk import DiskArena
from allocator.memory import MemoryArena
from allocator.rowcopy import DEFAULT_COPIER

_CHUNK_BYTES = 4 << 20  # small enough that a read overlaps several decodes


class CodecArena(Arena):
    """``inner`` (slots of ``codec.encoded_bytes``) seen as raw block rows through ``codec``."""

    kind = "codec"

    def __init__(self, inner: Arena, codec: Codec, *, chunk_bytes: int = _CHUNK_BYTES) -> None:
        if inner.slot_bytes != codec.encoded_bytes:
            raise ValueError(f"inner slots of {inner.slot_bytes} bytes for a codec writing {codec.encoded_bytes}")
        super().__init__(inner.num_slots, codec.raw_bytes)
        if isinstance(inner, MemoryArena) and getattr(inner, "checksums", None) is not None:
            raise TypeError("a codec arena keeps its encoded rows private (no shared-memory arena)")
        self.inner = inner
        self.codec = codec
        #: the cross-device copy primitive (the inner arena's, so a test double injected there
        #: also sees the encoded bytes cross)
        self.copier = getattr(inner, "copier", None) or DEFAULT_COPIER
        self._inner_like = inner.data if isinstance(inner, MemoryArena) else torch.empty(0, dtype=torch.uint8)
        self._per_chunk = max(1, chunk_bytes // codec.raw_bytes)
        #: seconds spent and raw bytes produced by decoding (the cost model's decode rate)
        self.decode_seconds = 0.0
        self.decoded_bytes = 0

    # -- what the tiers ask of an arena ----------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def is_disk(self) -> bool:
        return isinstance(self.inner, DiskArena)

    def __getattr__(self, name: str) -> Any:
        # Disk housekeeping (invalidate, recovered, path, sync, ...) is the inner slab's. Never
        # the raw-byte views of a memory arena: those would hand out encoded bytes as KV.
        if name in ("data", "rows", "gather", "checksums", "set_checksums", "inner", "codec") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _raw(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """``t`` (raw rows as any dtype, e.g. uint8 from a copy) viewed as ``[n, *block]`` blocks."""
        if t.dtype == self.codec.dtype and tuple(t.shape[1:]) == self.codec.block_shape:
            return t
        if not t.is_contiguous():
            t = t.contiguous()
        return t.view(torch.uint8).view(n, -1).view(self.codec.dtype).view(n, *self.codec.block_shape)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        return [(i, min(n, i + self._per_chunk)) for i in range(0, n, self._per_chunk)]

    def write(self, slots: Sequence[int], src: torch.Tensor, **kwargs: Any) -> None:
        """Encode ``src`` (``[n, *block]`` rows, any strides and device) into ``slots``;
        ``kwargs`` (a disk slab's keys/parents) go to the inner arena, cut to each chunk."""
        self._check_batch(slots, src)
        n = len(slots)
        if not n:
            return
        src = self._raw(src, n)
        slots = list(slots)
        for lo, hi in self._chunks(n):
            enc = self.copier.empty((hi - lo, self.codec.encoded_bytes), torch.uint8, src)  # on the source's device
            self.codec.encode(src[lo:hi], enc)
            if self.copier.crosses(enc, self._inner_like):  # a CUDA source: encoded bytes cross, not raw ones
                here = self.copier.to(enc, self._inner_like)
                self.copier.wait(enc, here)  # landed before the inner arena reads it on the host
                enc = here
            part = {k: (v[lo:hi] if v is not None else None) for k, v in kwargs.items()}
            self.inner.write(slots[lo:hi], enc, **part)

    def _encoded(self, slots: list[int], like: torch.Tensor) -> torch.Tensor:
        """Encoded rows of ``slots`` where ``like`` lives: a view of a run of memory slots (or a
        gather), moved by the copy primitive when ``like`` is on another device."""
        inner = self.inner
        if isinstance(inner, MemoryArena):
            if slots[-1] - slots[0] == len(slots) - 1 and slots == list(range(slots[0], slots[-1] + 1)):
                enc = inner.data[slots[0]:slots[-1] + 1]
            else:
                enc = inner.gather(slots)
        else:
            enc = torch.empty((len(slots), self.codec.encoded_bytes), dtype=torch.uint8)
            inner.read(slots, enc)
        return self._to(enc, like)

    def _to(self, enc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Encoded rows to where ``like`` (the decode's destination) lives, through the copy
        primitive; the decode that follows is queued on the same stream, and ``read`` waits
        before it returns."""
        return self.copier.to(enc, like)

    def read(self, slots: Sequence[int], out: torch.Tensor) -> None:
        """Decode ``slots`` into ``out`` (``[n, *block]`` of the codec's dtype, any strides with a
        contiguous last dim, any device). Raises :class:`CorruptSlotError` naming the slots
        whose encoded bytes failed their check (or could not be decoded); the other rows of
        ``out`` are valid. From a disk slab the next chunk is read while this one decodes
        (positioned reads and torch kernels release the GIL), so a restore costs about
        max(read, decode) rather than their sum."""
        self._check_batch(slots, out)
        n = len(slots)
        if not n:
            return
        out = self._raw(out, n) if out.dtype != self.codec.dtype else out
        slots = list(slots)
        bad: list[int] = []
        t0 = time.perf_counter()
        chunks = self._chunks(n)
        prefetch = isinstance(self.inner, DiskArena) and len(chunks) > 1
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-codec-read") if prefetch else None
        try:
            fetch = (lambda part: pool.submit(self._fetch, part, out)) if pool is not None else \
                (lambda part: _Done(self._fetch(part, out)))
            pending = fetch(slots[chunks[0][0]:chunks[0][1]])
            for k, (lo, hi) in enumerate(chunks):
                enc, failed = pending.result()
                if k + 1 < len(chunks):
                    nlo, nhi = chunks[k + 1]
                    pending = fetch(slots[nlo:nhi])
                part = slots[lo:hi]
                bad.extend(failed)
                try:
                    self.codec.decode(enc, out[lo:hi])  # rows of failed slots decode garbage: reported below
                except ValueError as exc:  # a malformed lossless row whose check could not be done
                    bad.extend(s for s in part if s not in set(failed))
                    log_bad = f"undecodable encoded rows: {exc}"
                    raise CorruptSlotError(bad, log_bad) from None
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        self.copier.wait(out)  # every copy and decode into a CUDA destination has landed
        self.decode_seconds += time.perf_counter() - t0
        self.decoded_bytes += n * self.codec.raw_bytes
        if bad:
            raise CorruptSlotError(bad, f"{len(bad)} encoded slot(s) failed their checksum: {bad[:8]}")

    def _fetch(self, part: list[int], like: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Encoded rows of ``part`` where ``like`` lives and the slots whose check failed (their
        rows are whatever was read: the caller reports them, never returns them)."""
        inner = self.inner
        if isinstance(inner, MemoryArena):
            return self._encoded(part, like), []
        enc = torch.empty((len(part), self.codec.encoded_bytes), dtype=torch.uint8)
        failed: list[int] = []
        try:
            inner.read(part, enc)
        except CorruptSlotError as exc:
            failed = list(exc.slots)
        return self._to(enc, like), failed

    @property
    def blocks_per_chunk(self) -> int:
        """Blocks one chunk of a read or write holds (what bounds the codec's temporaries)."""
        return self._per_chunk

    @property
    def decode_rate(self) -> float | None:
        """Raw bytes per second decoded so far (None before any read)."""
        return self.decoded_bytes / self.decode_seconds if self.decode_seconds > 0 else None

    def close(self) -> None:
        self.inner.close()


class _Done:
    """A finished future (the no-prefetch path)."""

    def __init__(self, value) -> None:
        self._value = value

    def result(self):
        return self._value


def base_arena(arena: Arena) -> Arena:
    """The arena holding the bytes: ``arena`` itself, or a codec arena's inner one."""
    return arena.inner if isinstance(arena, CodecArena) else arena


def same_encoding(a: Arena, b: Arena) -> bool:
    """Whether ``a`` and ``b`` store the same encoded rows (encoded bytes can move as they are)."""
    return isinstance(a, CodecArena) and isinstance(b, CodecArena) and a.codec.spec() == b.codec.spec()
